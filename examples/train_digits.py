"""Train a small CNN on real data with torch's modules and with danlu's, side by side.

The data is scikit-learn's handwritten digits (``load_digits``: 1,797 images of 8x8 pixels, shipped inside
the package, so nothing is downloaded), upsampled to 16x16. The model is a small residual CNN with
BatchNorm + ReLU after every convolution (the residual added before the last ReLU of a block) and dropout
before the classifier. It trains with AdamW for the first half of the epochs and SGD with Nesterov momentum
for the second, each phase with a linear warmup and a cosine decay of the learning rate.

Both runs start from the same weights (the torch model's state_dict loads into the danlu model unchanged)
and see the batches in the same order; their dropout masks differ (danlu draws Philox masks), so their
curves differ a little. The epochs of the two runs alternate, so a slow spell of the machine hits both.

    pip install scikit-learn matplotlib     # matplotlib only for the plot
    python examples/train_digits.py [--epochs 12] [--device cpu|cuda] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import danlu.nn
import danlu.optim

# ------------------------------------------------------------------------------------------------- model


class TorchBatchNormReLU(nn.BatchNorm2d):
    """torch's way: BatchNorm2d, then the residual (if any) added, then ReLU, as three ops. A subclass of
    BatchNorm2d, so its state_dict keys are those of danlu.nn.BatchNormAct2d."""

    def forward(self, x, residual=None):
        y = super().forward(x)
        return torch.relu(y if residual is None else y + residual)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm_act):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm_act(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm_act(channels)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)  # relu(bn(conv(...)) + x)


def make_model(use_danlu: bool, width: int = 16, p: float = 0.25) -> nn.Module:
    """The same network with torch's or danlu's BatchNorm+ReLU and dropout; everything else is torch's."""
    if use_danlu:
        def norm_act(c):
            return danlu.nn.BatchNormAct2d(c, activation="relu")  # BN, residual add and ReLU in one pass
        dropout = danlu.nn.Dropout(p)
    else:
        norm_act, dropout = TorchBatchNormReLU, nn.Dropout(p)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), norm_act(width),        # 16x16
        ResidualBlock(width, norm_act),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), norm_act(2 * width),  # 8x8
        ResidualBlock(2 * width, norm_act),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False), norm_act(4 * width),  # 4x4
        ResidualBlock(4 * width, norm_act),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), dropout, nn.Linear(4 * width, 10))


# -------------------------------------------------------------------------------------------------- data


