"""May this process start Numba's worker threads?

Large batches run on Numba's ``prange`` drivers. Numba's default threading layer on Linux
is GNU OpenMP, which cannot survive ``fork``: a child forked after its parent started the
OpenMP threads is terminated ("fork() called from a process already using GNU OpenMP, this
is unsafe") the moment it starts threads itself — as in ``torch.multiprocessing`` or a
``DataLoader`` worker with the default ``fork`` start method. So this module records when a
parallel driver first ran, and a process forked after that runs every batch on its calling
thread (the same kernels, serially: same results, no threads). Processes started with
``spawn`` or ``forkserver`` are unaffected.
"""

from __future__ import annotations

import os

_state = {"started": False, "layer": None, "forked_after_start": False}


def parallel_allowed() -> bool:
    """False in a process forked after its parent started OpenMP threads."""
    return not _state["forked_after_start"]


def note_started() -> None:
    """Record that a parallel driver ran in this process (call after it returned)."""
    if not _state["started"]:
        _state["started"] = True
        try:
            import numba

            _state["layer"] = numba.threading_layer()
        except (ValueError, ImportError):  # no parallel region ran after all
            _state["started"] = False


def _after_fork_in_child() -> None:
    if _state["started"] and _state["layer"] == "omp":
        _state["forked_after_start"] = True


os.register_at_fork(after_in_child=_after_fork_in_child)
