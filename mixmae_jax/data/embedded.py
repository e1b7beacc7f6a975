"""The embedded demo dataset: random crops of the real photos bundled in the scikit-image wheel.

Needs no network and no download: the photos ship inside scikit-image (never the pooch-fetched
ones). `prepare(data_dir)` writes the TFDS dataset `mixmae_embedded` (tfrecord) into the TFDS data
dir on first use and returns the builder; later calls reuse it. TFDS builds into a temporary
`incomplete.*` directory and renames it when done, so an interrupted build leaves no half-written
dataset behind (the next call starts over).

Train crops come from five photos, validation crops from two others, so the splits share no pixels.
Crops are square windows of random size, downscaled to CROP_SIZE, deterministic given SEED.
"""

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mixmae_jax.data import tf_setup  # noqa: F401  (hides GPUs from TF before tfds uses it)

NAME = "mixmae_embedded"
CROP_SIZE = 96  # stored size; leaves room for the pipeline's random resized crop to 64
NUM_TRAIN = 3072
NUM_VALIDATION = 256
SEED = 0
# scikit-image photo loaders (all bundled in the wheel), colour, CC0 / public domain.
TRAIN_PHOTOS = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
VALIDATION_PHOTOS = ("coffee", "retina")


def load_photo(name: str) -> np.ndarray:
    """One bundled scikit-image photo as uint8 [H, W, 3]."""
    import skimage.data  # lazy: only building the dataset needs it

    image = getattr(skimage.data, name)()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
    return image


def random_crops(photos, num: int, size: int, seed: int):
    """Yields (photo name, uint8 [size, size, 3]) crops, cycling over the photos.

    Each crop is a square window with side in [size, min(H, W) / 2] (at least `size`), so crops
    vary in scale as well as position, downscaled with antialiased bicubic.
    """
    rng = np.random.default_rng(seed)
    images = [load_photo(p) for p in photos]
    for i in range(num):
        k = i % len(photos)
        image = images[k]
        h, w = image.shape[:2]
        side = int(rng.integers(size, max(size, min(h, w) // 2) + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(image[top : top + side, left : left + side])
        if side != size:
            crop = crop.resize((size, size), Image.Resampling.BICUBIC)
        yield photos[k], np.asarray(crop)


class MixmaeEmbedded(tfds.core.GeneratorBasedBuilder):
    """Random crops of scikit-image's bundled colour photos (offline demo data)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default needs the `importlib_resources` backport (not in our stack) for builders
        # that live inside a package; the answer is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Explicit: the default reads metadata files next to the module, which do not exist.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(CROP_SIZE, CROP_SIZE, 3), encoding_format="jpeg"
                    ),
                    "photo": tfds.features.Text(),
                }
            ),
            homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples(TRAIN_PHOTOS, NUM_TRAIN, SEED),
            "validation": self._generate_examples(VALIDATION_PHOTOS, NUM_VALIDATION, SEED + 1),
        }

    def _generate_examples(self, photos, num, seed):
        for i, (photo, crop) in enumerate(random_crops(photos, num, CROP_SIZE, seed)):
            yield f"{photo}_{i:05d}", {"image": crop, "photo": photo}


def prepare_builder(builder_cls, data_dir: str | None = None):
    """Builds an embedded dataset into `data_dir` (TFDS default when None) unless it is there
    already; shared by the photo crops and the digits."""
    builder = builder_cls(data_dir=data_dir)
    try:
        builder.download_and_prepare()
    except OSError:
        # Another process finished the same build first and its rename won; use its copy.
        builder = builder_cls(data_dir=data_dir)
        if not builder.is_prepared():
            raise
    return builder


def prepare(data_dir: str | None = None) -> MixmaeEmbedded:
    """Builds the dataset into `data_dir` (TFDS default when None) unless it is there already."""
    return prepare_builder(MixmaeEmbedded, data_dir)
