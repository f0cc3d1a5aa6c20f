"""The machinery every danlu optimizer shares: validation, lazy state, tensor tables, and one native call per
(param group, device, dtype) bucket (docs/design.md principle 3).

A step runs in three phases, so that a step that raises changes nothing (principle 8):
1. read and check: every group's hyper-parameters, and every tensor the kernels will touch, read from the live
   tensors now. A bucket whose tensors all have the sizes, strides, dtypes and devices it was last checked with
   only needs its pointers compared (and, where they moved, checked for overlap); anything else sends its
   params through the full checks.
2. commit: lazy state is created, loaded state is put where the kernel can use it, tables are (re)built and
   moved pointers written into them.
3. run: one native call per bucket.
A table is an optimisation, never a source of truth: every pointer and size that reaches the kernel was read
from the live tensor in phase 1 or 2 of this step.
"""

from __future__ import annotations

from itertools import chain, repeat
from operator import attrgetter

import numpy as np
import torch

from danlu import _C
from danlu._native import DTYPE_CODES, REAL_OF_COMPLEX, check_cuda_built, is_dense, same_layout
from danlu.optim._table import POINTER_ROWS, ROWS, TensorTable

_NO_STATE: dict = {}
_GRAD = attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_STRIDE = torch.Tensor.stride
_SIZE_DTYPE_DEVICE = attrgetter("nbytes", "dtype", "device")


def fused_doc(torch_name: str, summary: str) -> str:
    """The docstring of a danlu optimizer: what it is, then what differs from the torch class it replaces."""
    return f"""{summary}

    A drop-in ``torch.optim.{torch_name}``: the same arguments, defaults, errors, state keys and state_dict
    (``isinstance(opt, torch.optim.{torch_name})`` holds; torch's checkpoints load into it and its into torch).
    What differs:

    - The update runs as one native kernel per param group, device and dtype (one CPU parallel region, one
      CUDA launch). ``foreach=`` and ``fused=`` are accepted and change nothing; ``differentiable=True`` raises.
    - float16/bfloat16 params are updated in float32 arithmetic and rounded once; every CPU ISA and thread
      count gives the same bits. GradScaler's unscale and inf check run inside the kernel.
    - Everything is checked before anything changes, so a step that raises leaves params and state as they
      were: params, grads and state must be dense tensors of the param's shape, dtype and device (KeyError for
      missing state, as torch); tensors that share memory raise ValueError, tensor subclasses without memory
      of their own (DTensor) raise TypeError. A param listed twice is updated once per listing, as torch does.
    """


class _Where:
    """"param 3 of param group 1", found only when an error message is worded: a search per param would make
    every full check quadratic."""

    def __init__(self, opt, p):
        self.opt, self.p = opt, p

    def __str__(self):
        for g, group in enumerate(self.opt.param_groups):
            for i, q in enumerate(group["params"]):
                if q is self.p:
                    return f"param {i} of param group {g}"
        return "a param that is in no param group"


def _first_overlap(start, size):
    """Indices (a, b) of two of the memory ranges [start, start + size) that overlap, or None."""
    start, size = np.asarray(start, dtype=np.int64), np.asarray(size, dtype=np.int64)
    used = np.flatnonzero(size)
    order = used[np.argsort(start[used], kind="stable")]
    clash = np.flatnonzero(start[order[:-1]] + size[order[:-1]] > start[order[1:]])
    return None if clash.size == 0 else (int(order[clash[0]]), int(order[clash[0] + 1]))


