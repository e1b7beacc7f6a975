"""The labelled evaluation input (mixmae_jax/data/eval_pipeline.py): every example once, on one
process and on eight, deterministic, padding marked, the official resize + centre crop."""

import numpy as np
import pytest
import tensorflow as tf

from mixmae_jax.data import digits
from mixmae_jax.data import eval_pipeline as ep


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    return digits.prepare(str(tmp_path_factory.mktemp("tfds")))


@pytest.mark.parametrize("processes", [1, 8])
def test_every_example_exactly_once_across_processes(builder, processes):
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
    ref = list(builder.as_dataset(split="test", shuffle_files=False).as_numpy_iterator())
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

    cfg = ml_collections.ConfigDict(dict(source="embedded", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="evaluation needs labels"):
        ep.labelled_builder(cfg)
    with pytest.raises(ValueError, match="no split 'validation'"):
        ep.EvalIterator(digits.prepare(str(tmp_path)), "validation", global_batch_size=8,
                        image_size=32)
