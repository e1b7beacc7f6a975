"""Official PyTorch checkpoints -> mixmae-jax params.

    layout = layout_for(config)
    sd = load_torch_checkpoint("mixmim_base.pth", trust_pickle=True)   # official files pickle args
    params, report = state_dict_to_params(sd, layout, template_params)
    for line in report: print(line)

Every official key is mapped onto the template's flax paths by inverting the layout's rename
table over the template itself (no guessing); Linear / conv weights are transposed back.
Constants the target computes itself (relative-position indices, fixed sin-cos tables, shifted
window masks) are checked by the layout, not loaded. Tables the target has as parameters (a
Swin bias table of another window) may be resized by the layout like the official loaders do.

Pretraining files into finetuning templates (and the reverse) follow the official finetune flow:
keys the template has no place for (decoder and mask token / head) are skipped, template params
the file cannot provide (head / decoder) keep their template (fresh) values. A finetune file
without a head (official num_classes=0, or a head dropped to change the number of classes) also
leaves the template's head fresh. Everything else is strict: unknown keys, missing keys and shape
mismatches raise ConversionError naming each offending key.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Mapping

import numpy as np
import torch

from mixmae_jax.interop import keymap as K
from mixmae_jax.interop.keymap import ConversionError  # noqa: F401 - callers catch it here

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
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)[0]
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
    except Exception as e:  # noqa: BLE001 - any other failure: the file is not a checkpoint
        raise K.ConversionError(f"{path}: not a readable PyTorch checkpoint (torch.load: "
                                f"{type(e).__name__}: {e})") from e
    return _extract_state_dict(obj, path)


def read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a `.safetensors` file: plain tensors, nothing to unpickle, so no
    --trust-pickle."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no __iter__
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise K.ConversionError(f"{path}: not a readable .safetensors file ({e})") from e
    if not tensors:
        raise K.ConversionError(f"{path}: a .safetensors file without tensors")
    return tensors, metadata


@dataclasses.dataclass
class Checkpoint:
    """What `read_checkpoint` found: tensors in the official layout ("pth", "safetensors") or
    in a library's ("transformers", "timm", with its config.json), and the file's metadata."""

    kind: str
    tensors: dict
    foreign_config: dict | None = None
    metadata: dict = dataclasses.field(default_factory=dict)


WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_checkpoint(path, *, trust_pickle: bool = False) -> Checkpoint:
    """An official `.pth` / `.safetensors`, or a transformers or timm folder (config.json and
    model.safetensors, or pytorch_model.bin read like a .pth)."""
    import json

    path = os.fspath(path)
    if not os.path.isdir(path):
        if path.endswith(".safetensors") and os.path.isfile(path):
            tensors, metadata = read_safetensors(path)
            return Checkpoint("safetensors", tensors, metadata=metadata)
        return Checkpoint("pth", load_torch_checkpoint(path, trust_pickle=trust_pickle))
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise K.ConversionError(f"--checkpoint {path}: a folder without config.json (a "
                                "transformers or timm checkpoint folder has one)")
    try:
        with open(config_file) as f:
            foreign = json.load(f)
    except (OSError, ValueError) as e:
        raise K.ConversionError(f"{config_file}: not a readable JSON config ({e})") from e
    if not isinstance(foreign, dict) or not ("architecture" in foreign or "model_type" in foreign):
        raise K.ConversionError(f"{config_file}: neither a transformers config (model_type) nor a "
                                "timm config (architecture)")
    kind = "timm" if "architecture" in foreign else "transformers"
    weights = [os.path.join(path, w) for w in WEIGHTS if os.path.isfile(os.path.join(path, w))]
    if not weights:
        sharded = os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        raise K.ConversionError(f"--checkpoint {path}: no {' or '.join(WEIGHTS)}" + (
            " (a sharded checkpoint: merge it into one model.safetensors)" if sharded else ""))
    if weights[0].endswith(".safetensors"):
        tensors, metadata = read_safetensors(weights[0])
    else:
        tensors, metadata = load_torch_checkpoint(weights[0], trust_pickle=trust_pickle), {}
    return Checkpoint(kind, tensors, foreign, metadata)


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


def state_dict_to_params(state_dict, layout: K.Layout, template_params, *,
                         format: str | None = None, allow_ape_mismatch: bool = False,
                         absent=frozenset()):
    """Official state_dict -> (params pure dict shaped like `template_params`, ConversionReport).

    template_params: the target model's params (`nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])`
      of the method's pretraining model or its classifier, built from `layout.model_cfg`);
      abstract leaves (`jax.ShapeDtypeStruct`, e.g. from `nnx.eval_shape`) are fine unless a
      template value has to be kept (a finetune file into a pretraining template keeps the
      decoder).
    format: what the file is, "pretrain" or "finetune"; None detects it (pretraining-only keys
      present -> pretrain).
    allow_ape_mismatch: accept fixed position tables that are not the sin-cos table (warns).
    absent: official keys the file's model has no place for (a transformers ViTModel has no
      decoder, ViTMAE no `vis_mask_token`): not missing; the template keeps its values.
    Returned leaves are host numpy arrays with the template's dtypes.
    """
    sd = _extract_state_dict(state_dict, "state_dict")
    fmt = format or layout.detect_format(sd)
    if fmt not in K.FORMATS:
        raise ValueError(f"format must be one of {K.FORMATS} or None, got {format!r}")
    flat_template = K.flatten(template_params)
    flax_to_torch = {}
    for p in flat_template:
        try:
            flax_to_torch[p] = layout.torch_name(p, fmt)
        except K.ConversionError:
            pass
    torch_to_flax = {n: p for p, n in flax_to_torch.items()}
    report = ConversionReport(file_format=fmt, template_format=layout.template_format(
        flat_template))
    pretrain_template = report.template_format == "pretrain"
    # Key names do not depend on resolution, windows or the number of classes.
    expected = layout.reference_layout(fmt, num_classes=1)

    problems: list[str] = []
    values: dict[str, np.ndarray] = {}
    for name, value in sd.items():
        if name not in expected:
            problems.append(f"{name}: unexpected key for an official {fmt} checkpoint")
            continue
        path = torch_to_flax.get(name)
        if path is None:
            if name.startswith(layout.pretrain_only) and not pretrain_template:
                report.skipped.append(f"{name}: pretraining-only, the finetuning template has "
                                      "no place for it")
            elif name.startswith(layout.finetune_only) and pretrain_template:
                report.skipped.append(f"{name}: finetuning-only, the pretraining template has "
                                      "none")
            elif layout.is_constant_key(name):  # computed by the target: checked, not loaded
                problem = layout.check_constant(name, value, sd, report, allow_ape_mismatch)
                if problem:
                    problems.append(problem)
            else:
                problems.append(f"{name}: the template has no parameter for it")
            continue
        shape, dtype = _leaf_meta(flat_template[path])
        if len(value.shape) != len(shape):  # not even the template's rank: nothing to transpose
            problems.append(f"{name}: shape {tuple(value.shape)}, template {shape} (as {path})")
            continue
        array = layout.from_torch(path, K.tensor_to_numpy(value))
        if array.shape != shape:
            resized = layout.resize(name, value, shape, report)
            if resized is None:
                hint = ""
                if name.startswith("head."):
                    hint = (" (another number of classes: drop head.weight and head.bias from the "
                            "state_dict to keep the template's fresh head, as the official "
                            "finetune loader does)")
                problems.append(f"{name}: shape {tuple(value.shape)} (as {path}: {array.shape}), "
                                f"template {shape}{hint}")
                continue
            array = layout.from_torch(path, K.tensor_to_numpy(resized))
        values[path] = np.array(array, dtype=dtype)
        report.loaded += 1

    # A finetune file may lack the head (official num_classes=0, or head.* dropped on purpose to
    # change the number of classes): then the template keeps its head. All of it or none.
    head_optional = fmt == "finetune" and not any(k.startswith("head.") for k in sd)
    for name in expected:
        if name not in sd and name not in absent and not (
                head_optional and name.startswith("head.")):
            problems.append(f"{name}: missing from the state_dict")

    for path, leaf in flat_template.items():
        if path in values:
            continue
        name = flax_to_torch.get(path)
        if name is not None and name not in absent and (name in sd or (
                name in expected and not (head_optional and name.startswith("head.")))):
            continue  # already reported as missing or bad
        if not _is_concrete(leaf):
            problems.append(f"{name or path} ({path}): the {fmt} file has no value for it and "
                            "the template is abstract; pass freshly initialised template params")
            continue
        values[path] = np.asarray(leaf)
        report.kept_fresh.append(path)
    if problems:
        raise K.ConversionError(
            f"state_dict_to_params ({fmt} checkpoint -> {report.template_format} template): "
            f"{len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return _rebuild(template_params, values), report


def classifier_params(state_dict, layout: K.Layout, template, num_classes: int):
    """A fine-tuning classifier's starting params from an official checkpoint (pretraining or
    fine-tuning layout), as the official finetune loaders read it: a head of another class count
    is dropped (the template's fresh head stays); the file's computed buffers (index tables,
    masks) are checked against the file's own geometry, the classifier computes its own; fixed
    position tables become a learned table's start. Returns (params, ConversionReport)."""
    names = set()
    for path in K.flatten(template):
        try:
            names.add(layout.torch_name(path, "finetune"))
        except K.ConversionError:
            pass
    kept = {k: v for k, v in state_dict.items()
            if not (k.startswith("head.") and tuple(v.shape)[0] != num_classes)}
    if any(k.startswith("head.") for k in kept) and not all(
            k in kept for k in ("head.weight", "head.bias")):
        kept = {k: v for k, v in kept.items() if not k.startswith("head.")}
    fmt = layout.detect_format(kept)
    kept.update({k: torch.as_tensor(np.array(v))  # buffers the file lacks
                 for k, v in layout.constant_entries(fmt).items()
                 if k not in names and k not in kept})
    return state_dict_to_params(kept, layout, template, allow_ape_mismatch=True)
