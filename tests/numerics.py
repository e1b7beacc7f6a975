"""How the tests compare floating-point results that were not computed by the same program.

Two programs that compute the same thing (one device vs eight, JAX vs PyTorch, fused vs not) sum
in different orders, and that order also changes with the CPU (AVX2 vs AVX-512 kernels). So:

* a tensor is compared as a whole: ||a - b|| / ||b||, and its worst element against the tensor's
  scale, max|a - b| / max|b|, never element by element against itself (an element near zero
  has no relative accuracy after a reduction, whatever the code);
* tolerances are stated next to the numerics that justify them, in units of U32.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff (half an ulp at 1.0)


def as_f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().numpy()
    return np.asarray(x, np.float64)


def rel_err(a, b) -> float:
    """||a - b||_F / ||b||_F (b is the reference)."""
    a, b = as_f64(a), as_f64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def scaled_max_err(a, b) -> float:
    """max|a - b| / max|b|: the worst element, relative to the reference tensor's scale."""
    a, b = as_f64(a), as_f64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def assert_tensors_close(got: dict, want: dict, rtol: float, what: str) -> float:
    """Every tensor of `got` within `rtol` of `want` in both measures; returns the worst error."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    errors = {k: max(rel_err(got[k], want[k]), scaled_max_err(got[k], want[k])) for k in want}
    worst = max(errors, key=errors.get)
    print(f"{what}: worst {worst} {errors[worst]:.3g} (tol {rtol:g})")
    assert errors[worst] <= rtol, f"{what}: {worst} differs by {errors[worst]:.3g} > {rtol:g}"
    return errors[worst]
