"""Input pipelines: embedded dataset, sources, determinism, exact resume, per-process split,
corrupt images, batch-size checks, and the RandomResizedCrop window sampler."""

import io
import socket
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from recipes import mixmim_config

from mixmae_jax.data import augment, embedded
from mixmae_jax.data import input_pipeline as ip
from mixmae_jax.data.tf_setup import tf

# Folder images are a flat colour plus mild noise: any crop of one keeps its mean colour, so a
# batch image tells which file it came from, whatever the crop and flip.
COLOURS = np.array(
    [(r, g, b) for r in (30, 110, 190) for g in (30, 110, 190) for b in (30, 110, 190)]
)
FORMATS = ("png", "jpg", "bmp", "webp", "gif", "PNG")


def data_cfg(**overrides):
    c = mixmim_config().data
    # A buffer as large as the data: TFDS sources are then read as one chunk (fast to open).
    c.update(dict(image_size=32, shuffle_buffer=4096) | overrides)
    return c


def write_images(root, n, start=0):
    """n images, colour-coded, varied sizes and formats, in two class folders and flat."""
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        h, w = (40, 52) if i % 2 else (52, 40)
        image = np.clip(COLOURS[i] + rng.integers(-10, 11, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / ("", "class_a", "class_b")[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img_{i:02d}.{FORMATS[i % len(FORMATS)]}")


def identify(images):
    """Index of the colour each image shows."""
    means = images.reshape(len(images), -1, 3).mean(1)
    return np.abs(means[:, None, :] - COLOURS[None]).sum(-1).argmin(1)


def take(it, n):
    return [next(it)["image"] for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    write_images(root, 24)
    (root / "labels.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def embedded_builder(tmp_path_factory):
    """Built once, offline (sockets refused), into a data dir holding a killed build's leftovers."""
    data_dir = tmp_path_factory.mktemp("tfds")
    (data_dir / embedded.NAME / "incomplete.KILLED_1.0.0").mkdir(parents=True)

    def no_network(*args, **kwargs):
        raise OSError("network access during the embedded build")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        start = time.perf_counter()
        builder = embedded.prepare(str(data_dir))
        print(f"embedded build: {time.perf_counter() - start:.1f} s")
    return builder


# ------------------------------------------------------------------------------------------------
# Embedded dataset
# ------------------------------------------------------------------------------------------------


def test_embedded_builds_real_crops(embedded_builder):
    splits = embedded_builder.info.splits
    assert splits["train"].num_examples == embedded.NUM_TRAIN
    assert splits["validation"].num_examples == embedded.NUM_VALIDATION
    train = list(embedded_builder.as_dataset(split="train").take(64).as_numpy_iterator())
    val = list(embedded_builder.as_dataset(split="validation").take(64).as_numpy_iterator())
    images = np.stack([ex["image"] for ex in train])
    assert images.shape == (64, embedded.CROP_SIZE, embedded.CROP_SIZE, 3)
    assert images.dtype == np.uint8
    assert images.reshape(64, -1).std(1).min() > 2.0  # real texture, not flat fills
    assert len({im.tobytes() for im in images}) == 64
    assert {ex["photo"].decode() for ex in train} == set(embedded.TRAIN_PHOTOS)
    assert {ex["photo"].decode() for ex in val} <= set(embedded.VALIDATION_PHOTOS)
    # prepare() again reuses the build.
    assert embedded.prepare(embedded_builder.data_dir_root).is_prepared()


def test_embedded_interrupted_build_leaves_no_dataset(tmp_path, monkeypatch):
    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "load_photo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.prepare(str(tmp_path))
    assert not embedded.MixmaeEmbedded(data_dir=str(tmp_path)).is_prepared()
    assert not list((tmp_path / embedded.NAME).glob("*"))  # temporary build dir removed


def test_embedded_source_batches(embedded_builder):
    cfg = data_cfg(source="embedded", data_dir=str(embedded_builder.data_dir_root))
    it = ip.create_train_iterator(cfg, global_batch_size=16, seed=0)
    (images,) = take(it, 1)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert it.num_examples == embedded.NUM_TRAIN
    assert it.steps_per_epoch == embedded.NUM_TRAIN // 16
    assert images.reshape(16, -1).std(1).min() > 2.0


@pytest.mark.slow
def test_digits_are_the_real_scans_with_their_labels_in_a_fixed_split(tmp_path):
    """1,200 + 597 examples, every class in both splits, the images are sklearn's scans
    (upscaled), and the pretraining pipeline reads them (labels ignored)."""
    from sklearn.datasets import load_digits

    from mixmae_jax.data import digits

    builder = digits.prepare(str(tmp_path))
    splits = builder.info.splits
    assert (splits["train"].num_examples, splits["test"].num_examples) == (1200, 597)
    train = list(builder.as_dataset(split="train").as_numpy_iterator())
    test = list(builder.as_dataset(split="test").as_numpy_iterator())
    for part in (train, test):
        assert set(int(ex["label"]) for ex in part) == set(range(10))
    sk = load_digits()
    images, labels = digits.load_digits()
    assert sorted(labels.tolist()) == sorted(sk.target.tolist())
    # The stored split is the seeded permutation of sklearn's scans, stored losslessly; each
    # image's 4x4 block means are its scan (0..16 scale) up to the bicubic ringing.
    order = np.random.default_rng(digits.SEED).permutation(len(sk.target))
    stored = {ex["image"].tobytes(): int(ex["label"]) for ex in train}
    small = images[..., 0].astype(np.float64).reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    small = small.reshape(-1, 64) * 16.0 / 255.0
    scans = sk.images.reshape(-1, 64)
    nearest = np.argmin(((small[:, None] - scans[None]) ** 2).sum(-1), axis=1)
    for i in range(1200):
        assert stored[images[i].tobytes()] == labels[i] == sk.target[order[i]]
        # the scan nearest to its 4x4 block means is its own (or an identical copy)
        np.testing.assert_array_equal(scans[nearest[i]], scans[order[i]])
    assert len({ex["image"].tobytes() for ex in train + test}) > 1780  # a few scans repeat
    cfg = data_cfg(source="digits", data_dir=str(tmp_path), image_size=32)
    it = ip.create_train_iterator(cfg, global_batch_size=16, seed=0)
    (batch,) = take(it, 1)
    assert batch.shape == (16, 32, 32, 3) and it.num_examples == 1200


# ------------------------------------------------------------------------------------------------
# Sources and the stream
# ------------------------------------------------------------------------------------------------


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=16):
        it = ip.create_train_iterator(
            data_cfg(source="tfds", name="cifar10", image_size=24),
            global_batch_size=8,
            seed=0,
            process_index=1,
            process_count=2,
        )
    batch = next(it)
    assert set(batch) == {"image"}
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
    assert it.steps_per_epoch == it.num_examples // 8


def test_deterministic_given_seed(embedded_builder):
    cfg = data_cfg(source="embedded", data_dir=str(embedded_builder.data_dir_root))

    def first_batches(seed):
        return np.stack(take(ip.create_train_iterator(cfg, global_batch_size=16, seed=seed), 2))

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5


@pytest.mark.parametrize("source", ["folder", "embedded"])
def test_resume_is_exact(source, folder, embedded_builder):
    """start_step=k yields batches k, k+1 of the uninterrupted stream. Folder: 24 images, batch
    10, so batch 2 spans the epoch boundary and batch 5 starts inside epoch 2. Embedded
    validation split: 256 images, batch 64, so batch 3 ends epoch 0 and batch 4 starts epoch 1;
    its buffer of 64 makes it read as 4 randomly interleaved chunks."""
    cfg = data_cfg(
        source=source,
        folder=str(folder),
        data_dir=str(embedded_builder.data_dir_root),
        split="validation",
        shuffle_buffer=64,
    )
    batch = 10 if source == "folder" else 64
    starts = (2, 5) if source == "folder" else (3, 4)
    full = take(ip.create_train_iterator(cfg, global_batch_size=batch, seed=3), max(starts) + 2)
    for k in starts:
        it = ip.create_train_iterator(cfg, global_batch_size=batch, seed=3, start_step=k)
        for j, images in enumerate(take(it, 2)):
            np.testing.assert_array_equal(images, full[k + j], err_msg=f"start {k}, batch {j}")
        assert it.step == k + 2


def test_folder_lists_all_formats_and_layouts(folder):
    paths = ip.list_images(str(folder))
    assert len(paths) == 24 and not any(p.endswith(".txt") for p in paths)
    it = ip.create_train_iterator(
        data_cfg(source="folder", folder=str(folder)), global_batch_size=24, seed=0
    )
    assert sorted(identify(next(it)["image"])) == list(range(24))  # one epoch, each file once
    assert it in ip._OPEN  # until closed, the interpreter's exit closes it
    it.close()  # the pipeline's threads stop now
    assert it not in ip._OPEN
    with pytest.raises(StopIteration):
        next(it)


def test_per_process_split_is_disjoint_and_covers(folder, embedded_builder):
    cfg = data_cfg(source="folder", folder=str(folder))
    seen = []
    for p in range(2):
        it = ip.create_train_iterator(
            cfg, global_batch_size=8, seed=0, process_index=p, process_count=2
        )
        assert it.num_examples == 24 and it.steps_per_epoch == 3
        seen.append([identify(images) for images in take(it, 3)])  # one epoch of 3 x 4
    assert not set(seen[0][0]) & set(seen[1][0])  # first batches disjoint
    union = np.concatenate(seen[0] + seen[1])
    assert sorted(union) == list(range(24))  # together: every image exactly once
    # TFDS source: equal, disjoint shares (each read as 2 interleaved chunks) covering the split.
    keys = []
    for p in range(2):
        source = ip.tfds_source(
            embedded_builder, "validation", shuffle_buffer=64, process_index=p, process_count=2
        )
        keys.append([k for k, _, _ in source.epoch(seed(0)).as_numpy_iterator()])
    assert len(keys[0]) == len(keys[1]) == embedded.NUM_VALIDATION // 2
    assert len(set(keys[0]) | set(keys[1])) == embedded.NUM_VALIDATION


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def corrupt_folder(tmp_path):
    write_images(tmp_path, 4)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return tmp_path


def test_corrupt_image_is_named(corrupt_folder):
    it = ip.create_train_iterator(
        data_cfg(source="folder", folder=str(corrupt_folder)), global_batch_size=4, seed=0
    )
    with pytest.raises(ip.CorruptImageError, match="broken.jpg"):
        take(it, 3)  # 12 positions: the broken file comes up at least twice


def test_corrupt_image_skipped_and_counted(corrupt_folder):
    it = ip.create_train_iterator(
        data_cfg(source="folder", folder=str(corrupt_folder), skip_corrupt=True),
        global_batch_size=4,
        seed=0,
    )
    (images,) = take(it, 1)
    assert sorted(identify(images)) == [0, 1, 2, 3]  # the four good images of epoch 0
    # Seed 0 orders the broken file before the last good one in epoch 0, so it was skipped.
    assert it.corrupt_count() == 1
    take(it, 2)
    # Counted once per epoch: surely in epochs 0 and 1; in epoch 2 only if it came before the
    # last good image yielded.
    assert it.corrupt_count() in (2, 3)


def test_batch_size_errors(folder):
    cfg = data_cfg(source="folder", folder=str(folder))
    with pytest.raises(ValueError, match=r"folder.*batch_size=32"):
        ip.create_train_iterator(cfg, global_batch_size=32, seed=0)  # 24 images
    with pytest.raises(ValueError, match=r"batch_size=30.*process count \(4\)"):
        ip.create_train_iterator(cfg, global_batch_size=30, seed=0, process_count=4)


# ------------------------------------------------------------------------------------------------
# Augmentation
# ------------------------------------------------------------------------------------------------


def seed(i):
    return tf.constant([i, 7], tf.int64)


def sample_windows(n, h, w, **kwargs):
    """Windows for seeds 0..n-1, in one traced call."""
    seeds = tf.stack([seed(i) for i in range(n)])

    @tf.function
    def windows(seeds):
        return tf.map_fn(
            lambda s: augment.sample_crop_window(s, h, w, **kwargs),
            seeds,
            fn_output_signature=tf.int32,
        )

    return windows(seeds).numpy()


def test_crop_window_respects_scale_and_ratio():
    h, w = 300, 200
    windows = sample_windows(1000, h, w)
    top, left, ch, cw = windows.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()
    area = ch * cw / (h * w)
    ratio = cw / ch
    tol = 0.02  # sides are rounded to whole pixels
    assert area.min() >= 0.2 - tol and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 - tol and ratio.max() <= 4 / 3 + tol
    # Target areas are drawn uniformly on [0.2, 1] (large ones are redrawn when they do not fit):
    # ~2% of 1000 draws fall below 0.215, none could with a lower bound of 0.25 (rounding the
    # sides moves an area by < 0.01 here).
    assert area.min() < 0.215 and area.max() > 0.85  # a 3:4 crop covers at most 0.89 of 2:3
    # Narrower scale bounds are respected too.
    small = sample_windows(50, h, w, scale=(0.2, 0.3))
    assert (small[:, 2] * small[:, 3] / (h * w)).max() <= 0.3 + tol


def test_pipeline_crops_with_the_configured_scale(folder, monkeypatch):
    """config.data.crop_scale reaches the crop (traced once, when the pipeline is built)."""
    seen = []
    real = augment.random_resized_crop_flip

    def spy(encoded, seed, size, scale, hflip, randaug=None):
        seen.append((size, tuple(scale), hflip, randaug))
        return real(encoded, seed, size, scale, hflip, randaug)

    monkeypatch.setattr(augment, "random_resized_crop_flip", spy)
    cfg = data_cfg(source="folder", folder=str(folder), crop_scale=(0.35, 0.9), hflip=False)
    it = ip.create_train_iterator(cfg, global_batch_size=4, seed=0)
    assert next(it)["image"].shape == (4, 32, 32, 3)
    assert seen and set(seen) == {(32, (0.35, 0.9), False, None)}


def test_crop_window_fallback_is_torchvision_centre_crop():
    # No attempt fits a 10 x 1000 strip: centre crop of height 10 at the widest ratio, 4/3.
    np.testing.assert_array_equal(augment.sample_crop_window(seed(0), 10, 1000), [0, 493, 10, 13])
    np.testing.assert_array_equal(augment.sample_crop_window(seed(0), 1000, 10), [493, 0, 13, 10])


def encode(image, fmt):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def test_random_resized_crop_output_and_fused_jpeg_crop():
    rng = np.random.default_rng(0)
    image = (rng.random((60, 80, 3)) * 64 + np.linspace(0, 190, 80)[None, :, None]).astype(np.uint8)
    for fmt in ("PNG", "JPEG"):
        out = augment.random_resized_crop_flip(encode(image, fmt), seed(1), 24)
        assert out.shape == (24, 24, 3) and out.dtype == tf.uint8
        np.testing.assert_array_equal(
            out, augment.random_resized_crop_flip(encode(image, fmt), seed(1), 24)
        )
    # The fused JPEG decode-and-crop cuts the same window as decode-then-crop.
    jpeg = encode(image, "JPEG")
    fused = augment.decode_crop(jpeg, seed(2)).numpy().astype(int)
    top, left, ch, cw = augment.sample_crop_window(seed(2), 60, 80).numpy()
    full = tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(int)
    assert fused.shape == (ch, cw, 3)
    assert np.abs(fused - full[top : top + ch, left : left + cw]).mean() < 2.0
    # Flips happen about half the time.
    flips = [
        bool(
            (
                augment.random_resized_crop_flip(jpeg, seed(i), 16, scale=(1.0, 1.0))
                != augment.random_resized_crop_flip(
                    jpeg, seed(i), 16, scale=(1.0, 1.0), hflip=False
                )
            )
            .numpy()
            .any()
        )
        for i in range(20)
    ]
    assert 3 <= sum(flips) <= 17


@pytest.mark.slow
def test_labelled_stream_with_randaugment(monkeypatch):
    """Fine-tuning's stream: labels beside the images, RandAugment's policy parsed and applied
    after the crop (traced once), the same batches for the same seed."""
    seen = []
    real = augment.random_resized_crop_flip

    def spy(encoded, seed, size, scale, hflip, randaug=None):
        seen.append(randaug)
        return real(encoded, seed, size, scale, hflip, randaug)

    monkeypatch.setattr(augment, "random_resized_crop_flip", spy)
    cfg = data_cfg(source="digits", split="train_10pc", image_size=32)
    batches = []
    for _ in range(2):
        it = ip.create_train_iterator(cfg, global_batch_size=10, seed=3, with_labels=True,
                                      randaug="rand-m9-mstd0.5-inc1")
        batches.append(next(it))
    assert seen[0] == {"n": 2, "m": 9.0, "mstd": 0.5, "inc": 1.0}
    a, b = batches
    assert set(a) == {"image", "label"} and a["label"].dtype == np.int32
    assert 0 <= a["label"].min() and a["label"].max() < 10
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    with pytest.raises(ValueError, match="no 'label' feature"):
        ip.create_train_iterator(data_cfg(source="embedded", image_size=32),
                                 global_batch_size=8, seed=0, with_labels=True)
