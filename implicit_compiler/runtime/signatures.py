"""The calling convention between the runtime drivers and a system's generated kernels.

The drivers (Newton, trust region, fixed point, VJP, interior point, and their
``prange`` wrappers) are plain runtime functions, compiled once per installation
and cached with the package. A system's generated module contributes only its
expression kernels, each compiled once with one of the signatures below; a driver
receives them as first-class functions (:class:`numba.types.FunctionType`), so no
driver is compiled again for a new system and no kernel is compiled twice.

Every kernel takes, as its last argument, ``tab``: the module's flat ``int64`` table
of index families (one loop per family reads its rows from it; empty when the system
has no family).

Arrays are float64, C-contiguous; ``J`` is the dense ``(n, n)`` Jacobian (entries off
the structural pattern are written as zero); ``need`` is one boolean flag per
parameter group.
"""

from numba import types

f1 = types.float64[::1]
f2 = types.float64[:, ::1]
f3 = types.float64[:, :, ::1]
i1 = types.int64[::1]
i2 = types.int64[:, ::1]
b1 = types.boolean[::1]
s1 = types.int8[::1]

# residual(y, p, F, tab): F = F(y, p)
RESIDUAL = types.void(f1, f1, f1, i1)
# residual_jacobian(y, p, F, J, tab): F and the dense dF/dy
JACOBIAN = types.void(f1, f1, f1, f2, i1)
# residual_scale(y, p, S, tab): S_i = sum_j |dF_i/dy_j| |y_j|
SCALE = types.void(f1, f1, f1, i1)
# vjp_params(y, p, v, need, out, tab): out[c] = -sum_i v_i dF_i/dtheta_c for the needed groups
VJP_PARAMS = types.void(f1, f1, f1, b1, f1, i1)
# jvp_params(y, p, pdot, out, tab): out_i = sum_c dF_i/dtheta_c pdot_c
JVP_PARAMS = types.void(f1, f1, f1, f1, i1)


def fn(sig):
    """The first-class function type of kernels with signature ``sig``."""
    return types.FunctionType(sig)

# factor(J, piv, tab) -> smallest |pivot| (> 0), 0 for an exactly singular J, < 0 when the
# fixed-order sparse elimination rejects a pivot (the caller falls back to factor_dense)
FACTOR = types.float64(f2, i1, i1)
# solve(J, piv, b, tab) / solve_transpose(...): b <- J^{-1} b / J^{-T} b with the factors in J, piv
SOLVE = types.void(f2, i1, f1, i1)

# Optimization problems (interior point), y the variables, z = (y, lam, nu) the KKT unknowns:
# ip_eval(y, p, gradf, h, Jh, g, Jg, tab): the objective's gradient, the constraints and their Jacobians
IP_EVAL = types.void(f1, f1, f1, f1, f2, f1, f2, i1)
# ip_obj(y, p, tab) -> the objective (minimised)
IP_OBJ = types.float64(f1, f1, i1)
# ip_hess(y, lam, nu, p, H, tab): the Hessian of the Lagrangian in y
IP_HESS = types.void(f1, f1, f1, f1, f2, i1)


def decode_tables(text: str, size: int):
    """A module's ``TABLES`` from the compressed base64 text it prints them as."""
    import base64
    import zlib

    import numpy as np

    out = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8").astype(np.int64)
    if out.size != size:
        raise ValueError(f"the module's tables hold {out.size} entries, its header says {size}")
    return out

# hvp(y, p, v, ydot, w, out_y, out_p, tab): (out_y, out_p) = H (ydot, w), H the Hessian in (y, theta)
# of v.F (the second-order module, implicit_compiler.codegen.emit_second)
HVP = types.void(f1, f1, f1, f1, f1, f1, f1, i1)
