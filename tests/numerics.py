"""Assertions over the error measures and tolerances of `mixmae_jax.numerics` (the one place
they come from; the accelerator check imports them too)."""

from __future__ import annotations

from mixmae_jax.numerics import rel_err, scaled_max_err


def assert_tensors_close(got: dict, want: dict, rtol: float, what: str) -> float:
    """Every tensor of `got` within `rtol` of `want` in both measures; returns the worst error."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    errors = {k: max(rel_err(got[k], want[k]), scaled_max_err(got[k], want[k])) for k in want}
    worst = max(errors, key=errors.get)
    print(f"{what}: worst {worst} {errors[worst]:.3g} (tol {rtol:g})")
    assert errors[worst] <= rtol, f"{what}: {worst} differs by {errors[worst]:.3g} > {rtol:g}"
    return errors[worst]
