"""python -m benchmarks.step_overhead: what one optimizer.step() costs beyond its arithmetic.

AdamW on 161 and 800 params of 4 elements each (so the step is almost all per-tensor bookkeeping), danlu
against torch's fused and foreach implementations, timed in interleaved rounds on one thread. danlu's number
includes reading every tensor's pointer, size, strides, dtype and device from the live tensors each step
(docs/design.md principle 8)."""

from __future__ import annotations

import statistics
import time

import torch

import danlu.optim

IMPLS = {
    "danlu": lambda params: danlu.optim.AdamW(params),
    "torch-fused": lambda params: torch.optim.AdamW(params, fused=True),
    "torch-foreach": lambda params: torch.optim.AdamW(params, foreach=True),
}


def step_times_us(n_params: int, rounds: int = 30, steps_per_round: int = 10) -> dict[str, float]:
    optimizers = {}
    for name, make in IMPLS.items():
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n_params)]
        for p in params:
            p.grad = torch.randn(4)
        optimizers[name] = make(params)
        optimizers[name].step()  # state made outside the timing
    times = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            for _ in range(steps_per_round):
                opt.step()
            times[name].append((time.perf_counter() - start) / steps_per_round * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    for n_params in (161, 800):
        medians = step_times_us(n_params)
        print(f"AdamW, {n_params} params of 4 elements, 1 thread: "
              + ", ".join(f"{name} {us:.0f} us" for name, us in medians.items()) + " per step")


if __name__ == "__main__":
    main()
