"""Worker of tests/torch/test_pickle.py, run in a fresh process: load pickled layers and models, call
them forward and backward, load a state_dict into a newly compiled model, and save what it got.

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


def main(saved_path, state_path, out_path):
    saved = torch.load(saved_path, weights_only=False)
    got = {name: run(model, saved["inputs"][name]) for name, model in saved["models"].items()}
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
