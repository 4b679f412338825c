"""The showcase examples in examples/ run (quick mode) and do what their docstrings say.

Each example's ``main(quick=True, out=...)`` trains for a few steps and returns numbers; the plot
is written to a temporary directory when matplotlib is installed.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def run(name, tmp_path):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    module = importlib.import_module(name)
    assert module.__doc__ and "Run:" in module.__doc__
    result = module.main(quick=True, out=str(tmp_path))
    if HAVE_MPL:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    return result


def test_qp_digits(tmp_path):
    pytest.importorskip("sklearn")
    r = run("qp_digits", tmp_path)
    assert r["last_loss"] < 0.6 * r["first_loss"]
    assert r["train_accuracy"] > 0.6 and r["test_accuracy"] > 0.6  # chance is 0.1


def test_spectral_matching(tmp_path):
    r = run("spectral_matching", tmp_path)
    for name in ("PI-5", "PI-10", "SM", "SMAC"):  # every layer trains: held-out PCK rises
        assert r[name]["pck_after"] > r[name]["pck_before"] + 0.1, name
        w = r[name]["weights"]
        assert w[:2].mean() > 2 * w[2:].mean(), name  # the informative channels gain weight
    assert r["SMAC"]["failed_fraction"] < 0.05  # the interior point solves SMAC (redundant sum dropped)


def test_normalized_cuts(tmp_path):
    r = run("normalized_cuts", tmp_path)
    assert r["loss_after"] < 0.2 * r["loss_before"]
    assert r["iou_test_after"] > 0.9 and r["iou_test_after"] > r["iou_test_before"] + 0.3
    assert r["intensity_weight"] > 10 * r["noise_weight"]


def test_level_set(tmp_path):
    r = run("level_set", tmp_path)
    assert r["loss_last"] < 0.05 * r["loss_first"]
    assert r["rms_train_after"] < 0.2 * r["rms_train_before"]
    assert r["rms_test_after"] < 0.2 * r["rms_test_before"]  # held-out rays: the surface itself fits


def test_ode_layer(tmp_path):
    r = run("ode_layer", tmp_path)
    assert r["loss_last"] < 1e-3 * r["loss_first"]
    assert r["a"] == pytest.approx(r["true_a"], rel=0.03)
    assert r["c"] == pytest.approx(r["true_c"], rel=0.05)


def test_ode_robertson(tmp_path):
    r = run("ode_robertson", tmp_path)
    assert r["loss_last"] < 2e-3 * r["loss_first"]
    for k, true in zip(r["k"], r["true_k"]):
        assert k == pytest.approx(true, rel=0.03)
