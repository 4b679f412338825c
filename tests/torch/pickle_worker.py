"""Worker of tests/torch/test_pickle.py, run in a fresh process: load pickled layers and models, call
them forward and backward, load a state_dict into a newly compiled model, and save what it got; for the
layers named in ``saved["second_order"]`` also the second order (``gradgradcheck``, a gradient penalty's
gradient, ``torch.func.jvp``), which builds their second-order modules in this process.

Usage: python -m tests.torch.pickle_worker <saved.pt> <state_dict.pt> <out.pt>
"""

import sys

import torch


def run(model, inputs):
    """Outputs and input gradients of ``model`` at ``inputs`` (tensors, float64)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = model(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.sum() for o in outs).backward()
    return [o.detach() for o in outs], [x.grad for x in xs]


def outputs(model, xs):
    out = model(*xs)
    return out if isinstance(out, tuple) else (out,)


def second_order(model, inputs):
    """``gradgradcheck`` (raises on a mismatch), the gradient of the penalty ``|d(sum out)/dx|^2`` and
    ``torch.func.jvp`` of the outputs along tangents of ones."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    assert torch.autograd.gradgradcheck(lambda *a: outputs(model, a), xs, atol=1e-5)
    grads = torch.autograd.grad(sum(o.sum() for o in outputs(model, xs)), xs, create_graph=True)
    penalty = sum((g**2).sum() for g in grads)
    dpen = torch.autograd.grad(penalty, xs)
    _, tangents = torch.func.jvp(lambda *a: outputs(model, a), tuple(x.detach() for x in inputs),
                                 tuple(torch.ones_like(x) for x in inputs))
    return [d.detach() for d in dpen], [t.detach() for t in tangents]


def main(saved_path, state_path, out_path):
    saved = torch.load(saved_path, weights_only=False)
    got = {name: run(model, saved["inputs"][name]) for name, model in saved["models"].items()}
    got["second_order"] = {name: second_order(saved["models"][name], saved["inputs"][name])
                           for name in saved.get("second_order", ())}
    # state_dict style: the model is built again here (the system compiled in this process) and the
    # saved weights loaded into it
    import implicit_compiler as ic
    from tests.torch.pt_systems import AppendixModel, appendix_system

    fresh = AppendixModel(ic.compile(appendix_system()))
    fresh.load_state_dict(torch.load(state_path))
    got["state_dict"] = run(fresh, saved["inputs"]["appendix_model"])
    got["cache_hit"] = fresh.layer.compile_report["cache_hit"]
    torch.save(got, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