def load_data(device: torch.device, size: int = 16, test_fraction: float = 0.2, seed: int = 0):
    """(train_x, train_y, test_x, test_y): digits scaled to [0, 1], upsampled to size x size, standardised
    with the training set's mean and deviation; a stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("This example needs scikit-learn for its data set (sklearn.datasets.load_digits, shipped with the "
                 "package: nothing is downloaded). Install it with: pip install scikit-learn")
    digits = load_digits()
    train_i, test_i = train_test_split(range(len(digits.target)), test_size=test_fraction, random_state=seed,
                                       stratify=digits.target)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    mean, std = images[train_i].mean(), images[train_i].std()
    images = (images - mean) / std
    return (images[train_i].to(device), labels[train_i].to(device), images[test_i].to(device),
            labels[test_i].to(device))


# ------------------------------------------------------------------------------------------------ training


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int):
    """Linear warmup from 0 to the optimizer's lr over warmup_steps, then a cosine decay to 0."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Run:
    """One model with its optimizer schedule: AdamW for the first ``switch`` epochs, then SGD-Nesterov."""

    def __init__(self, name: str, model: nn.Module, optim_module, steps_per_epoch: int, epochs: int, switch: int):
        self.name, self.model, self.optim_module = name, model, optim_module
        self.steps_per_epoch, self.epochs, self.switch = steps_per_epoch, epochs, switch
        self.history = {"loss": [], "test_loss": [], "accuracy": [], "seconds": []}
        self.generator = torch.Generator().manual_seed(1)  # the same batch order for both runs
        self._phase(adamw=True)

    def _phase(self, adamw: bool):
        params = self.model.parameters()
        epochs = self.switch if adamw else self.epochs - self.switch
        if adamw:
            self.optimizer = self.optim_module.AdamW(params, lr=2e-3, weight_decay=0.05)
        else:
            self.optimizer = self.optim_module.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        total = max(1, epochs * self.steps_per_epoch)
        self.scheduler = warmup_cosine(self.optimizer, total, warmup_steps=max(1, total // 10))

    def epoch(self, epoch: int, data, batch_size: int, max_steps: int | None) -> None:
        if epoch == self.switch:
            self._phase(adamw=False)
        train_x, train_y, test_x, test_y = data
        self.model.train()
        order = torch.randperm(len(train_y), generator=self.generator).to(train_x.device)
        losses = []
        started = time.perf_counter()
        for step, first in enumerate(range(0, len(order), batch_size)):
            if max_steps is not None and step >= max_steps:
                break
            batch = order[first:first + batch_size]
            loss = F.cross_entropy(self.model(train_x[batch]), train_y[batch])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            losses.append(loss.detach())
        if train_x.device.type == "cuda":
            torch.cuda.synchronize(train_x.device)
        self.history["seconds"].append(time.perf_counter() - started)
        self.history["loss"].append(torch.stack(losses).mean().item())
        self.model.eval()
        with torch.no_grad():
            logits = self.model(test_x)
        self.history["test_loss"].append(F.cross_entropy(logits, test_y).item())
        self.history["accuracy"].append((logits.argmax(1) == test_y).float().mean().item())

    def line(self) -> str:
        h = self.history
        return (f"{self.name}: loss {h['loss'][-1]:.4f}, test loss {h['test_loss'][-1]:.4f}, "
                f"test accuracy {h['accuracy'][-1]:6.2%}, {h['seconds'][-1]:.2f} s")


def plot(runs: list[Run], path: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.4
    for i, (run, color) in enumerate(zip(runs, ("tab:blue", "tab:orange"))):
        epochs = range(1, len(run.history["loss"]) + 1)
        axes[0].plot(epochs, run.history["loss"], marker="o", color=color, label=f"{run.name} train")
        axes[0].plot(epochs, run.history["test_loss"], marker="x", linestyle="--", color=color,
                     label=f"{run.name} test")
        axes[1].plot(epochs, [100 * a for a in run.history["accuracy"]], marker="o", color=color, label=run.name)
        axes[2].bar([e + (i - 0.5) * width for e in epochs], run.history["seconds"], width=width, color=color,
                    label=run.name)
    for ax, label in zip(axes, ("cross-entropy loss", "test accuracy (%)", "seconds per epoch")):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    switch = runs[0].switch
    for ax in axes[:2]:
        ax.axvline(switch + 0.5, color="gray", linewidth=0.8, linestyle=":")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="epochs (AdamW for the first half, then SGD)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=None, help="stop every epoch after this many steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() and danlu.cuda_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("digits-out"), help="folder for the plot")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (one AdamW and one SGD epoch)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    data = load_data(device)
    torch.manual_seed(0)
    torch_model = make_model(use_danlu=False).to(device)
    danlu_model = make_model(use_danlu=True).to(device)
    danlu_model.load_state_dict(torch_model.state_dict())  # the same weights; the same state_dict keys
    steps = math.ceil(len(data[1]) / args.batch_size)
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)
    switch = args.epochs // 2
    runs = [Run("torch", torch_model, torch.optim, steps, args.epochs, switch),
            Run("danlu", danlu_model, danlu.optim, steps, args.epochs, switch)]
    size = data[0].shape[-1]
    print(f"digits: {len(data[1])} training and {len(data[3])} test images, {size}x{size}; {device}, "
          f"{torch.get_num_threads()} threads; epochs 1-{switch} AdamW, {switch + 1}-{args.epochs} SGD-Nesterov")
    for epoch in range(args.epochs):
        for run in runs if epoch % 2 == 0 else runs[::-1]:  # alternate which run goes first
            torch.manual_seed(100 + epoch)
            run.epoch(epoch, data, args.batch_size, args.max_steps)
        print(f"epoch {epoch + 1:>2}  " + "  |  ".join(run.line() for run in runs), flush=True)
    later = {run.name: run.history["seconds"][1:] or run.history["seconds"] for run in runs}  # past warm-up
    print("seconds per epoch after the first, median: " + ", ".join(f"{name} {_median(s):.2f}" for name, s in
                                                                   later.items())
          + f"; torch's total / danlu's total: {sum(later['torch']) / sum(later['danlu']):.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    path = plot(runs, args.out / "digits.png",
                f"digits, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                f"danlu {danlu.__version__}")
    if path is not None:
        print(f"wrote {path}")
    return 0


def _median(values):
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


if __name__ == "__main__":
    sys.exit(main())