class _Bucket:
    """The tensors of one group on one device with one dtype, and their native table. A param listed n times in
    a group is in n buckets (`listing` 0..n-1) that run one after another: torch updates it once per listing."""

    def __init__(self, opt, group, params, device, dtype, listing):
        self.opt, self.params, self.device, self.dtype, self.listing = opt, params, device, dtype, listing
        self.slots = [(k, n) for k, n in enumerate(opt._state_names(group)) if n is not None]  # (slot, key)
        self.counts_steps = opt._counts_steps
        self.args = _C.StepArgs()
        self.args.kind, self.args.dtype = opt._kind, DTYPE_CODES[dtype]
        self.table = None
        self.checked_meta = None  # the live meta of the tensors when the params were last fully checked
        self.pointers = None  # the live pointers last written into the table
        self.staged = {}  # param index -> the grad copied into the param's layout (grads laid out otherwise)
        self.flag_state = []  # the state tensors the table's flags belong to (first state slot), held
        self.step_counter = torch.empty(1, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def roles(self):
        return (["the param", "the grad"] + [f"state '{name}'" for _, name in self.slots]
                + (["state 'step'"] if self.counts_steps else []))

    def columns(self, get=dict.__getitem__):
        """The tensors of the table, column by column (params, grads, each state, steps), from the live param,
        grad and state objects."""
        states = list(map(self.opt.state.get, self.params, repeat(_NO_STATE)))
        columns = [self.params, list(map(_GRAD, self.params))]
        columns += [[get(s, name) for s in states] for _, name in self.slots]
        if self.counts_steps:
            columns.append([get(s, "step") for s in states])
        return columns

    def read_live(self):
        """(pointers, meta) of every tensor in table order, read now; None where some state is missing or is
        not a tensor, or a grad has no data pointer (sparse): the full checks then explain. (map over C-level
        getters: this runs every step for every tensor, at about 0.3 us a tensor.)"""
        try:
            flat = list(chain.from_iterable(self.columns()))
            return list(map(_DATA_PTR, flat)), (list(map(_SIZE_DTYPE_DEVICE, flat)), list(map(_STRIDE, flat)))
        except (KeyError, TypeError, AttributeError, RuntimeError):
            return None

    def check_no_overlap(self, pointers, sizes, labels):
        """The kernel updates every element of every tensor once, in parallel: no two of them may share memory
        (params viewing one storage, a grad that is its own param, one state tensor for two params)."""
        clash = _first_overlap(pointers, sizes)
        if clash is None:
            return
        (col_a, a), (col_b, b) = labels[clash[0]], labels[clash[1]]
        roles, name = self.roles(), self.opt._name()
        raise ValueError(
            f"{name}: {roles[col_a]} of {_Where(self.opt, self.params[a])} and {roles[col_b]} of "
            f"{_Where(self.opt, self.params[b])} overlap in memory; danlu updates a param group in one parallel "
            "pass and cannot update tensors that share memory (use torch.optim for such params)")

    def check_existing_do_not_overlap(self):
        """Phase 1 of a full check: the params, grads and whatever state already exists (state made in phase 2
        is fresh memory)."""
        pointers, sizes, labels = [], [], []
        for col, column in enumerate(self.columns(get=dict.get)):
            for i, t in enumerate(column):
                if isinstance(t, torch.Tensor):
                    pointers.append(t.data_ptr())
                    sizes.append(t.nbytes)
                    labels.append((col, i))
        self.check_no_overlap(pointers, sizes, labels)

    def check_moved_do_not_overlap(self, live):
        pointers, (size_dtype_device, _) = live
        n = len(self.params)
        self.check_no_overlap(pointers, [m[0] for m in size_dtype_device], [divmod(k, n) for k in range(len(pointers))])

    def rebuild(self, flags, live):
        """A new table for the tensors as they are now. Flags of state tensors that the old table held (an SGD
        buffer whose first step was skipped) go on with them, found by identity: the bucket holds those
        tensors, so their ids cannot have been reused."""
        old_table, old_flag_state = self.table, self.flag_state
        numel = np.array([p.numel() * (2 if p.is_complex() else 1) for p in self.params], dtype=np.int64)
        self.staged = {i: torch.empty_like(p) for i, p in enumerate(self.params) if not same_layout(p.grad, p)}
        self.table = TensorTable(numel, self.dtype.itemsize, np.asarray(flags, dtype=np.int64), self.device)
        args, table = self.args, self.table
        args.table, args.num_tensors, args.total = table.ptr, len(self.params), table.total
        args.block_first_tensor, args.num_blocks = table.block_map_ptr, table.num_blocks
        self.flag_state = self.columns()[2] if self.slots else []
        if old_table is not None and self.flag_state:
            held = {id(t): j for j, t in enumerate(old_flag_state)}
            pairs = [(i, held[id(t)]) for i, t in enumerate(self.flag_state) if id(t) in held]
            self.table.carry_flags(old_table, [i for i, _ in pairs], [j for _, j in pairs])
        self.checked_meta = live[1]
        self.pointers = None

    def write_pointers(self, pointers):
        """The live pointers into the table, staged grads in place of theirs, where they moved."""
        if pointers == self.pointers:
            return
        n = len(self.params)
        columns = np.asarray(pointers, dtype=np.int64).reshape(-1, n)
        rows = np.zeros((POINTER_ROWS, n), dtype=np.int64)
        rows[ROWS["param"]], rows[ROWS["grad"]] = columns[0], columns[1]
        for column, (slot, _) in enumerate(self.slots, start=2):
            rows[ROWS["state"] + slot] = columns[column]
        if self.counts_steps:
            rows[ROWS["step"]] = columns[-1]
        for i, staging in self.staged.items():
            rows[ROWS["grad"], i] = staging.data_ptr()
        self.table.set_pointers(rows)
        self.pointers = pointers

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
        for i, staging in self.staged.items():
            staging.copy_(self.params[i].grad)
        if self.device.type == "cpu":
            _C.optim_step_cpu(args, torch.get_num_threads())
        else:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            _C.optim_step_cuda(args, self.device.index, stream, self.step_counter.data_ptr())
        if grad_scale is not None:  # the kernel unscaled the staged copy: hand the unscaled grad back
            for i, staging in self.staged.items():
                self.params[i].grad.copy_(staging)


def _check_has_storage(t, what):
    """A tensor subclass that wraps others (a DTensor, a FakeTensor) has no memory of its own to hand a kernel."""
    if t.layout is torch.strided and t.numel() > 0 and t.data_ptr() == 0:
        raise TypeError(f"{what} is a {type(t).__name__} without memory of its own (data_ptr() is 0); danlu's "
                        "kernels update plain dense tensors, not tensor subclasses that wrap others")


def _checked_lr(lr, group_index):
    """lr as the kernel takes it; raises what torch's constructor raises for a tensor lr that is not one value,
    and TypeError for anything that is not a number."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"param group {group_index}: Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        return lr
    return float(lr)


def _lr_for(lr, device):
    """(value, tensor): a tensor lr on the params' device is read by the kernel itself, no sync."""
    if not isinstance(lr, torch.Tensor):
        return lr, None
    if lr.device.type == "cpu" and device.type != "cpu":
        return float(lr), None
    dtype = lr.dtype if lr.dtype in (torch.float32, torch.float64) else torch.float64
    return 0.0, _on_device(lr.reshape(()), device, dtype)


def _on_device(t, device, dtype):
    if t is None or (t.device == device and t.dtype == dtype):
        return t
    return t.to(device=device, dtype=dtype)


class _GroupPlan:
    """One group's buckets, in the order they run, cached between steps while its params stay the same."""

    def __init__(self, param_ids, names, buckets):
        self.param_ids, self.names, self.buckets = param_ids, names, buckets


class FusedOptimizer(torch.optim.Optimizer):
    """Base of danlu's optimizers: a torch.optim.Optimizer whose step is one native call per bucket.

    Each danlu optimizer also derives from the torch class it replaces (``class Adam(FusedOptimizer,
    torch.optim.Adam)``): torch's constructor validates the arguments and fills the defaults, so both match
    torch exactly, and ``isinstance(opt, torch.optim.Adam)`` holds.

    Subclasses set ``_kind`` (an entry of ``danlu._C.optim_kinds``) and ``_counts_steps``, and define
    ``_state_names(group)`` (the state keys of the table's state slots) and ``_hyper(group)`` (StepArgs fields
    from the group). ``_init_state`` is theirs to override where torch's lazy state is not zeros,
    ``_optional_state`` names state that torch starts afresh when it is missing (instead of raising KeyError),
    and ``_fresh_flags`` gives the table flags of state that the commit is about to create.
    """

    _kind: int
    _counts_steps: bool = True
    _optional_state: tuple = ()
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale and found_inf

    @classmethod
    def _reject_differentiable(cls, differentiable):
        if differentiable:
            raise NotImplementedError(
                f"danlu.optim.{cls.__name__} does not support differentiable=True: its update is a fused native "
                f"kernel that autograd cannot see. Use torch.optim.{cls.__name__} for that.")

    # The plans are a cache (every step's live checks find any change anyway); dropping them where params or
    # state are replaced wholesale keeps them small.
    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._plans: dict[int, _GroupPlan] = {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._plans = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plans = {}

    def _state_names(self, group) -> tuple:
        raise NotImplementedError

    def _hyper(self, group) -> dict:
        raise NotImplementedError

    def _fresh_flags(self, group) -> int:
        return 0

    def _init_state(self, p, group) -> None:
        """torch's lazy state for p, in torch's format: zeros for each missing state and a float32 step on the
        param's device (where torch's fused optimizers keep it, and the kernel reads and counts it)."""
        state = self.state[p]
        if self._counts_steps:
            state.setdefault("step", torch.zeros((), dtype=torch.float32, device=p.device))
        for name in self._state_names(group):
            if name is not None and state.get(name) is None:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _name(self):
        return f"danlu.optim.{type(self).__name__}"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        work = []
        for index, group in enumerate(self.param_groups):  # 1. read and check everything
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                work.append((index, group, self._hyper(group), _checked_lr(group["lr"], index),
                             *self._plan(index, group, params)))
        for index, group, _, _, plan, rebuild, live in work:  # 2. commit
            self._commit(index, group, plan, rebuild, live)
        for _, _, hyper, lr, plan, _, _ in work:  # 3. run
            for bucket in plan.buckets:
                bucket.run(hyper, lr, grad_scale, found_inf)
        return loss

    # ------------------------------------------------------------------------------------------
    # Phase 1: read and check. Nothing a user can see may change here.

    def _plan(self, index, group, params):
        """(plan, {bucket: flags} of tables to build, {bucket: live pointers and meta} of tables to reuse)."""
        param_ids, names = tuple(map(id, params)), self._state_names(group)
        plan = self._plans.get(index)
        if plan is None or plan.param_ids != param_ids or plan.names != names:
            plan = _GroupPlan(param_ids, names, self._new_buckets(group, params, plan))
        rebuild, live_of = {}, {}
        for bucket in plan.buckets:
            live = bucket.read_live() if bucket.table is not None else None
            if live is not None and live[1] == bucket.checked_meta:
                if live[0] != bucket.pointers:
                    bucket.check_moved_do_not_overlap(live)
                live_of[bucket] = live
                continue
            # Every listing of a param gets the flags of its state as it is before the step: torch's SGD also
            # starts each listing of a param without a buffer from that listing's grad.
            rebuild[bucket] = [self._check_param(p, group) for p in bucket.params]
            bucket.check_existing_do_not_overlap()
        return plan, rebuild, live_of

    def _new_buckets(self, group, params, old_plan):
        """Buckets by (listing, device, dtype) in the order they run; a bucket of the old plan with the same key
        is reused, so its table's flags go on with its state tensors."""
        old = {(b.listing, b.device, b.dtype): b for b in old_plan.buckets} if old_plan else {}
        by_key: dict = {}
        listings: dict = {}
        for p in params:
            listing = listings[id(p)] = listings.get(id(p), -1) + 1
            self._check_dtype(p)
            real = REAL_OF_COMPLEX.get(p.dtype, p.dtype)
            by_key.setdefault((listing, p.device, real, p.is_complex()), []).append(p)
        buckets = []
        for (listing, device, dtype, _), items in sorted(by_key.items(), key=lambda item: item[0][0]):
            bucket = _Bucket(self, group, items, device, dtype, listing)
            previous = old.get((listing, device, dtype))
            if previous is not None:
                bucket.table, bucket.flag_state = previous.table, previous.flag_state
            buckets.append(bucket)
        return buckets

    def _check_dtype(self, p):
        if p.dtype not in DTYPE_CODES and p.dtype not in REAL_OF_COMPLEX:
            raise TypeError(f"{self._name()}: {_Where(self, p)} has dtype {p.dtype}; expected float32, float64, "
                            "float16, bfloat16, complex64 or complex128")

    def _check_param(self, p, group):
        """Everything the kernel relies on about p, its grad and its state. Returns p's table flags."""
        g, name, where = p.grad, self._name(), _Where(self, p)
        for what, t in (("", p), ("the grad of ", g)):
            _check_has_storage(t, f"{name}: {what}{where}")
        if g.is_sparse or g.layout is not torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients ({where} has a {g.layout} grad)")
        self._check_dtype(p)
        if g.dtype != p.dtype:
            raise TypeError(f"{name}: the grad of {where} has dtype {g.dtype}, but the param has {p.dtype}")
        if g.device != p.device:
            raise ValueError(f"{name}: the grad of {where} is on {g.device}, but the param is on {p.device}")
        if g.shape != p.shape:
            raise RuntimeError(f"{name}: the grad of {where} has shape {tuple(g.shape)}, but the param has shape "
                               f"{tuple(p.shape)}")
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}: {where} is on {p.device}; danlu runs on cpu and cuda devices")
        check_cuda_built(p.device)
        if not is_dense(p):
            raise ValueError(f"{name}: {where} is not dense (strides {p.stride()} for shape {tuple(p.shape)}); "
                             "danlu updates params in place and needs non-overlapping, dense storage")
        state = self.state.get(p, _NO_STATE)
        if not state:
            return self._fresh_flags(group)
        flags = 0
        for key in (n for n in self._state_names(group) if n is not None):
            if state.get(key) is None and key in self._optional_state:
                flags = self._fresh_flags(group)
            elif key not in state:  # torch's own error: it makes state only for a param that has none
                raise KeyError(key)
            else:
                self._check_state_tensor(state[key], key, p, where)
        if self._counts_steps:
            step = state["step"]
            if isinstance(step, torch.Tensor) and step.numel() != 1:
                raise RuntimeError(f"{name}: state 'step' of {where} has shape {tuple(step.shape)}; expected one "
                                   "value")
        return flags

    def _check_state_tensor(self, s, key, p, where):
        name = self._name()
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name}: state '{key}' of {where} is a {type(s).__name__}, not a tensor")
        _check_has_storage(s, f"{name}: state '{key}' of {where}")
        for what, got, want in (("shape", tuple(s.shape), tuple(p.shape)), ("dtype", s.dtype, p.dtype),
                                ("device", s.device, p.device)):
            if got != want:
                raise RuntimeError(f"{name}: state '{key}' of {where} has {what} {got}, but the param has {want}")

    # ------------------------------------------------------------------------------------------
    # Phase 2: commit

    def _commit(self, index, group, plan, rebuild, live_of):
        for bucket, flags in rebuild.items():
            for p in bucket.params:
                self._prepare_state(p, group)
            live_of[bucket] = live = bucket.read_live()
            bucket.rebuild(flags, live)
        for bucket, (pointers, _) in live_of.items():
            bucket.write_pointers(pointers)
        self._plans[index] = plan

    def _prepare_state(self, p, group):
        """Creates torch-format lazy state; puts loaded state where the kernel can use it (the param's layout, a
        float32 step on the param's device)."""
        names = [n for n in self._state_names(group) if n is not None]
        if not names and not self._counts_steps:
            return  # no state at all (SGD without momentum): torch's state stays empty too
        state = self.state[p]
        if any(state.get(n) is None for n in names) or (self._counts_steps and "step" not in state):
            self._init_state(p, group)
        for name in names:
            if not same_layout(state[name], p):
                state[name] = torch.empty_like(p).copy_(state[name])
        if self._counts_steps:
            step = state["step"]
            if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device == p.device
                    and step.dim() == 0):
                state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
