"""The labelled evaluation input (mixmae_jax/data/eval_pipeline.py): every example once, on one
process and on eight, deterministic, padding marked, the official resize + centre crop."""

import numpy as np
import pytest
import tensorflow as tf

from mixmae_jax.data import digits
from mixmae_jax.data import eval_pipeline as ep


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def builder(tfds_dir):
    """The embedded digits as labelled data."""
    import ml_collections

    return ep.labelled_data(ml_collections.ConfigDict(dict(source="digits", data_dir=tfds_dir)))


@pytest.mark.parametrize("processes", [1, 8])
def test_every_example_exactly_once_across_processes(builder, tfds_dir, processes):
    seen, labels, batches = [], {}, set()
    for p in range(processes):
        it = ep.EvalIterator(builder, "test", global_batch_size=64, image_size=32,
                             process_index=p, process_count=processes)
        n = 0
        for batch in it:
            n += 1
            assert batch["image"].shape == (64 // processes, 32, 32, 3)
            valid = batch["valid"]
            assert (batch["index"][~valid] == -1).all() and not batch["image"][~valid].any()
            seen.extend(batch["index"][valid].tolist())
            labels.update(zip(batch["index"][valid].tolist(), batch["label"][valid].tolist()))
        batches.add(n)
    assert len(batches) == 1  # every process yields the same number of batches
    assert sorted(seen) == list(range(597))
    ref = list(digits.prepare(tfds_dir).as_dataset(split="test", shuffle_files=False)
               .as_numpy_iterator())
    assert all(labels[i] == int(ex["label"]) for i, ex in enumerate(ref))


def test_the_same_batches_every_pass(builder):
    def images():
        it = ep.EvalIterator(builder, "train", global_batch_size=100, image_size=24)
        return np.concatenate([b["image"] for b in it])

    np.testing.assert_array_equal(images(), images())


def test_center_crop_resizes_the_short_side_then_cuts_the_middle():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 20:60] = 255  # a white central band, 40 wide
    encoded = tf.io.encode_png(image)
    out = ep.center_crop(encoded, 28, 0.875).numpy()  # short side 40 -> 32, width 64, crop 28
    assert out.shape == (28, 28, 3)
    # the band (16 px each side of the centre after scaling) covers the whole crop
    assert out.min() >= 250


def test_datasets_without_labels_are_refused_by_name(tmp_path):
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(source="embedded", data_dir=str(tmp_path), name="",
                                         manual_dir=None))
    with pytest.raises(ValueError, match="evaluation needs labels"):
        ep.labelled_data(cfg)
    cfg.source = "digits"
    with pytest.raises(ValueError, match="no split 'validation'"):
        ep.EvalIterator(ep.labelled_data(cfg), "validation", global_batch_size=8,
                        image_size=32)
    cfg.source = "embedded"
    from mixmae_jax.data import embedded

    embedded.prepare(str(tmp_path))
    cfg.update(source="tfds", name="mixmae_embedded")
    with pytest.raises(ValueError, match="no 'image' and 'label' features"):
        ep.labelled_data(cfg)


def test_class_folders_are_labelled_data_for_training_and_evaluation(tmp_path):
    """data.source="folder": <folder>/<split>/<class>/<image>; label i is the i-th class name;
    evaluation covers every image once with its label, training streams labels too."""
    import ml_collections
    from PIL import Image

    from mixmae_jax.data import input_pipeline as ip

    colours = {"cat": 30, "dog": 140, "emu": 250}
    for split, n in (("train", 4), ("val", 3)):
        for name, value in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(
                    tmp_path / split / name / f"{i}.png")
    cfg = ml_collections.ConfigDict(dict(source="folder", folder=str(tmp_path), split="train",
                                         image_size=16, crop_scale=(0.5, 1.0), hflip=True,
                                         shuffle_buffer=64, cache=False, skip_corrupt=False,
                                         data_dir=None, manual_dir=None, name=""))
    data = ep.labelled_data(cfg)
    assert (data.num_classes, data.splits, data.num_examples("val")) == (3, ["train", "val"], 9)
    it = ep.EvalIterator(data, "val", global_batch_size=4, image_size=16, crop_pct=1.0)
    batches = list(it)
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[valid]
    pixels = np.concatenate([b["image"][:, 8, 8, 0] for b in batches])[valid]
    assert sorted(np.concatenate([b["index"] for b in batches])[valid]) == list(range(9))
    np.testing.assert_array_equal(np.bincount(labels), [3, 3, 3])
    for label, pixel in zip(labels, pixels):  # each image carries its own folder's label
        assert abs(int(pixel) - list(colours.values())[label]) <= 2
    train = next(ip.create_train_iterator(cfg, global_batch_size=12, seed=0, with_labels=True))
    for label, pixel in zip(train["label"], train["image"][:, 8, 8, 0]):
        assert abs(int(pixel) - list(colours.values())[label]) <= 2
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "val" / "stray.png")
    with pytest.raises(ValueError, match="stray.png.*not in a class sub-folder"):
        ep.labelled_data(cfg)
