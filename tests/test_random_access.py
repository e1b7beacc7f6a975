"""ArrayRecord TFDS data read by index: one global permutation per epoch, O(1) resume, and the
same global batches for any number of processes (issue 13, "resume at scale")."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from mixmae_jax.data import input_pipeline as ip

N = 48  # examples; batch 8 -> 6 steps per epoch


class IndexedImages(tfds.core.GeneratorBasedBuilder):
    """Example i: a flat 16x16 PNG of colour (i, 255 - i, 7), label i % 10."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # a builder in a test module: no metadata directory
        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(16, 16, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(N):
            image = np.zeros((16, 16, 3), np.uint8) + np.array([i, 255 - i, 7], np.uint8)
            yield i, {"image": image, "label": i % 10}


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    b = IndexedImages(data_dir=str(tmp_path_factory.mktemp("ar")), file_format="array_record")
    b.download_and_prepare()
    return b


def stream(builder, *, start_step=0, process_index=0, process_count=1, seed=0, reads=None):
    source = ip.tfds_source(builder, "train", shuffle_buffer=16, with_labels=True,
                            process_index=process_index, process_count=process_count)
    if reads is not None:  # count the examples read
        read = source.read

        def counted(indices):
            reads.append(len(indices))
            return read(indices)

        source = ip.Source(None, source.size, source.name, False, read=counted,
                           total=source.total)
    return ip.TrainIterator(source, global_batch_size=8, image_size=16, seed=seed,
                            crop_scale=(1.0, 1.0), hflip=False, process_index=process_index,
                            process_count=process_count, start_step=start_step,
                            with_labels=True)


def ids(batch):
    """The example index each image shows (its flat red channel), checked against its label."""
    index = batch["image"][:, 0, 0, 0].astype(int)
    assert np.all(batch["image"] == batch["image"][:, :1, :1]), "not a flat image"
    np.testing.assert_array_equal(batch["label"], index % 10)
    return index


def test_each_epoch_is_a_permutation_of_the_split(builder):
    it = stream(builder)
    assert it.num_examples == N and it.steps_per_epoch == N // 8
    assert "ArrayRecord" in it.source.name
    epochs = [np.concatenate([ids(next(it)) for _ in range(6)]) for _ in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(N))
    assert np.any(epochs[0] != epochs[1])  # a fresh order per epoch
    other = np.concatenate([ids(next(stream(builder, seed=1)))])
    assert np.any(other != epochs[0][:8])  # and per seed


def test_resume_is_exact_and_reads_nothing_before_its_position(builder):
    full = stream(builder)
    batches = [next(full) for _ in range(9)]
    reads = []
    resumed = stream(builder, start_step=7, reads=reads)  # inside epoch 1
    for k in (7, 8):
        batch = next(resumed)
        np.testing.assert_array_equal(batch["image"], batches[k]["image"])
        np.testing.assert_array_equal(batch["label"], batches[k]["label"])
    far = []
    next(stream(builder, start_step=100_000, reads=far))  # epoch 16,666: no skipping
    # only what the pipeline prefetches, never the 800,000 examples before the position
    assert sum(far) < 40 * 8, sum(far)


def test_global_batches_do_not_depend_on_the_process_count(builder):
    """Data order and augmentation are functions of the seed and the global position: the two
    processes' local batches of step k, side by side, are the single process's batch k."""
    one = stream(builder)
    halves = [stream(builder, process_index=j, process_count=2) for j in range(2)]
    for _ in range(7):  # across an epoch boundary
        whole = next(one)
        parts = [next(h) for h in halves]
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]),
                                      whole["image"])
        assert all(len(p["image"]) == 4 for p in parts)


def test_eval_pipeline_reads_an_array_record_split_once(builder):
    """TFDS cannot `as_dataset` ArrayRecord files: evaluation reads them in order by index."""
    from mixmae_jax.data import eval_pipeline

    data = eval_pipeline._tfds_data(builder)
    positions, examples = [], []
    for j in range(2):
        it = eval_pipeline.EvalIterator(data, "train", global_batch_size=20, image_size=16,
                                        crop_pct=1.0, process_index=j, process_count=2)
        for batch in it:
            valid = batch["valid"]
            positions += list(batch["index"][valid])
            examples += list(ids({k: batch[k][valid] for k in ("image", "label")}))
    assert sorted(positions) == list(range(N)) and sorted(examples) == list(range(N))
