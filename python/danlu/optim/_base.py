"""The machinery every danlu optimizer shares: validation, lazy state, cached tensor tables, and one
native call per (param group, device, dtype) bucket (DESIGN.md principle 3)."""

from __future__ import annotations

import torch

from danlu import _C
from danlu._native import DTYPE_CODES, REAL_OF_COMPLEX, check_cuda_built, is_dense, same_layout
from danlu.optim._table import FIRST_STEP, TensorTable

_NO_STATE: dict = {}


class _Bucket:
    """The tensors of one group on one device with one dtype, and their cached native table."""

    def __init__(self, opt, group, items, device, dtype):
        self.device, self.dtype = device, dtype
        self.params = [p for p, _ in items]
        self.args = _C.StepArgs()
        self.args.kind, self.args.dtype = opt._kind, DTYPE_CODES[dtype]
        names = opt._state_names(group)
        self.is_complex = self.params[0].is_complex()
        real = self._real
        states, steps, flags = [], [], []
        for p, flag in items:
            state = opt.state.get(p, _NO_STATE)
            states.append([real(state[n]) if n is not None else None for n in names])
            steps.append(state["step"] if opt._counts_steps else None)
            flags.append(flag)
        self.staged = {}  # index -> staging tensor for grads whose strides differ from the param's
        grads = self._grads([p.grad for p in self.params])
        self.table = TensorTable([real(p) for p in self.params], [real(g) for g in grads], states, steps,
                                 flags, dtype.itemsize, device)
        self.args.table, self.args.num_tensors, self.args.total = self.table.ptr, self.table.num_tensors, self.table.total
        # The table points into these: holding them keeps their memory, and their ids, from being reused.
        self.referenced = (states, steps)
        self.grads_seen = grad_fingerprint([p.grad for p in self.params])
        self.flags_pending = any(flags)
        if device.type == "cuda":
            self.step_counter = torch.zeros(1, dtype=torch.int32, device=device)

    def _grads(self, grads):
        """The grads as the kernel reads them: staged into the param's layout where they differ."""
        self.staged = {i: torch.empty_like(p) for i, (p, g) in enumerate(zip(self.params, grads))
                       if not same_layout(p, g)}
        return [self.staged.get(i, g) for i, g in enumerate(grads)]

    def _real(self, t):
        """Complex tensors are updated through their real view, as torch's optimizers do."""
        return torch.view_as_real(t) if self.is_complex else t

    def refresh_grads(self, grads, seen):
        """Cheap path of a step whose params and state are unchanged but whose grads are new tensors."""
        self.table.set_grads([self._real(g) for g in self._grads(grads)])
        self.grads_seen = seen

    def run(self, hyper, lr, grad_scale, found_inf):
        args = self.args
        for name, value in hyper.items():
            setattr(args, name, value)
        # Scalars moved to our device stay referenced here until the native call has consumed them.
        lr_value, lr_tensor = _lr_for(lr, self.device)
        grad_scale = _on_device(grad_scale, self.device, torch.float32)
        found_inf = _on_device(found_inf, self.device, torch.float32)
        args.lr = lr_value
        args.lr_ptr = lr_tensor.data_ptr() if lr_tensor is not None else 0
        args.lr_is_double = lr_tensor is not None and lr_tensor.dtype == torch.float64
        args.grad_scale_ptr = grad_scale.data_ptr() if grad_scale is not None else 0
        args.found_inf_ptr = found_inf.data_ptr() if found_inf is not None else 0
        grads = [p.grad for p in self.params]
        for i, staging in self.staged.items():
            staging.copy_(grads[i])
        if self.device.type == "cpu":
            _C.optim_step_cpu(args, torch.get_num_threads())
        else:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            _C.optim_step_cuda(args, self.device.index, stream, self.step_counter.data_ptr())
        if grad_scale is not None:  # the kernel unscaled the staged copy: hand the unscaled grad back
            for i, staging in self.staged.items():
                grads[i].copy_(staging)


