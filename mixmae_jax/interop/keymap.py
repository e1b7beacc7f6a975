"""Parameter names and layouts: mixmae-jax params <-> an official PyTorch state_dict.

A `Layout` describes one method's official PyTorch models (its pretraining and finetuning
state_dicts): a rename table of module prefixes per format, per-leaf layout rules (Linear kernels
transpose, conv HWIO <-> OIHW, LayerNorm scale <-> weight), the constants the official layout
stores and mixmae-jax computes (sin-cos tables, relative-position indices, attention masks), and
the official modules' definition order. The official state_dict -- keys, order, shapes, dtypes --
follows from these and the JAX model's parameter paths (`reference_layout`); no torch model is
built. Each method defines its layout (`interop/<method>_layout.py`); `to_torch` and `from_torch`
work on any. This module imports torch only inside the helpers that handle torch tensors.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import warnings

import ml_collections
import numpy as np
from flax import nnx

from mixmae_jax.models import layers as L
from mixmae_jax.models.layers import square_side
from mixmae_jax.models.paths import flatten, unflatten  # noqa: F401 - K.unflatten for callers

FORMATS = ("pretrain", "finetune")
# MAE-style decoders (MAE's and MixMIM's) are flat official names: decoder_embed, decoder_blocks,
# decoder_norm, decoder_pred and a top-level mask_token; ours sit under `decoder`.
FLAT_DECODER_PREFIXES = (
    ("decoder.mask_token", "mask_token"),
    ("decoder.embed.", "decoder_embed."),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.pred.", "decoder_pred."),
)
# A stored sin-cos table equals ours to float32 rounding (both computed in float64); a resized
# or trained table differs by orders of magnitude more.
APE_ATOL = 1e-5
# main_finetune.py re-initialises the head with timm trunc_normal_(std=2e-5) (bounds +-2).
HEAD_INIT_STD = 2e-5


class ConversionError(ValueError):
    """A checkpoint does not match the expected layout; the message names every bad key."""


def tensor_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.numpy()


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


@functools.lru_cache(maxsize=64)
def _derived_layout(layout_cls, cfg_json: str, fmt: str, num_classes: int):
    """((key, shape, numpy dtype), ...) in the official order, from the JAX model's abstract
    params, the rename table and the constants (cached: tracing a model costs seconds)."""
    layout = layout_cls(ml_collections.ConfigDict(json.loads(cfg_json)))
    model = nnx.eval_shape(lambda: layout.jax_model(fmt, num_classes, L.InitKeys(0)))
    entries = {}
    for path, leaf in flatten(nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])).items():
        axes = layout._torch_axes(path)
        shape = tuple(leaf.shape) if axes is None else tuple(leaf.shape[a] for a in axes)
        entries[layout.torch_name(path, fmt)] = (shape, np.dtype(leaf.dtype))
    for name, value in layout.constant_entries(fmt).items():
        entries.setdefault(name, (tuple(value.shape), value.dtype))  # a learned table wins
    return tuple((k, *entries[k]) for k in sorted(entries, key=layout.order_key))


class Layout:
    """One method's official PyTorch layouts; subclasses fill in the class attributes and hooks.

    prefixes: {format: ((flax dotted prefix, torch dotted prefix), ...)}, first match wins.
    pretrain_only / finetune_only: torch key prefixes that exist in one format only (decoder and
      mask token / head); an export to the other format drops them, an import skips them.
    """

    name = ""
    prefixes: dict[str, tuple[tuple[str, str], ...]] = {}
    pretrain_only: tuple[str, ...] = ()
    finetune_only: tuple[str, ...] = ("head.",)
    conv_kernels = re.compile(r"(^|\.)patch_embed\.proj\.kernel$")
    # The official modules' definition order, the one fact of the state_dict the JAX paths do not
    # carry: torch lists a module's own tensors, then its submodules, each in definition order.
    # `order` ranks the names of siblings (tensors and submodules); `order_within` overrides it
    # for the children of modules of a given name (the nearest non-index part of the parent).
    order: tuple[str, ...] = ()
    order_within: dict[str, tuple[str, ...]] = {}

    def __init__(self, model_cfg):
        self.model_cfg = model_cfg

    # -- hooks ----------------------------------------------------------------------------------

    def jax_model(self, fmt: str, num_classes: int, rngs: nnx.Rngs):
        """The mixmae-jax model whose params the official `fmt` state_dict holds (called under
        `nnx.eval_shape`): the method's pretraining model, or the fine-tuning classifier."""
        if fmt == "finetune":
            from mixmae_jax.models.classifier import build_classifier

            return build_classifier(self.model_cfg, num_classes, rngs=rngs)
        return self.pretraining_model(rngs)

    def pretraining_model(self, rngs: nnx.Rngs):
        raise NotImplementedError

    def constant_entries(self, fmt: str) -> dict[str, np.ndarray]:
        """The official state_dict's entries that mixmae-jax computes instead of storing."""
        return {}

    def is_constant_key(self, key: str) -> bool:
        return False

    def check_constant(self, name: str, value, target_has_param: bool, report) -> str | None:
        """Check a constant found in a file (None: fine); may add notes to the report."""
        return None

    def resize(self, name: str, value, shape: tuple, report):
        """A file tensor of another shape resized for the template (None: cannot)."""
        return None

    def fresh_finetune_entries(self, reference: dict, num_classes: int, seed: int) -> dict:
        """Finetuning entries a pretraining model has no params for (the head), initialised as
        the official finetuning code does."""
        return {}

    # -- names and layouts ---------------------------------------------------------------------

    def reference_layout(self, fmt: str = "pretrain", num_classes: int = 1000):
        """OrderedDict key -> (shape, numpy dtype) of the official state_dict for this config:
        the JAX model's params renamed (and transposed) plus the constants, in the official
        order; checked against the plain torch references by the tests."""
        _check_format(fmt)
        cfg = self.model_cfg
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        layout = _derived_layout(type(self), json.dumps(cfg, sort_keys=True, default=list),
                                 fmt, int(num_classes))
        return collections.OrderedDict((k, (shape, dtype)) for k, shape, dtype in layout)

    def order_key(self, name: str) -> tuple:
        """Sort key of an official key: per part, its own tensors before submodules, then the
        definition order (indices numerically)."""
        parts = name.split(".")
        key, parent = [], ""
        for i, part in enumerate(parts):
            if part.isdigit():
                rank = int(part)
            else:
                names = self.order_within.get(parent, self.order)
                if part not in names:
                    raise ConversionError(f"{name}: {part!r} has no place in the official "
                                          f"definition order of {type(self).__name__}.order")
                rank = names.index(part)
                parent = part
            key.append((i < len(parts) - 1, rank))
        return tuple(key)

    def torch_name(self, path: str, fmt: str) -> str:
        for src, dst in self.prefixes[fmt]:
            if path == src or (path.startswith(src) and src.endswith(".")):
                name = dst + path[len(src):]
                break
        else:
            raise ConversionError(f"no official {fmt} name for parameter {path!r}")
        if name.endswith(".kernel"):
            return name[: -len("kernel")] + "weight"
        if name.endswith(".scale"):
            return name[: -len("scale")] + "weight"
        return name

    def _torch_axes(self, path: str) -> tuple[int, ...] | None:
        """The axis order of a Flax leaf in its torch layout (None: the same layout)."""
        if self.conv_kernels.search(path):
            return (3, 2, 0, 1)  # HWIO -> OIHW
        if path.endswith(".kernel"):
            return (1, 0)  # [in, out] -> [out, in]
        return None

    def to_torch(self, path: str, value: np.ndarray) -> np.ndarray:
        axes = self._torch_axes(path)
        value = np.asarray(value)
        return value if axes is None else np.ascontiguousarray(value.transpose(axes))

    def from_torch(self, path: str, value: np.ndarray) -> np.ndarray:
        axes = self._torch_axes(path)
        value = np.asarray(value)
        return value if axes is None else np.ascontiguousarray(value.transpose(np.argsort(axes)))

    def detect_format(self, keys) -> str:
        """What a file is: pretraining if it has pretraining-only keys."""
        return "pretrain" if any(k.startswith(self.pretrain_only) for k in keys) else "finetune"

    def template_format(self, flat_template) -> str:
        """What a params tree is: pretraining if it has pretraining-only parameters."""
        names = []
        for p in flat_template:
            try:
                names.append(self.torch_name(p, "pretrain"))
            except ConversionError:
                pass
        return "pretrain" if any(n.startswith(self.pretrain_only) for n in names) else "finetune"


