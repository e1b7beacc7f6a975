"""The labelled evaluation input: every example of a split exactly once, deterministic.

Each process reads every process_count-th example of the split in the split's stored order
(process p: examples p, p + P, ...), decodes it, resizes its shorter side to
round(image_size / crop_pct) with bicubic interpolation and takes the central image_size square
(the official eval transforms: Resize then CenterCrop; crop_pct 0.875 is 224 / 256). Batches are
padded so that every process yields the same number of them: padded rows are zero images with
`valid` = False, and whoever reduces a metric must weight by `valid`.

Batches: {"image": uint8 (local_batch, S, S, 3), "label": int32 (local_batch,),
"valid": bool (local_batch,), "index": int64 (local_batch,) position in the split (-1: padding)}.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow_datasets as tfds

from mixmae_jax.data.tf_setup import tf


class LabelledData:
    """A labelled dataset's splits in their stored order: a prepared TFDS dataset (the embedded
    digits too) or class folders (`root/<split>/<class>/<image>`, label i = the i-th class
    name in sorted order, the same classes in every split)."""

    def __init__(self, kind: str, name: str, num_classes: int, splits: dict, records,
                 data_is_path: bool):
        self.kind = kind  # "tfds dataset" or "image folder"
        self.name = name  # the TFDS name or the folder
        self.num_classes = num_classes
        self._splits = splits  # split -> number of examples
        self._records = records  # split -> tf.data.Dataset of (data, label)
        self.data_is_path = data_is_path

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r}"

    @property
    def splits(self) -> list[str]:
        return sorted(self._splits)

    def check_split(self, split: str) -> None:
        if split.split("[")[0] not in self._splits:
            raise ValueError(f"{self} has no split {split!r} (it has {self.splits})")

    def num_examples(self, split: str) -> int:
        self.check_split(split)
        return self._splits[split]

    def records(self, split: str):
        self.check_split(split)
        return self._records(split)


def _tfds_data(builder) -> LabelledData:
    features = builder.info.features
    if "label" not in features or "image" not in features:
        raise ValueError(f"tfds dataset {builder.name!r} has no 'image' and 'label' features "
                         f"(it has {sorted(features.keys())}): evaluation needs labels")

    def records(split):
        decoders = {"image": tfds.decode.SkipDecoding()}
        if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:  # no as_dataset
            source = builder.as_data_source(split=split, decoders=decoders)

            def in_order(chunk=256):
                for start in range(0, len(source), chunk):
                    for ex in source.__getitems__(list(range(start, min(start + chunk,
                                                                        len(source))))):
                        yield ex["image"], np.int32(ex["label"])

            return tf.data.Dataset.from_generator(in_order, output_signature=(
                tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int32)))
        ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
        return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))

    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    return LabelledData("tfds dataset", builder.name, features["label"].num_classes, splits,
                        records, data_is_path=False)


def _folder_data(root: str) -> LabelledData:
    from mixmae_jax.data.input_pipeline import class_folder_examples

    if not root or not tf.io.gfile.isdir(root):
        raise ValueError(f"data.folder={root!r} is not a directory")
    splits, classes = {}, None
    for split in sorted(tf.io.gfile.listdir(root)):
        split = split.rstrip("/")
        if not tf.io.gfile.isdir(f"{root.rstrip('/')}/{split}"):
            continue
        paths, labels, names = class_folder_examples(f"{root.rstrip('/')}/{split}")
        if classes is not None and names != classes:
            raise ValueError(f"image folder {root!r}: split {split!r} has classes {names}, "
                             f"others {classes}; every split needs the same class sub-folders")
        classes = names
        splits[split] = (paths, labels)
    if not splits:
        raise ValueError(f"image folder {root!r}: labelled data needs one sub-folder per split "
                         "(e.g. train/, val/), each with one sub-folder per class")

    def records(split):
        paths, labels = splits[split]
        return tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int32)))

    return LabelledData("image folder", root, len(classes),
                        {k: len(v[0]) for k, v in splits.items()}, records, data_is_path=True)


def labelled_data(data_cfg) -> LabelledData:
    """The labelled dataset of `data_cfg`: "tfds" by name (prepared), the embedded "digits", or
    class folders ("folder"); ValueError naming the dataset when it has no labels."""
    if data_cfg.source == "digits":
        from mixmae_jax.data import digits

        return _tfds_data(digits.prepare(data_cfg.data_dir))
    if data_cfg.source == "tfds":
        try:
            builder = tfds.builder(data_cfg.name, data_dir=data_cfg.data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:  # its message lists ~400 names
            raise ValueError(f"tfds dataset {data_cfg.name!r}: not found (data dir "
                             f"{data_cfg.data_dir or 'TFDS default'}): "
                             f"{str(e).splitlines()[0]}") from None
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir))
        return _tfds_data(builder)
    if data_cfg.source == "folder":
        return _folder_data(data_cfg.folder)
    raise ValueError(f"data.source={data_cfg.source!r}: evaluation needs labels: a TFDS "
                     "dataset ('tfds'), class folders ('folder') or the embedded digits "
                     "('digits')")


def center_crop(encoded, image_size: int, crop_pct: float):
    """Encoded image -> uint8 [S, S, 3]: shorter side to round(S / crop_pct), bicubic, then the
    central S x S square."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    short = tf.cast(round(image_size / crop_pct), tf.float32)
    scale = short / tf.cast(tf.minimum(h, w), tf.float32)
    nh = tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32)
    nw = tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32)
    resized = tf.image.resize(tf.cast(image, tf.float32), (nh, nw), method="bicubic",
                              antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    crop = resized[top:top + image_size, left:left + image_size]
    return tf.cast(tf.clip_by_value(tf.round(crop), 0, 255), tf.uint8)


class EvalIterator:
    """One pass over a labelled split, this process's share, padded to a common batch count.

    Attributes: num_examples (the split), num_batches (the same on every process),
    local_batch_size, num_classes.
    """

    def __init__(self, data: LabelledData, split: str, *, global_batch_size: int,
                 image_size: int, crop_pct: float = 0.875, process_index: int = 0,
                 process_count: int = 1):
        if global_batch_size % process_count:
            raise ValueError(f"eval batch {global_batch_size} is not divisible by the "
                             f"{process_count} processes")
        self.local_batch_size = global_batch_size // process_count
        self.num_examples = data.num_examples(split)
        self.num_classes = data.num_classes
        local = math.ceil(self.num_examples / process_count)
        self.num_batches = math.ceil(local / self.local_batch_size)
        ds = data.records(split).enumerate().shard(process_count, process_index)

        def prepare(i, record):
            encoded, label = record
            if data.data_is_path:
                encoded = tf.io.read_file(encoded)
            return {"image": center_crop(encoded, image_size, crop_pct), "label": label,
                    "valid": True, "index": i}

        pad = {"image": tf.zeros((image_size, image_size, 3), tf.uint8),
               "label": tf.constant(0, tf.int32), "valid": tf.constant(False),
               "index": tf.constant(-1, tf.int64)}
        count = self.num_batches * self.local_batch_size
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(count)
        self._ds = ds.batch(self.local_batch_size).prefetch(2)

    def __iter__(self):
        for batch in self._ds.as_numpy_iterator():
            yield {k: np.asarray(v) for k, v in batch.items()}

    def __len__(self) -> int:
        return self.num_batches
