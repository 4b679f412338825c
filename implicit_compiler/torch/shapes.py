"""Packing parameter groups into the flat ``(B, m)`` array the kernels take, and back.

A group of shape ``s`` accepts a tensor of shape ``s`` (shared by the whole batch,
its gradient summed over the batch) or ``(B, *s)`` (one value per sample). As in
torch broadcasting, a batch of 1 next to a batch of ``B`` is broadcast over the
``B`` samples (its gradient, of shape ``(1, *s)``, is summed over them).

The packed array is always the layer's own copy: the backward pass reads it, so
it must not change when the caller's tensor does (``x.data.add_`` bypasses
autograd's version counters; a view of the caller's memory would change the
gradient silently).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError

# dtypes NumPy reads directly; any other floating dtype (bfloat16) goes through float64
_NUMPY_FLOATS = (torch.float64, torch.float32, torch.float16)


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
    """``(B, batched)``: the call's batch size and which arguments carry a batch dimension.

    Batch sizes must agree, except that a batch of 1 broadcasts against any other
    (as in torch); a batched argument whose batch is smaller than ``B`` is broadcast.
    """
    if len(groups) == 1:
        b = group_batch(groups[0], tensors[0], what)
        return (1, [False]) if b is None else (b, [True])
    sizes = [group_batch(g, t, what) for g, t in zip(groups, tensors)]
    batched = [b is not None for b in sizes]
    # a list, not a set: under torch.compile with dynamic shapes the sizes are SymInts (unhashable)
    distinct = []
    for b in sizes:
        if b is not None and b != 1 and not any(b == d for d in distinct):
            distinct.append(b)
    if len(distinct) > 1:
        detail = ", ".join(f"{g['name']}: {b}" for g, b in zip(groups, sizes) if b is not None)
        raise InputError(
            f"batched {what}s disagree on the batch size ({detail}); give them one batch size "
            f"(a batch of 1 broadcasts against any other)"
        )
    if distinct:
        return distinct[0], batched
    return 1, batched


def to_numpy(t) -> np.ndarray:
    """A NumPy view or copy of ``t`` (a tensor on any device, or anything ``np.asarray`` takes)."""
    if isinstance(t, torch.Tensor):
        if t.requires_grad:
            t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype not in _NUMPY_FLOATS and t.dtype.is_floating_point:
            t = t.to(torch.float64)  # bfloat16 has no NumPy dtype; it is exact in float64
        return t.numpy()
    return np.asarray(t)


def pack(groups, arrays, B: int, batched, m: int) -> np.ndarray:
    """Flat C-contiguous float64 ``(B, m)`` from per-group arrays: always a new array
    (never a view of the caller's memory; see the module docstring)."""
    if len(groups) == 1 and batched[0]:
        # np.array copies: one memcpy, where a float32 input is converted anyway
        return np.array(arrays[0], dtype=np.float64, order="C").reshape(B, m)
    P = np.empty((B, m))
    for g, a in zip(groups, arrays):
        size = len(g["symbols"])
        off = g["offset"]
        # rows: B (per sample) or 1 (shared, or a batch of 1 broadcast over the batch)
        P[:, off:off + size] = a.reshape(-1, size)
    return P


def check_tensor(t, what: str) -> None:
    """A parameter of the torch layer: a real floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise InputError(
            f"{what} is a {type(t).__name__}; the torch layer takes tensors: pass "
            f"torch.as_tensor(value, dtype=torch.float64) (or call layer.solve(...) with NumPy arrays)"
        )
    check_finite_dtype(t, what)


def check_finite_dtype(t, what: str) -> None:
    """Reject integer, bool and complex tensors with an error naming the argument."""
    if isinstance(t, torch.Tensor):
        if t.is_complex():
            raise InputError(f"{what} has dtype {t.dtype}; implicit layers are real-valued: pass a real "
                             f"floating-point tensor")
        if not t.dtype.is_floating_point:
            raise InputError(f"{what} has dtype {t.dtype}; pass a floating-point tensor (float64, float32, "
                             f"float16 or bfloat16), e.g. t.to(torch.float64)")


def as_array(value, what: str) -> np.ndarray:
    """``value`` (a tensor, array, list or number) as a float64 array; raises naming ``what``."""
    try:
        a = to_numpy(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what}: cannot read a {type(value).__name__} as an array of numbers ({e})") from None
    return check_array(a, what)


def check_array(a: np.ndarray, what: str, allow_int: bool = True) -> np.ndarray:
    """A NumPy argument as float64 (integers converted); other dtypes raise naming ``what``."""
    kind = a.dtype.kind
    if kind == "f" or (allow_int and kind in "iu"):
        return a if a.dtype == np.float64 else a.astype(np.float64)
    if kind == "c":
        raise InputError(f"{what} is complex ({a.dtype}); implicit layers are real-valued")
    raise InputError(f"{what} has dtype {a.dtype}; pass real numbers (a float array or tensor)")