# ---------------------------------------------------------------------------------------------
# Helpers the layouts share.
# ---------------------------------------------------------------------------------------------


def fresh_head(num_classes: int, in_dim: int, seed: int, std: float = HEAD_INIT_STD) -> dict:
    """A finetuning head as the official finetuning code initialises it."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    weight = torch.empty(num_classes, in_dim)
    torch.nn.init.trunc_normal_(weight, std=std, a=-2.0, b=2.0, generator=gen)
    return {"head.weight": weight, "head.bias": torch.zeros(num_classes)}


def check_sincos(name: str, value, dim: int, target_grid: int, report,
                 allow_mismatch: bool, *, cls_row: bool = False,
                 source_grid: int = 0) -> str | None:
    """A file's fixed position table: the 2-D sin-cos table of its own grid (a leading zero row
    for the cls token if `cls_row`), or the target's own table (`L.ape_table` of `source_grid`
    resized), else a problem (or, allowed, a warning and a note)."""
    shape = tuple(value.shape)
    extra = int(cls_row)
    side = square_side(shape[1] - extra) if len(shape) == 3 else None
    if len(shape) != 3 or shape[0] != 1 or shape[2] != dim or side is None:
        return f"{name}: shape {shape}, expected (1, {'1 + ' if cls_row else ''}G*G, {dim})"
    if source_grid and side == target_grid and not cls_row:
        resized = L.ape_table(dim, side, source_grid)
        if np.max(np.abs(tensor_to_numpy(value)[0].astype(np.float64) - resized)) <= APE_ATOL:
            report.constants.append(name)  # the official loader's resize: what the model adds
            return None
    table = L.sincos_pos_embed_2d(dim, side, side)
    if cls_row:
        table = np.concatenate([np.zeros((1, dim), np.float32), table])
    dev = float(np.max(np.abs(tensor_to_numpy(value)[0].astype(np.float64) - table)))
    if dev > APE_ATOL:
        msg = (f"{name}: not the 2-D sin-cos table of its {side}x{side} grid (max deviation "
               f"{dev:.3g}), e.g. a table bicubic-resized by the official finetune loader. "
               "mixmae-jax always adds the constant sin-cos table")
        if not allow_mismatch:
            return (msg + "; pass allow_ape_mismatch=True (--allow-ape-mismatch) to load anyway "
                    f"with the sin-cos table of the {target_grid}x{target_grid} grid")
        warnings.warn(msg + "; replaced by the sin-cos table (allow_ape_mismatch=True)",
                      stacklevel=3)
        report.notes.append(f"{name}: file table deviates from sin-cos by {dev:.3g}; replaced by "
                            f"the {target_grid}x{target_grid} sin-cos table")
    elif side != target_grid:
        report.notes.append(
            f"{name}: sin-cos at {side}x{side} in the file; mixmae-jax uses sin-cos at "
            f"{target_grid}x{target_grid} (the official loader would bicubic-resize the table)")
    report.constants.append(name)
    return None
