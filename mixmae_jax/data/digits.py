"""The embedded labelled dataset: scikit-learn's bundled handwritten digits.

1,797 real 8x8 greyscale scans of handwritten digits (UCI Optical Recognition of Handwritten
Digits, CC BY 4.0), shipped inside the scikit-learn wheel: no download. `prepare(data_dir)` writes
the TFDS dataset `mixmae_digits` into the TFDS data dir on first use (like the photo crops of
`embedded.py`): each scan upscaled to IMAGE_SIZE with bicubic interpolation (values 0..16 scaled
to 0..255) and repeated over three channels, with its `label` 0..9. The split is fixed: a seeded
permutation, the first NUM_TRAIN examples `train` and the other 597 `test`, every class in both;
`train_10pc` holds the first 10 `train` examples of each class (100, the few-label setting).
Pretraining reads only the images (`--config.data.source=digits`); evaluation reads the labels.
"""

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mixmae_jax.data import tf_setup  # noqa: F401  (hides GPUs from TF before tfds uses it)

NAME = "mixmae_digits"
IMAGE_SIZE = 32
NUM_TRAIN = 1200
NUM_EXAMPLES = 1797
NUM_CLASSES = 10
FEW_LABELS = 10  # per class in the `train_10pc` split
SEED = 0


def few_label_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` examples of each class, in order (the few-label split)."""
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class]
                           for c in range(NUM_CLASSES)])
    return np.sort(keep)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, IMAGE_SIZE, IMAGE_SIZE, 3), labels int64 (1797,)) in the fixed
    split order: the first NUM_TRAIN are the training split."""
    from sklearn.datasets import load_digits as sk_load_digits  # lazy: only the build needs it

    digits = sk_load_digits()
    order = np.random.default_rng(SEED).permutation(len(digits.target))
    images = []
    for scan in digits.images[order]:
        small = Image.fromarray(np.round(scan * (255.0 / 16.0)).astype(np.uint8))
        big = np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
        images.append(np.repeat(big[..., None], 3, axis=-1))
    return np.stack(images), digits.target[order].astype(np.int64)


class MixmaeDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits, upscaled, with labels (offline evaluation data)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "train_10pc: the first 10 training examples of each class."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)  # as embedded.py: no importlib_resources backport needed

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                             encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        images, labels = load_digits()
        few = few_label_indices(labels[:NUM_TRAIN], FEW_LABELS)
        return {
            "train": self._generate_examples(images[:NUM_TRAIN], labels[:NUM_TRAIN], 0),
            "train_10pc": self._generate_examples(images[few], labels[few], 0, ids=few),
            "test": self._generate_examples(images[NUM_TRAIN:], labels[NUM_TRAIN:], NUM_TRAIN),
        }

    def _generate_examples(self, images, labels, offset, ids=None):
        ids = range(offset, offset + len(labels)) if ids is None else ids
        for i, image, label in zip(ids, images, labels):
            yield f"digit_{i:04d}", {"image": image, "label": int(label)}


def prepare(data_dir: str | None = None) -> MixmaeDigits:
    """Builds the dataset into `data_dir` (TFDS default when None) unless it is there already."""
    from mixmae_jax.data.embedded import prepare_builder

    return prepare_builder(MixmaeDigits, data_dir)
