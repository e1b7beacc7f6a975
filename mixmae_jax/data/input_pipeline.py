"""Training input pipeline: TFDS, an image folder or the embedded demo set -> uint8 batches.

One tf.data pipeline for every source:

    source: this process's share of (key, encoded image or path) records
      -> epoch e in an order drawn from a seed derived from (seed, process, e); each example
         numbered with its stream position p = e * n + i
      -> skip to the resume position             (cheap: nothing is decoded yet)
      -> decode + RandomResizedCrop + flip, keyed by (seed, process, p)
      -> batch (drop remainder) -> prefetch

TFDS shares are read as a few contiguous chunks, randomly interleaved each epoch, then through a
shuffle buffer (`data.shuffle_buffer`); folder shares (paths only) are fully shuffled per epoch.
A TFDS dataset prepared as ArrayRecord (`file_format="array_record"`) is read by index instead:
one global permutation per epoch (`tf.random.experimental.index_shuffle`), the same for any
number of processes, and a resume reads nothing before its position -- O(1) at ImageNet scale,
where skipping through TFRecord files reads every record before the position.

Every random choice is a function of the seed and the stream position, so the batches are
deterministic and the stream restarts exactly at any step: `start_step=k` yields what an
uninterrupted run yields from its k-th batch on, without decoding anything before it.

Each process reads a disjoint 1/process_count share of equal size (a few trailing examples are
dropped so all processes agree on epoch length). Images stay uint8; the device normalises.
"""

import atexit
import dataclasses
import time
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from mixmae_jax.data import augment
from mixmae_jax.data.tf_setup import tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_ALG = "philox"
# A TFDS share larger than the shuffle buffer is read as up to this many contiguous chunks,
# drawn from in a fresh random interleave each epoch: sequential reads, but a global mix.
_MAX_CHUNKS = 16


