"""Official PyTorch MixMIM checkpoints -> mixmae-jax params.

    sd = load_torch_checkpoint("mixmim_base.pth", trust_pickle=True)   # official files pickle args
    params, report = state_dict_to_params(sd, config.model, template_params)
    for line in report: print(line)

Every official key is mapped onto the template's flax paths by inverting the rename table of
`keymap.flax_to_torch_name` over the template itself (no guessing); Linear / conv weights are
transposed back. Constants are checked, not loaded:

* `relative_position_index` buffers must equal the Swin formula for their window.
* `absolute_pos_embed` / `decoder_pos_embed` must be the 2-D sin-cos table at the file's own
  grid. mixmae-jax has no position-table parameter: it always adds the sin-cos table of the target
  grid. A file whose table is something else -- e.g. a 384 finetune checkpoint made by the official
  loader, which bicubic-resizes the 56x56 table instead of recomputing it -- cannot be represented
  exactly, so it is refused (ConversionError) unless `allow_ape_mismatch=True`, which warns and
  uses the sin-cos table (the report records the largest deviation). A sin-cos table at another
  grid than the target's is fine: the target's sin-cos table is used and the report says so
  (the official finetune loader would bicubic-resize the old table instead).

`relative_position_bias_table`s whose window differs from the target config are resized exactly
like the official finetune loader (`util/pos_embed.py`): [(2w-1)^2, h] -> (1, h, 2w-1, 2w-1),
`F.interpolate(mode="bicubic", align_corners=False)`, back to [(2w'-1)^2, h], in float32 torch.

Pretraining files into finetuning templates (and the reverse) follow the official finetune flow:
keys the template has no place for (`mask_token`, `decoder_*` / `head.*`) are skipped, template
params the file cannot provide (`head.*` / the decoder) keep their template (fresh) values. A
finetune file without `head.*` (official num_classes=0, or a head dropped to change the number of
classes) also leaves the template's head fresh. Everything else is strict: unknown keys, missing
keys and shape mismatches raise ConversionError naming each offending key.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from mixmae_jax.convert import keymap as K
from mixmae_jax.convert.to_torch import FORMATS, reference_layout
from mixmae_jax.models import layers as L

# A stored sin-cos table equals ours to float32 rounding (both computed in float64); a resized
# or trained table differs by orders of magnitude more.
APE_ATOL = 1e-5

_PRETRAIN_ONLY = ("mask_token", "decoder_")


# ---------------------------------------------------------------------------------------------
# Reading files.
# ---------------------------------------------------------------------------------------------


def load_torch_checkpoint(path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict of a `.pth` file: `{'model': state_dict, ...}` or a bare state_dict.

    Loads with `torch.load(weights_only=True)` (tensors and plain containers only). Files that
    pickle other objects -- the released official checkpoints also pickle `args`, an
    `argparse.Namespace` -- are refused unless `trust_pickle=True` (`--trust-pickle`), which
    loads them with `weights_only=False`: arbitrary code can run, so only for trusted files.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            text = str(e)
            if "Unsupported global" in text:
                raise K.ConversionError(
                    f"{path} pickles objects other than tensors (the official checkpoints also "
                    "store `args`, an argparse.Namespace), so the safe loader (torch.load "
                    "weights_only=True) refused it. If the file comes from a trusted source, pass "
                    "--trust-pickle (trust_pickle=True): unpickling can run arbitrary code."
                ) from e
            start = text.find("WeightsUnpickler error:")
            detail = text[start:].split("\n\nCheck")[0] if start >= 0 else text[:200]
            detail = " ".join(detail.split())
            raise K.ConversionError(
                f"{path}: the safe loader (torch.load weights_only=True) cannot read it "
                f"({detail}). If it is a checkpoint from a trusted source, "
                "--trust-pickle (trust_pickle=True) uses the full unpickler.") from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise K.ConversionError(f"{path}: not a readable PyTorch checkpoint ({e2})") from e2
    except RuntimeError as e:
        raise K.ConversionError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    return _extract_state_dict(obj, path)


def _extract_state_dict(obj, path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise K.ConversionError(f"{path}: expected {{'model': state_dict}} or a state_dict, got "
                                f"{type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str)
           or not isinstance(v, torch.Tensor)]
    if bad:
        raise K.ConversionError(f"{path}: expected {{'model': state_dict}} or a state_dict; these "
                                f"entries are not tensors: {', '.join(bad)}")
    return dict(obj)


# ---------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionReport:
    """What `state_dict_to_params` did besides a 1:1 copy; iterate it for printable lines."""

    file_format: str = ""
    template_format: str = ""
    loaded: int = 0  # parameters copied from the file (resized ones included)
    resized: list[str] = dataclasses.field(default_factory=list)  # "key: (a, b) -> (c, d)"
    skipped: list[str] = dataclasses.field(default_factory=list)  # file keys not loaded, why
    kept_fresh: list[str] = dataclasses.field(default_factory=list)  # template paths kept
    constants: list[str] = dataclasses.field(default_factory=list)  # checked and recomputed
    notes: list[str] = dataclasses.field(default_factory=list)

    def __iter__(self):
        yield (f"{self.file_format} checkpoint -> {self.template_format} params: {self.loaded} "
               f"tensors loaded, {len(self.resized)} resized, {len(self.skipped)} skipped, "
               f"{len(self.kept_fresh)} kept fresh, {len(self.constants)} constants verified")
        for title, items in (("resized", self.resized), ("skipped", self.skipped),
                             ("kept fresh (template values)", self.kept_fresh),
                             ("note", self.notes)):
            for item in items:
                yield f"{title}: {item}"

    def __str__(self):
        return "\n".join(self)


# ---------------------------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------------------------


def _detect_format(keys) -> str:
    return "pretrain" if any(k.startswith(_PRETRAIN_ONLY) for k in keys) else "finetune"


def _template_format(flat_template) -> str:
    return "pretrain" if any(p.startswith("decoder.") for p in flat_template) else "finetune"


def _square_side(n: int) -> int | None:
    s = math.isqrt(n)
    return s if s * s == n else None


def resize_bias_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """Official finetune loader: bicubic resize of a [(2w-1)^2, h] table to [new_len, h]."""
    old_len, heads = table.shape
    s1, s2 = _square_side(old_len), _square_side(new_len)
    t = table.detach().to(torch.float32)
    t = t.permute(1, 0).reshape(1, heads, s1, s1)
    t = F.interpolate(t, size=(s2, s2), mode="bicubic", align_corners=False)
    return t.reshape(heads, new_len).permute(1, 0).contiguous()


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.numpy()


def _leaf_meta(leaf):
    shape = tuple(leaf.shape)
    dtype = np.dtype(getattr(leaf, "dtype", np.float32))
    return shape, dtype


def _is_concrete(leaf) -> bool:
    return hasattr(leaf, "__array__")


def _rebuild(template, flat_values: dict, prefix: str = ""):
    """The template's nested structure (same key types) with leaves from `flat_values`."""
    out = {}
    for k, v in template.items():
        key = f"{prefix}{k}"
        out[k] = _rebuild(v, flat_values, key + ".") if isinstance(v, Mapping) else \
            flat_values[key]
    return out


