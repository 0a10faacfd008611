"""Threads under pytest-xdist: each worker gets its share of the cores (`-n 2` on 2 cores: one
each), for torch, numba and the `avatar` subprocesses the tests start. Without a cap every worker
spins as many threads as there are cores and they wait on each other. A test that needs more
threads than its share starts a process of its own (`test_rasterize_parity`)."""

from __future__ import annotations

import os

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _share = str(max(1, (_cores or 1) // _workers))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = _share