class CorruptImageError(ValueError):
    """An image in the training data cannot be read or decoded."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A source, reduced to what the pipeline needs: this process's share in per-epoch order.

    epoch: stateless seed (int64 [2]) -> one epoch of (key, data, label) triples, `size` of
      them, in an order that depends only on the seed. `key` names the example in error
      messages; `data` is the encoded image, or its path when `data_is_path`; `label` is the
      int32 class (-1 for a source read without labels).
    size: examples per epoch in this process's share; the same for every process.
    name: names the dataset in error messages.
    """

    epoch: Callable[[tf.Tensor], tf.data.Dataset] | None
    size: int
    name: str
    data_is_path: bool
    # Random access (a TFDS dataset prepared as ArrayRecord): global example indices (int64
    # numpy) -> (keys, encoded images, labels) numpy arrays; `total` examples over all processes.
    # Then the order is a function of the seed and the global position only (see TrainIterator).
    read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    total: int = 0


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def tfds_source(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    shuffle_buffer: int,
    cache: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    with_labels: bool = False,
) -> Source:
    """This process's share of a prepared TFDS image dataset, images left encoded."""
    name = f"tfds dataset {builder.name!r} split {split!r}"
    if "image" not in builder.info.features:
        raise ValueError(f"{name} has no 'image' feature")
    if with_labels and "label" not in builder.info.features:
        raise ValueError(f"{name} has no 'label' feature (it has "
                         f"{sorted(builder.info.features.keys())}): training a classifier "
                         "needs labels")

    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        return _random_access_source(builder, split, name, process_count, with_labels)

    def record(ex):
        label = tf.cast(ex["label"], tf.int32) if with_labels else tf.constant(-1, tf.int32)
        return ex["tfds_id"], ex["image"], label

    def read(part):
        ds = builder.as_dataset(
            split=part,
            shuffle_files=False,  # order must depend on nothing but our seeds
            decoders={"image": tfds.decode.SkipDecoding()},  # decoding is fused with the crop
            read_config=tfds.ReadConfig(add_tfds_id=True),  # names a bad record in errors
        )
        size = int(ds.cardinality())
        if size < 0:  # unknown cardinality: trust the metadata
            size = builder.info.splits[part].num_examples
        ds = ds.map(record)
        return (ds.cache() if cache else ds), size

    # Equal, disjoint, contiguous shares per process, each cut into k equal chunks; one chunk
    # when the shuffle buffer holds the whole share (the buffer alone then shuffles it fully).
    whole = read(split)
    k = max(1, min(_MAX_CHUNKS, whole[1] // (process_count * max(shuffle_buffer, 1))))
    if process_count * k == 1:
        chunks, sizes = zip(whole)
    else:
        parts = tfds.even_splits(split, n=process_count * k, drop_remainder=True)
        chunks, sizes = zip(*map(read, parts[process_index * k : (process_index + 1) * k]))
    size = sum(sizes)
    buffer = max(1, min(shuffle_buffer, size))

    def epoch(seed):
        if k == 1:
            ds = chunks[0]
        else:
            # Which chunk each next example comes from: every chunk exactly size_c times.
            choice = tf.random.experimental.stateless_shuffle(
                tf.repeat(tf.range(k, dtype=tf.int64), sizes), seed, alg=_ALG
            )
            ds = tf.data.Dataset.choose_from_datasets(
                list(chunks), tf.data.Dataset.from_tensor_slices(choice)
            )
        return ds.shuffle(buffer, seed=seed[0])

    return Source(epoch, size, name, data_is_path=False)


def _random_access_source(builder, split: str, name: str, process_count: int,
                          with_labels: bool) -> Source:
    """A TFDS split in ArrayRecord files, read by index (`as_data_source`): any example in O(1),
    so a resume starts at its position without reading what comes before it."""
    source = builder.as_data_source(split=split,
                                    decoders={"image": tfds.decode.SkipDecoding()})
    total = len(source)

    def read(indices):
        examples = source.__getitems__([int(i) for i in indices])
        keys = np.array([f"{split}[{i}]".encode() for i in indices], dtype=object)
        images = np.array([ex["image"] for ex in examples], dtype=object)
        labels = np.array([ex["label"] if with_labels else -1 for ex in examples], np.int32)
        return keys, images, labels

    return Source(None, total // process_count, name + " (ArrayRecord)", data_is_path=False,
                  read=read, total=total)


def list_images(folder: str) -> list[str]:
    """All image files under `folder` (class sub-folders or flat), sorted, by extension."""
    paths = [
        f"{root.rstrip('/')}/{f}"
        for root, _, files in tf.io.gfile.walk(folder)
        for f in files
        if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
    return sorted(paths)


def class_folder_examples(folder: str) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of a folder of class sub-folders: label i is the i-th
    sub-folder in sorted order; images outside a class sub-folder are refused by name."""
    if not tf.io.gfile.isdir(folder):
        raise ValueError(f"image folder {folder!r} is not a directory")
    root = folder.rstrip("/") + "/"
    classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(folder)
                     if tf.io.gfile.isdir(root + d.rstrip("/")))
    index = {c: i for i, c in enumerate(classes)}
    paths = list_images(folder)
    labels = []
    for p in paths:
        parts = p[len(root):].split("/")
        if len(parts) < 2:
            raise ValueError(f"image folder {folder!r}: {p!r} is not in a class sub-folder "
                             "(labelled data needs <folder>/<class>/<image>)")
        labels.append(index[parts[0]])
    if not paths:
        raise ValueError(f"image folder {folder!r} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    return paths, labels, classes


def folder_source(folder: str, *, process_index: int = 0, process_count: int = 1,
                  with_labels: bool = False) -> Source:
    """This process's share of an image folder: every process_count-th path, equal counts.
    Unlabelled: every image below `folder`; labelled: `class_folder_examples`."""
    name = f"image folder {folder!r}"
    if not folder or not tf.io.gfile.isdir(folder):
        raise ValueError(f"data.folder={folder!r} is not a directory")
    if with_labels:
        paths, labels, _ = class_folder_examples(folder)
    else:
        paths = list_images(folder)
        labels = [-1] * len(paths)
    if not paths:
        raise ValueError(f"{name} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
    size = len(paths) // process_count
    # Strided, so class-sorted folders spread every class over all processes.
    local = paths[process_index::process_count][:size]
    local_labels = np.asarray(labels[process_index::process_count][:size], np.int32)
    ds = tf.data.Dataset.from_tensor_slices((local, local, local_labels))

    def epoch(seed):
        return ds.shuffle(max(size, 1), seed=seed[0])  # paths are tiny: shuffle the whole epoch

    return Source(epoch, size, name, data_is_path=True)


def source_from_config(data_cfg, *, process_index: int = 0, process_count: int = 1,
                       with_labels: bool = False) -> Source:
    """The source named by `data_cfg.source`: "tfds", "folder", "embedded" (the photo crops) or
    "digits" (scikit-learn's handwritten digits, labelled)."""
    share = dict(process_index=process_index, process_count=process_count)
    if data_cfg.source in ("tfds", "embedded", "digits"):
        if data_cfg.source == "tfds":
            builder = tfds.builder(data_cfg.name, data_dir=data_cfg.data_dir)
            # No-op when prepared; imagenet2012 and friends are prepared from manual_dir.
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir)
            )
        elif data_cfg.source == "digits":
            from mixmae_jax.data import digits

            builder = digits.prepare(data_cfg.data_dir)
        else:
            from mixmae_jax.data import embedded

            builder = embedded.prepare(data_cfg.data_dir)
        return tfds_source(
            builder,
            data_cfg.split,
            shuffle_buffer=data_cfg.shuffle_buffer,
            cache=data_cfg.cache,
            with_labels=with_labels,
            **share,
        )
    if data_cfg.source == "folder":
        if with_labels:  # labelled class folders: <folder>/<split>/<class>/<image>
            return folder_source(f"{data_cfg.folder.rstrip('/')}/{data_cfg.split}",
                                 with_labels=True, **share)
        return folder_source(data_cfg.folder, **share)
    raise ValueError(f"data.source={data_cfg.source!r}: expected 'tfds', 'folder', 'embedded' or "
                     "'digits'")


# ------------------------------------------------------------------------------------------------
# The training stream
# ------------------------------------------------------------------------------------------------


# The pipelines not closed yet, closed at exit while the interpreter is whole (see `close`).
_OPEN: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()
atexit.register(lambda: [it.close() for it in list(_OPEN)])


class TrainIterator(Iterator):
    """Endless iterator of {"image": uint8 [local_batch, S, S, 3]} (and "label": int32
    [local_batch] with `with_labels`) for one process.

    Unreadable images stop iteration with a CorruptImageError naming the file, or with
    skip_corrupt are dropped and counted (`corrupt_count()`). Skipped images shift the stream, so
    a run that skipped some resumes at position start_step * local_batch, a few images off.

    Attributes:
      num_examples: examples per epoch over all processes.
      steps_per_epoch: num_examples // global_batch_size.
      local_batch_size: global_batch_size // process_count.
      step: the step of the next batch.
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch_size: int,
        image_size: int,
        seed: int,
        crop_scale=(0.2, 1.0),
        hflip: bool = True,
        skip_corrupt: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        start_step: int = 0,
        with_labels: bool = False,
        randaug: str = "",
    ):
        check_batch_size(global_batch_size, process_count)
        self._with_labels = with_labels
        self._randaug = None
        if randaug:
            from mixmae_jax.data.randaugment import parse_policy

            self._randaug = parse_policy(randaug)
        self.local_batch_size = global_batch_size // process_count
        if source.size < self.local_batch_size:
            raise ValueError(
                f"{source.name} has {source.size * process_count} usable images, fewer than "
                f"one global batch (batch_size={global_batch_size}); lower batch_size"
            )
        self.source = source
        self.num_examples = source.total if source.read else source.size * process_count
        self.steps_per_epoch = self.num_examples // global_batch_size
        self._global_batch_size = global_batch_size
        self._process_index = process_index
        self.step = start_step
        self._image_size = image_size
        self._crop_scale = tuple(crop_scale)
        self._hflip = hflip
        self._skip_corrupt = skip_corrupt
        self._start_position = start_step * self.local_batch_size
        self._consumed = 0  # stream positions consumed (yielded or skipped) so far
        self._yielded = 0
        self._skipped: list[int] = []  # positions skipped since `skipped_images` last named them
        # Independent stateless key streams: (seed, 2 * process + 0) orders, (..+1) augments.
        # Random access draws one global order and keys augmentation by the global position:
        # every process uses process 0's keys.
        stream = 0 if source.read else process_index
        self._order_key = tf.constant([seed, 2 * stream], tf.int64)
        self._augment_key = tf.constant([seed, 2 * stream + 1], tf.int64)
        self._iterator = self._build().as_numpy_iterator()
        _OPEN.add(self)

    # -- the tf.data graph ----------------------------------------------------------------------

    def _positions(self, start: int) -> tf.data.Dataset:
        """(position, key, data, label) from local stream position `start` on, endless, nothing
        decoded."""
        if self.source.read:
            return self._random_access_positions(start)
        n = self.source.size

        def epoch(e):
            seed = tf.random.experimental.stateless_fold_in(self._order_key, e, alg=_ALG)
            ordered = self.source.epoch(seed)
            return ordered.enumerate().map(lambda i, r: (e * n + i, *r))

        start_epoch, offset = divmod(start, n)
        return (
            tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch).skip(offset)
        )

    def _random_access_positions(self, start: int) -> tf.data.Dataset:
        """The global stream: position p of epoch e = p // N is example
        index_shuffle(p % N, seed(e)) of the N in the split; global batch k holds positions
        [k * B, (k + 1) * B), this process the b = B / P of them at offset process * b. So the
        data (and, keyed by p, its augmentation) depend on the seed and the global step only,
        whatever the number of processes, and a resume starts reading at its own position."""
        n = self.source.total

        def example(q):
            p = self._global_position(q)
            seed = tf.random.experimental.stateless_fold_in(self._order_key, p // n, alg=_ALG)
            return q, tf.random.experimental.index_shuffle(p % n, seed, tf.constant(n - 1,
                                                                                     tf.int64))

        def read(q, index):
            keys, data, labels = tf.numpy_function(self.source.read, [index],
                                                   [tf.string, tf.string, tf.int32],
                                                   stateful=False)
            return q, keys, data, labels

        auto = tf.data.AUTOTUNE
        return (tf.data.Dataset.range(start, np.iinfo(np.int64).max)
                .map(example)
                .batch(self.local_batch_size)  # one read per local batch
                .map(read, num_parallel_calls=auto)
                .unbatch())

    def _global_position(self, q):
        """Global stream position of this process's local position q (random access)."""
        b = self.local_batch_size
        return (q // b) * self._global_batch_size + self._process_index * b + q % b

    def _decode(self, position, key, data, label):
        del key
        if self.source.data_is_path:
            data = tf.io.read_file(data)
        keyed = self._global_position(position) if self.source.read else position
        seed = tf.random.experimental.stateless_fold_in(self._augment_key, keyed, alg=_ALG)
        image = augment.random_resized_crop_flip(
            data, seed, self._image_size, self._crop_scale, self._hflip, self._randaug
        )
        out = {"image": image, "position": position}
        return {**out, "label": label} if self._with_labels else out

    def _decode_or_flag(self, position, key, data, label):
        """One-element dataset: the decoded example with ok=True, or a placeholder, ok=False.

        `ignore_errors` is scoped to this one example's decode, so errors elsewhere in the
        pipeline still surface.
        """
        one = tf.data.Dataset.from_tensors((position, key, data, label))
        decoded = one.map(self._decode).ignore_errors().map(lambda ex: {**ex, "ok": True})
        s = self._image_size
        placeholder = {"image": tf.zeros([s, s, 3], tf.uint8), "position": position, "ok": False}
        if self._with_labels:
            placeholder["label"] = label
        return decoded.concatenate(tf.data.Dataset.from_tensors(placeholder)).take(1)

    def _build(self) -> tf.data.Dataset:
        auto = tf.data.AUTOTUNE
        ds = self._positions(self._start_position)
        if self._skip_corrupt:
            # Slower per image than a plain map (a small dataset per example), so only on request.
            ds = ds.interleave(
                self._decode_or_flag,
                cycle_length=auto,
                num_parallel_calls=auto,
                deterministic=True,
            )
            ds = ds.filter(lambda ex: ex["ok"])
        else:
            ds = ds.map(self._decode, num_parallel_calls=auto)
        ds = ds.batch(self.local_batch_size, drop_remainder=True, num_parallel_calls=auto)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(auto)

    # -- iteration ------------------------------------------------------------------------------

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except tf.errors.OpError as e:  # surfaces inside iteration, without the file's name
            raise self._explain(e) from e
        positions = batch.pop("position")
        batch.pop("ok", None)
        first = self._start_position + self._consumed
        if self._skip_corrupt and int(positions[-1]) - first + 1 > len(positions):
            self._skipped += sorted(set(range(first, int(positions[-1]) + 1)) - set(positions))
        self._consumed = int(positions[-1]) + 1 - self._start_position
        self._yielded += len(positions)
        self.step += 1
        return batch

    def close(self) -> None:
        """Stops the pipeline and its threads now (then the stream is empty). Call it when done:
        the tf.data graph's functions hold this object (a reference cycle), and a pipeline left
        for the interpreter's exit to destroy held the process 3-5 s after its last line."""
        self._iterator = iter(())
        _OPEN.discard(self)

    def corrupt_count(self) -> int:
        """Images skipped as unreadable so far (always 0 unless skip_corrupt)."""
        return self._consumed - self._yielded

    def skipped_images(self) -> list[str]:
        """The names (file or record key) of the images skipped since the last call."""
        names = [key.numpy().decode(errors="replace")
                 for p in self._skipped for _, key, _, _ in self._positions(p).take(1)]
        self._skipped = []
        return names

    def _explain(self, error: Exception) -> Exception:
        """Finds the example that broke the batch at `self.step` and names it.

        Without skipping, that batch covers exactly positions [step * B, (step + 1) * B), so
        decoding them one by one finds the culprit; this only runs after a failure.
        """
        b = self.local_batch_size
        for position, key, data, label in self._positions(self.step * b).take(b):
            try:
                self._decode(position, key, data, label)
            except tf.errors.OpError as e:
                return CorruptImageError(
                    f"{self.source.name}: cannot read or decode image {key.numpy().decode()!r} "
                    f"({type(e).__name__}: {e.message.strip()}). Set data.skip_corrupt=True to "
                    "skip unreadable images."
                )
        return RuntimeError(
            f"{self.source.name}: input pipeline failed at step {self.step}: {error}"
        )


def check_batch_size(global_batch_size: int, process_count: int) -> None:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"batch_size={global_batch_size} must be a positive multiple of the process count "
            f"({process_count})"
        )


def create_train_iterator(
    data_cfg,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    with_labels: bool = False,
    randaug: str = "",
) -> TrainIterator:
    """The training stream of `data_cfg` (config `c.data`) for one process.

    Raises ValueError (naming batch_size and the dataset) when the global batch does not divide
    over the processes or the dataset holds less than one global batch.
    """
    check_batch_size(global_batch_size, process_count)  # before touching any data
    source = source_from_config(data_cfg, process_index=process_index, process_count=process_count,
                                with_labels=with_labels)
    return TrainIterator(
        source,
        global_batch_size=global_batch_size,
        image_size=data_cfg.image_size,
        seed=seed,
        crop_scale=data_cfg.crop_scale,
        hflip=data_cfg.hflip,
        skip_corrupt=data_cfg.skip_corrupt,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
        with_labels=with_labels,
        randaug=randaug,
    )


def benchmark_input(
    data_cfg,
    global_batch_size: int,
    *,
    seconds: float | None = None,
    num_batches: int | None = None,
    seed: int = 0,
) -> float:
    """Input-only throughput of this host's pipeline, in images per second.

    Times `num_batches` batches, or as many as fit in `seconds` (default 10 s), after one warm-up
    batch (which pays for start-up and filling the shuffle buffer).
    """
    it = create_train_iterator(data_cfg, global_batch_size=global_batch_size, seed=seed)
    try:
        next(it)
        if num_batches is None and seconds is None:
            seconds = 10.0
        count, start = 0, time.perf_counter()
        while True:
            next(it)
            count += 1
            elapsed = time.perf_counter() - start
            if (num_batches is not None and count >= num_batches) or (
                seconds is not None and elapsed >= seconds
            ):
                return count * it.local_batch_size / elapsed
    finally:
        it.close()
