"""Beside the core: speed, scale and measurement (bench, bench_train, eval, lmms, viz, memory, gpu_check), each run
from the repository's root as `python -m tools.NAME`."""