def _check_sincos(name: str, value: torch.Tensor, dim: int, report: ConversionReport,
                  problems: list[str], allow_mismatch: bool, target_grid: int) -> None:
    shape = tuple(value.shape)
    side = _square_side(shape[1]) if len(shape) == 3 else None
    if len(shape) != 3 or shape[0] != 1 or shape[2] != dim or side is None:
        problems.append(f"{name}: shape {shape}, expected (1, G*G, {dim})")
        return
    table = L.sincos_pos_embed_2d(dim, side, side)
    dev = float(np.max(np.abs(_tensor_to_numpy(value)[0].astype(np.float64) - table)))
    if dev > APE_ATOL:
        msg = (f"{name}: not the 2-D sin-cos table of its {side}x{side} grid (max deviation "
               f"{dev:.3g}), e.g. a table bicubic-resized by the official finetune loader. "
               "mixmae-jax always adds the constant sin-cos table")
        if not allow_mismatch:
            problems.append(msg + "; pass allow_ape_mismatch=True to load anyway with the "
                            f"sin-cos table of the {target_grid}x{target_grid} grid")
            return
        warnings.warn(msg + "; replaced by the sin-cos table (allow_ape_mismatch=True)",
                      stacklevel=3)
        report.notes.append(f"{name}: file table deviates from sin-cos by {dev:.3g}; replaced by "
                            f"the {target_grid}x{target_grid} sin-cos table")
    elif side != target_grid:
        report.notes.append(
            f"{name}: sin-cos at {side}x{side} in the file; mixmae-jax uses sin-cos at "
            f"{target_grid}x{target_grid} (the official loader would bicubic-resize the table)")
    report.constants.append(name)


def _check_index(name: str, value: torch.Tensor, file_windows: dict, report: ConversionReport,
                 problems: list[str]) -> None:
    shape = tuple(value.shape)
    w = _square_side(shape[0]) if len(shape) == 2 and shape[0] == shape[1] else None
    if w is None:
        problems.append(f"{name}: shape {shape}, expected (w*w, w*w)")
        return
    if value.is_floating_point() or value.is_complex():
        problems.append(f"{name}: dtype {value.dtype}, expected an integer index")
        return
    if not np.array_equal(_tensor_to_numpy(value), L.relative_position_index(w)):
        problems.append(f"{name}: differs from the Swin relative-position index of window {w}")
        return
    table_window = file_windows.get(name.rsplit(".", 1)[0])
    if table_window is not None and table_window != w:
        problems.append(f"{name}: index of window {w}, but the file's bias table is for window "
                        f"{table_window}")
        return
    report.constants.append(name)


