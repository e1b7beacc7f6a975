"""Resume start-up at scale: how long a training stream takes to hand over its first batch when a
run resumes mid-epoch, for a TFDS dataset in TFRecord files (read by skipping) and the same
dataset in ArrayRecord files (read by index).

    python -m mixmae_jax.data.resume_bench [--examples 100000] [--batch 256] \
        [--shuffle-buffer 10000] [--data-dir /tmp/resume_bench]

Builds a synthetic TFDS dataset of `--examples` distinct 64-px JPEGs in both formats (once;
kept in --data-dir), then times iterator creation + first batch at step 0 and at 90% of the
first epoch, and prints one table and a JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np


def _builder_class(examples: int):
    import tensorflow_datasets as tfds
    from etils import epath
    from PIL import Image

    class ResumeBenchImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:
            return epath.Path(__file__)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(0)
            base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            for i in range(examples):
                image = base.copy()
                image[0, :3, 0] = (i % 256, (i // 256) % 256, i // 65536)  # distinct content
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="JPEG", quality=90)
                yield i, {"image": io.BytesIO(buf.getvalue())}

    return ResumeBenchImages


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mixmae_jax.data.resume_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--shuffle-buffer", type=int, default=10_000)
    p.add_argument("--data-dir", default="/tmp/resume_bench")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mixmae_jax.data import input_pipeline as ip

    cls = _builder_class(args.examples)
    rows = []
    for fmt in ("tfrecord", "array_record"):
        data_dir = os.path.join(args.data_dir, f"{fmt}_{args.examples}")
        t0 = time.perf_counter()
        builder = cls(data_dir=data_dir, file_format=fmt)
        builder.download_and_prepare()
        built = time.perf_counter() - t0
        steps = args.examples // args.batch
        for start in (0, int(0.9 * steps)):
            t0 = time.perf_counter()
            source = ip.tfds_source(builder, "train", shuffle_buffer=args.shuffle_buffer)
            it = ip.TrainIterator(source, global_batch_size=args.batch, image_size=64, seed=0,
                                  start_step=start)
            next(it)
            rows.append(dict(format=fmt, start_step=start, skipped_examples=start * args.batch,
                             first_batch_s=round(time.perf_counter() - t0, 2),
                             build_s=round(built, 1)))
            print(f"{fmt:12s} start step {start:6d}: first batch after "
                  f"{rows[-1]['first_batch_s']:7.2f} s", flush=True)
    print("\n| format | resume at step | examples before it | first batch (s) |\n"
          "| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['format']} | {r['start_step']} | {r['skipped_examples']:,} | "
              f"{r['first_batch_s']} |")
    print(json.dumps(dict(examples=args.examples, batch=args.batch,
                          shuffle_buffer=args.shuffle_buffer, rows=rows)))


if __name__ == "__main__":
    main()
