"""The one place the data package imports TensorFlow.

TF only runs the host input pipeline here: it is kept off any GPU so it never grabs accelerator
memory that JAX needs. Import `tf` from this module rather than importing tensorflow directly.
"""

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF was initialised before this import; its devices are fixed by now.
    pass

__all__ = ["tf"]
