"""The one place the package imports TensorFlow.

TF only runs the host input pipeline and writes TensorBoard events here: it is kept off any GPU so
it never grabs accelerator memory that JAX needs. Import `tf` from this module rather than
importing tensorflow directly, and import it before clu (which imports TensorFlow itself).
"""

import sys

# TensorFlow imports Keras at start-up, and Keras imports scikit-learn (installed here for the
# digits) for estimator wrappers nothing here uses: ~1 s of every tool's start. Hidden while TF
# loads (Keras then leaves its wrappers out); importable again afterwards.
_hide_sklearn = "sklearn" not in sys.modules
if _hide_sklearn:
    sys.modules["sklearn"] = None
try:
    import tensorflow as tf
finally:
    if _hide_sklearn:
        del sys.modules["sklearn"]

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF was initialised before this import; its devices are fixed by now.
    pass

__all__ = ["tf"]
