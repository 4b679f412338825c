"""Packing parameter groups into the flat ``(B, m)`` array the kernels take, and back.

A group of shape ``s`` accepts a tensor of shape ``s`` (shared by the whole batch,
its gradient summed over the batch) or ``(B, *s)`` (one value per sample).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError


def _describe(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def group_batch(group: dict, t, what: str) -> int | None:
    """Batch size of one argument (None when unbatched); raises on a shape mismatch."""
    shape = group["shape"]
    got = t.shape
    if len(got) == len(shape):
        if all(a == b for a, b in zip(got, shape)):
            return None
    elif len(got) == len(shape) + 1 and all(a == b for a, b in zip(got[1:], shape)):
        return got[0]
    shape = tuple(shape)
    got = tuple(got)
    raise InputError(
        f"{what} {group['name']!r} expects shape {_describe(shape)} (shared by the batch) or "
        f"{_describe(('B',) + shape)} (one per sample), got {_describe(got)}"
    )


def batch_size(groups, tensors, what: str) -> tuple[int, list[bool]]:
    if len(groups) == 1:
        b = group_batch(groups[0], tensors[0], what)
        return (1, [False]) if b is None else (b, [True])
    sizes = [group_batch(g, t, what) for g, t in zip(groups, tensors)]
    batched = [b is not None for b in sizes]
    distinct = {b for b in sizes if b is not None}
    if len(distinct) > 1:
        detail = ", ".join(f"{g['name']}: {b}" for g, b in zip(groups, sizes) if b is not None)
        raise InputError(f"batched {what}s disagree on the batch size ({detail}); give them one batch size")
    return (distinct.pop() if distinct else 1), batched


def to_numpy(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        if t.requires_grad:
            t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.numpy()
    return np.asarray(t)


def pack(groups, arrays, B: int, batched, m: int) -> np.ndarray:
    """Flat C-contiguous float64 ``(B, m)`` from per-group arrays."""
    if len(groups) == 1 and batched[0]:
        a = arrays[0]
        if a.dtype == np.float64 and a.flags.c_contiguous:
            return a.reshape(B, m)
    P = np.empty((B, m))
    for g, a, b in zip(groups, arrays, batched):
        size = len(g["symbols"])
        off = g["offset"]
        P[:, off:off + size] = a.reshape(B if b else 1, size)
    return P


def check_finite_dtype(t, what: str) -> None:
    if isinstance(t, torch.Tensor):
        if not (t.dtype.is_floating_point):
            raise InputError(f"{what} has dtype {t.dtype}; pass a floating-point tensor (float32 or float64)")
        if t.is_complex():
            raise InputError(f"{what} is complex; implicit layers are real-valued")