def grad_fingerprint(grads):
    """What a table's grad row depends on: each grad's memory, dtype and layout."""
    try:
        return [(g.data_ptr(), g.dtype, g.shape, g.stride()) for g in grads]
    except RuntimeError:  # sparse grads have no data pointer or strides; _check_param explains
        return None


def _lr_for(lr, device):
    """(value, tensor): a tensor lr on the params' device is read by the kernel itself, no sync."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    if lr.device.type == "cpu" and device.type != "cpu":
        return float(lr), None
    dtype = lr.dtype if lr.dtype in (torch.float32, torch.float64) else torch.float64
    return 0.0, _on_device(lr, device, dtype)


def _on_device(t, device, dtype):
    if t is None or (t.device == device and t.dtype == dtype):
        return t
    return t.to(device=device, dtype=dtype)


class _Where:
    def __init__(self, params, p, group_index):
        self.params, self.p, self.group_index = params, p, group_index

    def __str__(self):
        position = next(i for i, q in enumerate(self.params) if q is self.p)
        return f"param {position} of param group {self.group_index}"


class _GroupCache:
    def __init__(self, signature, tensors_seen, buckets):
        self.signature, self.tensors_seen, self.buckets = signature, tensors_seen, buckets


class FusedOptimizer(torch.optim.Optimizer):
    """Base of danlu's optimizers: a torch.optim.Optimizer whose step is one native call per bucket.

    Each danlu optimizer also derives from the torch class it replaces (``class Adam(FusedOptimizer,
    torch.optim.Adam)``): torch's constructor validates the arguments and fills the defaults, so both
    match torch exactly, and ``isinstance(opt, torch.optim.Adam)`` holds.

    Subclasses set ``_kind`` (csrc/optim/update_rules.h OptimKind) and ``_counts_steps``, and define
    ``_state_names(group)`` (the state keys of the table's state slots) and ``_hyper(group)`` (StepArgs
    fields from the group); ``_init_state`` is theirs to override where torch's lazy state is not zeros.
    """

    _kind: int
    _counts_steps: bool = True
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf

    @classmethod
    def _reject_differentiable(cls, differentiable):
        if differentiable:
            raise NotImplementedError(
                f"danlu.optim.{cls.__name__} does not support differentiable=True: its update is a fused "
                f"native kernel that autograd cannot see. Use torch.optim.{cls.__name__} for that."
            )

    # Anything that may replace params or state tensors drops the cached tables.
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._cache: dict[int, _GroupCache] = {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._cache = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._cache = {}

    def _state_names(self, group) -> tuple:
        raise NotImplementedError

    def _init_state(self, p, group) -> int:
        """torch's lazy state for p, in torch's format: zeros for each missing state and a float32 step on
        the param's device (where torch's fused optimizers keep it, and the kernel reads and counts it).
        Returns the table flags for p."""
        state = self.state[p]
        if self._counts_steps:
            state.setdefault("step", torch.zeros((), dtype=torch.float32, device=p.device))
        for name in self._state_names(group):
            if name is not None and state.get(name) is None:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return 0

    def _hyper(self, group):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Everything is checked before anything changes: a step that raises leaves params and state alone.
        plans = [self._plan(i, group) for i, group in enumerate(self.param_groups)]
        for group, buckets in zip(self.param_groups, plans):
            hyper = self._hyper(group)
            for bucket in buckets:
                bucket.run(hyper, group["lr"], grad_scale, found_inf)
        return loss

    def _plan(self, index, group):
        """The buckets of one group for this step, reusing the cached tables when nothing moved."""
        params = [p for p in group["params"] if p.grad is not None]
        signature = (tuple(map(id, params)), self._state_names(group))
        cache = self._cache.get(index)
        if cache is not None and cache.signature == signature and cache.tensors_seen == self._tensors_seen(params, group):
            for bucket in cache.buckets:
                grads = [p.grad for p in bucket.params]
                seen = grad_fingerprint(grads)
                if seen != bucket.grads_seen:  # new or changed grad tensors: check them before use
                    for p in bucket.params:
                        self._check_param(p, index, group)
                    bucket.refresh_grads(grads, seen)
            return cache.buckets
        for p in params:
            self._check_param(p, index, group)
        buckets = self._build_buckets(group, params, cache)
        self._cache[index] = _GroupCache(signature, self._tensors_seen(params, group), buckets)
        return buckets

    def _tensors_seen(self, params, group):
        """What a table's other rows depend on: the params' memory and layout, the state tensors' identity."""
        names = [n for n in self._state_names(group) if n is not None] + (["step"] if self._counts_steps else [])
        states = (self.state.get(p, _NO_STATE) for p in params)  # no empty entries: torch's SGD makes none
        return [(p.data_ptr(), p.stride(), *[id(s.get(n)) for n in names]) for p, s in zip(params, states)]

    def _check_param(self, p, group_index, group):
        g = p.grad
        name = f"danlu.optim.{type(self).__name__}"
        # Looked up only to word an error: a search per param would make every check quadratic.
        where = _Where(group["params"], p, group_index)
        if g.is_sparse or g.layout is not torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients ({where} has a {g.layout} grad)")
        if p.dtype not in DTYPE_CODES and p.dtype not in REAL_OF_COMPLEX:
            raise TypeError(f"{name}: {where} has dtype {p.dtype}; expected float32, float64, float16, "
                            "bfloat16, complex64 or complex128")
        if g.dtype != p.dtype:
            raise TypeError(f"{name}: the grad of {where} has dtype {g.dtype}, but the param has {p.dtype}")
        if g.device != p.device:
            raise ValueError(f"{name}: the grad of {where} is on {g.device}, but the param is on {p.device}")
        if g.shape != p.shape:
            raise ValueError(f"{name}: the grad of {where} has shape {tuple(g.shape)}, but the param has "
                             f"{tuple(p.shape)}")
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: {where} is on {p.device}; danlu runs on cpu and cuda devices")
        check_cuda_built(p.device)
        if not is_dense(p):
            raise ValueError(f"{name}: {where} is not dense (strides {p.stride()} for shape {tuple(p.shape)}); "
                             "danlu updates params in place and needs non-overlapping, dense storage")

    def _build_buckets(self, group, params, old_cache):
        # SGD's fresh momentum buffers keep their first-step flag until a step has really run.
        pending = {}
        if old_cache is not None:
            for bucket in old_cache.buckets:
                if bucket.flags_pending:
                    pending.update(zip(map(id, bucket.params), bucket.table.flags()))
        by_key: dict = {}
        for p in params:
            flag = self._prepare_state(p, group)
            flag |= pending.get(id(p), 0) & FIRST_STEP
            key = (p.device, REAL_OF_COMPLEX.get(p.dtype, p.dtype), p.is_complex())
            by_key.setdefault(key, []).append((p, flag))
        return [_Bucket(self, group, items, device, dtype) for (device, dtype, _), items in by_key.items()]

    def _prepare_state(self, p, group) -> int:
        """Lazily creates torch-format state; puts loaded state where the kernel can use it. Returns flags."""
        names = [n for n in self._state_names(group) if n is not None]
        if not names and not self._counts_steps:
            return 0
        state = self.state[p]
        flags = 0
        if any(state.get(n) is None for n in names) or (self._counts_steps and "step" not in state):
            flags = self._init_state(p, group)
        for name in self._state_names(group):
            if name is None:
                continue
            s = state[name]
            if s.dtype != p.dtype or s.device != p.device or not same_layout(s, p):
                state[name] = torch.empty_like(p).copy_(s)
        if self._counts_steps:
            step = state["step"]
            if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device == p.device
                    and step.dim() == 0):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        return flags
