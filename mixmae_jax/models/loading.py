"""Loading a trained encoder into another model of its family: the native (torch-free) half of
every model module's `load`.

    params, report = models.get_model_module(name).load(source, source_cfg, target, target_cfg)

`source` is any model's params holding the encoder at `encoder` (a pretraining run's, with its
decoder and mask tokens); `target` another model's freshly initialised params (a classifier at
another resolution or window, or a pretraining model). The official fine-tuning loaders' rules,
which the old JAX -> PyTorch -> JAX round trip applied, hold tensor for tensor:

* every encoder tensor of the target comes from the source's encoder, resized where the model
  says how (Swin bias tables of another window, position tables of another grid: bicubic, as
  the official loaders resize); a table the source adds as a constant and the target learns (a
  ViT's or PVT's sin-cos `pos_embed`) starts from the source's table;
* source encoder tensors the target has no place for are dropped only when they are
  pretraining-only parts (`pretraining_only`: mask tokens, a final norm that the classifier
  replaces with `fc_norm`); anything else, and any tensor of another shape that cannot be
  resized, is an error naming it (another depth or width is another model);
* everything outside the encoder is the target's own (a fresh head, a fresh `fc_norm`) or the
  source's own (the decoder): kept fresh and dropped, as the report says.

Constants (relative-position indices, shifted-window masks, fixed sin-cos tables) are never
params: the target computes its own from its config.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from mixmae_jax.models.paths import flatten

ENCODER = "encoder"


class LoadError(ValueError):
    """The source does not fit the target; the message lists every offending tensor, one per
    line after the first."""


def _rebuild(template, flat_values: dict, prefix: str = ""):
    """The template's nested structure (its key types) with leaves from `flat_values`."""
    return {k: _rebuild(v, flat_values, f"{prefix}{k}.") if isinstance(v, dict) else
            flat_values[f"{prefix}{k}"] for k, v in template.items()}


@dataclasses.dataclass
class LoadReport:
    """What `load` did; iterate it for printable lines."""

    loaded: list[str] = dataclasses.field(default_factory=list)  # target paths from the source
    resized: list[str] = dataclasses.field(default_factory=list)  # "path: (a, b) -> (c, d) ..."
    fresh: list[str] = dataclasses.field(default_factory=list)  # target paths kept as they were
    dropped: list[str] = dataclasses.field(default_factory=list)  # source paths not used

    def dropped_groups(self) -> str:
        """Dropped paths by part ("decoder (12 tensors)", "encoder.mask_token")."""
        groups = collections.Counter(
            ".".join(p.split(".")[:2 if p.startswith(ENCODER + ".") else 1])
            for p in self.dropped)
        return ", ".join(g if n == 1 else f"{g} ({n} tensors)" for g, n in groups.items())

    def __iter__(self):
        yield (f"{len(self.loaded)} tensors loaded ({len(self.resized)} resized), fresh: "
               f"{', '.join(self.fresh) or 'none'}; dropped: {self.dropped_groups() or 'none'}")
        for item in self.resized:
            yield f"resized: {item}"

    def __str__(self):
        return "\n".join(self)


# (source path, source value, target shape) -> (value of the target shape, how) or None.
Resize = Callable[[str, np.ndarray, tuple], "tuple[np.ndarray, str] | None"]


def load_encoder(source, target, *, pretraining_only: tuple[str, ...] = (),
                 resize: Resize | None = None, fixed_tables: dict | None = None
                 ) -> tuple[dict, LoadReport]:
    """(target params with the source's encoder, LoadReport); see the module docstring.

    source, target: pure param dicts (nested, as `nnx.to_pure_dict` gives), the target concrete.
    pretraining_only: names directly under `encoder` that the target may lack (dropped).
    resize: how a source tensor of another shape becomes the target's (None: it cannot).
    fixed_tables: {target path: table} the source adds as constants and the target learns.
    Returns host numpy leaves with the target's dtypes.
    """
    flat_src, flat_tgt = flatten(source), flatten(target)
    fixed_tables = fixed_tables or {}
    enc = ENCODER + "."
    report = LoadReport()
    problems, values = [], {}
    for path, leaf in flat_tgt.items():
        dtype, shape = np.dtype(leaf.dtype), tuple(leaf.shape)
        if not path.startswith(enc):
            values[path] = np.asarray(leaf)
            report.fresh.append(path)
            continue
        if path in flat_src:
            value, origin = np.asarray(flat_src[path]), "source"
        elif path in fixed_tables:
            value, origin = np.asarray(fixed_tables[path]), "source's fixed table"
        else:
            problems.append(f"{path}: missing from the source")
            continue
        if value.shape != shape:
            resized = resize(path, value, shape) if resize else None
            if resized is None:
                problems.append(f"{path}: shape {value.shape} in the {origin}, {shape} here")
                continue
            report.resized.append(f"{path}: {value.shape} -> {shape} ({resized[1]})")
            value = resized[0]
        values[path] = np.array(value, dtype=dtype)
        report.loaded.append(path)
    for path in flat_src:
        if path in flat_tgt:
            continue
        if path.startswith(enc) and path[len(enc):].split(".")[0] not in pretraining_only:
            problems.append(f"{path}: the target has no place for it")
            continue
        report.dropped.append(path)
    if problems:
        raise LoadError(f"{len(problems)} tensor(s) of the source do not fit:\n  "
                        + "\n  ".join(problems))
    return _rebuild(target, values), report