def state_dict_to_params(state_dict, model_cfg, template_params, *, format: str | None = None,
                         allow_ape_mismatch: bool = False):
    """Official state_dict -> (params pure dict shaped like `template_params`, ConversionReport).

    template_params: the target model's params (`nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])`
      of a `MixMIMModel` or `SwinClassifier` built from `model_cfg`); abstract leaves
      (`jax.ShapeDtypeStruct`, e.g. from `nnx.eval_shape`) are fine unless a template value has to
      be kept (a finetune file into a pretraining template keeps the decoder).
    format: what the file is, "pretrain" (`models_mixmim`) or "finetune" (`models_mixmim_ft`);
      None detects it (decoder keys / `mask_token` present -> pretrain).
    Returned leaves are host numpy arrays with the template's dtypes.
    """
    sd = _extract_state_dict(state_dict, "state_dict")
    fmt = format or _detect_format(sd)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    flat_template = K.flatten(template_params)
    torch_to_flax = {K.flax_to_torch_name(p): p for p in flat_template}
    report = ConversionReport(file_format=fmt, template_format=_template_format(flat_template))
    pretrain_template = report.template_format == "pretrain"
    # Key names do not depend on resolution, windows or the number of classes.
    expected = reference_layout(model_cfg, format=fmt, num_classes=1)
    grid = model_cfg.img_size // model_cfg.patch_size
    final_grid = grid // 2 ** (len(model_cfg.depths) - 1)

    problems: list[str] = []
    values: dict[str, np.ndarray] = {}
    file_windows = {}  # "layers.s.blocks.j.attn" -> window of the file's bias table
    for name, value in sd.items():
        if name.endswith("relative_position_bias_table") and value.ndim == 2:
            side = _square_side(value.shape[0])
            if side is not None and side % 2:
                file_windows[name.rsplit(".", 1)[0]] = (side + 1) // 2

    for name, value in sd.items():
        if name not in expected:
            problems.append(f"{name}: unexpected key for an official {fmt} checkpoint")
            continue
        if name.endswith("relative_position_index"):
            _check_index(name, value, file_windows, report, problems)
            continue
        if name == "absolute_pos_embed":
            _check_sincos(name, value, model_cfg.embed_dim, report, problems,
                          allow_ape_mismatch, grid)
            continue
        path = torch_to_flax.get(name)
        if path is None or name == "decoder_pos_embed":
            if name == "decoder_pos_embed" and pretrain_template:
                _check_sincos(name, value, model_cfg.decoder_dim, report, problems,
                              allow_ape_mismatch, final_grid)
            elif name.startswith(_PRETRAIN_ONLY) and not pretrain_template:
                report.skipped.append(f"{name}: pretraining-only, the finetuning template has "
                                      "no decoder")
            elif name.startswith("head.") and pretrain_template:
                report.skipped.append(f"{name}: finetuning head, the pretraining template has "
                                      "none")
            else:
                problems.append(f"{name}: the template has no parameter for it")
            continue
        shape, dtype = _leaf_meta(flat_template[path])
        if name.endswith("relative_position_bias_table") and tuple(value.shape) != shape:
            old = tuple(value.shape)
            if (value.ndim == 2 and len(shape) == 2 and old[1] == shape[1]
                    and (_square_side(old[0]) or 0) % 2 and (_square_side(shape[0]) or 0) % 2):
                value = resize_bias_table(value, shape[0])
                report.resized.append(f"{name}: {old} -> {shape} (bicubic, window "
                                      f"{(_square_side(old[0]) + 1) // 2} -> "
                                      f"{(_square_side(shape[0]) + 1) // 2})")
            else:
                problems.append(f"{name}: shape {old}, template {shape} (not a resizable "
                                "[(2w-1)^2, heads] table with the same number of heads)")
                continue
        array = K.from_torch_layout(path, _tensor_to_numpy(value))
        if array.shape != shape:
            hint = ""
            if name.startswith("head."):
                hint = (" (another number of classes: drop head.weight and head.bias from the "
                        "state_dict to keep the template's fresh head, as the official finetune "
                        "loader does)")
            problems.append(f"{name}: shape {tuple(value.shape)} (as {path}: {array.shape}), "
                            f"template {shape}{hint}")
            continue
        values[path] = np.array(array, dtype=dtype)
        report.loaded += 1

    # A finetune file may lack the head (official num_classes=0, or head.* dropped on purpose to
    # change the number of classes): then the template keeps its head. Both or neither.
    head_optional = fmt == "finetune" and not any(k.startswith("head.") for k in sd)
    for name in expected:
        if name not in sd and not (head_optional and name.startswith("head.")):
            problems.append(f"{name}: missing from the state_dict")

    for path, leaf in flat_template.items():
        if path in values:
            continue
        name = K.flax_to_torch_name(path)
        if name in sd or (name in expected and not (head_optional and name.startswith("head."))):
            continue  # already reported as missing or bad
        if not _is_concrete(leaf):
            problems.append(f"{name} ({path}): the {fmt} file has no value for it and the "
                            "template is abstract; pass freshly initialised template params")
            continue
        values[path] = np.asarray(leaf)
        report.kept_fresh.append(path)
    if problems:
        raise K.ConversionError(
            f"state_dict_to_params ({fmt} checkpoint -> {report.template_format} template): "
            f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return _rebuild(template_params, values), report
