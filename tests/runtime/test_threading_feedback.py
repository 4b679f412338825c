"""Which batches go to Numba's threads: the serial cost decides, and a threaded run found no faster
per sample than serial (threads stalled on a busy machine) sends batches of its size back to the
serial kernels until a periodic re-probe."""

import time

import pytest

from implicit_compiler.runtime import threads
from implicit_compiler.runtime.kernels import Kernels


@pytest.fixture
def k(monkeypatch):
    monkeypatch.setattr(threads, "parallel_allowed", lambda: True)
    obj = Kernels.__new__(Kernels)  # the decision logic only: no module needed
    obj._cost, obj._tcost, obj._since_probe, obj._forced = {}, {}, {}, None
    return obj


def ran(k, key, B, seconds, threaded=False):
    k.measured(key, B, time.perf_counter() - seconds, threaded=threaded)


def test_unmeasured_kernels_go_threaded_only_for_very_large_batches(k):
    assert not k.threaded("newton", 1000, 8)
    assert k.threaded("newton", Kernels.UNMEASURED_PARALLEL_BATCH, 8)


def test_serial_cost_decides(k):
    ran(k, "newton", 100, 100 * 1e-6)  # 1 µs per sample
    assert not k.threaded("newton", 100, 8)  # 100 µs of work: not worth the threads
    assert k.threaded("newton", 1000, 8)  # 1 ms of work
    assert not k.threaded("newton", 1000, 2000)  # below the user's parallel_threshold


def test_a_slow_threaded_run_sends_batches_back_to_serial_then_reprobes(k):
    ran(k, "vjp", 1000, 1000 * 1e-6)  # serial: 1 µs per sample
    assert k.threaded("vjp", 1000, 8)
    ran(k, "vjp", 1000, 1000 * 5e-6, threaded=True)  # stalled threads: 5 µs per sample
    decisions = [k.threaded("vjp", 1000, 8) for _ in range(Kernels.REPROBE_EVERY)]
    assert decisions == [False] * (Kernels.REPROBE_EVERY - 1) + [True]  # serial, then one probe
    ran(k, "vjp", 1000, 1000 * 0.4e-6, threaded=True)  # the probe was fast: threads again
    assert all(k.threaded("vjp", 1000, 8) for _ in range(5))


def test_a_slow_small_threaded_batch_does_not_keep_a_much_larger_one_serial(k):
    ran(k, "newton", 1000, 1000 * 1e-6)
    ran(k, "newton", 300, 300 * 3e-6, threaded=True)  # thread start dominates a small batch
    assert not k.threaded("newton", 1000, 8)
    assert k.threaded("newton", 5000, 8)


def test_small_and_warm_up_runs_are_not_measured(k):
    ran(k, "newton", 8, 1.0)
    assert "newton" not in k._cost
    k._forced = True
    ran(k, "newton", 1000, 1.0, threaded=True)
    assert "newton" not in k._tcost
