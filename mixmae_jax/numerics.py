"""How results that were not computed by the same program are compared, and the limits: the one
place the tolerances of the test suite and of the accelerator check (gpu_check.py) come from.

Two programs that compute the same thing (one device vs eight, JAX vs PyTorch, fused vs not, CPU
vs GPU) sum in different orders, and that order also changes with the CPU (AVX2 vs AVX-512
kernels). So:

* a tensor is compared as a whole: ||a - b|| / ||b||, and its worst element against the tensor's
  scale, max|a - b| / max|b|, never element by element against itself (an element near zero
  has no relative accuracy after a reduction, whatever the code);
* each tolerance is stated here with the numerics that justify it, in units of U32.

numpy only: the GPU image has neither torch nor TensorFlow.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff (half an ulp at 1.0)

# -- parity with the float64 reference ---------------------------------------------------------
# The PyTorch reference also runs in float64 (the exact answer, for these purposes), and the JAX
# float32 result must be no further from it than RATIO x the reference's own float32 result is,
# with a FLOOR: parity_limit(). RATIO allows another summation order (XLA fuses and tiles
# differently from ATen); FLOOR is 16 roundings, below which the reference's own error says
# little about the machine (measured: both sides 1e-7 to 9e-7 on AVX-512). A LayerNorm eps of
# 1e-6 instead of 1e-5 moves gradients by 2e-5 to 7e-5, far above RATIO * FLOOR = 3.8e-6.
RATIO = 4.0
FLOOR = 16 * U32
# Whatever the reference does, float32 forward values (activations, the loss) and gradients
# farther than these from exact are wrong: the acceptance limits of the parity claim, and of the
# accelerator's loss and gradients against the CPU's (gpu_check parity).
FWD_TOL = 1e-5
GRAD_TOL = 1e-4

# -- the same computation, another program -------------------------------------------------
# Two float32 programs for the same math (fused or not, scanned or rematerialised, grouped or
# separate batches) each sit within ~1e-6 of the exact answer at the tiny sizes (the parity
# tests measure it against float64), so they differ by a few 1e-6 at most whatever the CPU; a
# real difference (a missing term) is O(1).
SAME_MATH_RTOL = 1e-5
# The same step on another device layout (8 devices, FSDP, 2 processes, accumulation) sums in
# another order. Gradients reduce <= 2k terms (batch x tokens) through 2 stages: sqrt(2048) *
# U32 ~ 3e-6 per reduction, a few times that through the layers, so 1e-4 is far above rounding
# and far below any real bug (a missing shard moves the gradient by ~1/8); the loss is one mean
# over ~24k squared errors of float32 activations.
DEVICES_GRAD_RTOL = 1e-4
DEVICES_LOSS_RTOL = 1e-5


def as_f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (without importing torch)
        x = x.detach().numpy()
    return np.asarray(x, np.float64)


def rel_err(a, b, floor: float = 0.0) -> float:
    """||a - b||_F / max(||b||_F, floor) (b is the reference; `floor` bounds a tensor that is
    zero in theory against another scale instead of its own rounding noise)."""
    a, b = as_f64(a), as_f64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor, 1e-300))


def scaled_max_err(a, b) -> float:
    """max|a - b| / max|b|: the worst element, relative to the reference tensor's scale."""
    a, b = as_f64(a), as_f64(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), 1e-300))


def parity_limit(reference_f32_err: float, limit: float) -> float:
    """The most a float32 result may differ from the float64 reference, given the reference's
    own float32 error: RATIO x that error (at least FLOOR), never more than `limit`."""
    return min(RATIO * max(reference_f32_err, FLOOR), limit)
