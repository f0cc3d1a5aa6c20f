"""danlu's benchmark harness: every kernel against PyTorch's own implementations and against the
device's copy bandwidth, measured in the same run (docs/design.md principle 7).

    python -m benchmarks [--device cpu|cuda] [--quick] [--only optim,batchnorm,dropout] [--out DIR]

Modules: harness (modes, cases, timing, the family registry), bandwidth (the copy limit), shapes
(parameter shapes of real models), report (table, files, charts, progress), and one module per
kernel family (optim, batchnorm, dropout) that turns (device, mode) into cases.
See benchmarks/README.md.
"""
