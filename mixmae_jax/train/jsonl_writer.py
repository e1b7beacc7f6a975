"""A clu MetricWriter that appends scalars as JSON lines (imported lazily: clu imports TF)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixmae_jax.data import tf_setup  # noqa: F401  (TensorFlow set up before clu imports it)

# isort: split
from clu.metric_writers import interface


class JsonLinesWriter(interface.MetricWriter):
    """{"step": s, name: value, ...} per `write_scalars` call; other summaries are not written."""

    def __init__(self, path: str):
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._file.flush()

    def close(self):
        if not self._file.closed:
            self._file.close()
