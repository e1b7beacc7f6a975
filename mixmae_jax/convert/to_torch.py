"""mixmae-jax params -> the official PyTorch MixMIM state_dict, and an atomic checkpoint writer.

The official layout is the contract: `params_to_state_dict` emits exactly the keys, order, shapes
and dtypes of the reference model's `state_dict()` (`torch_reference.py`, built on the `meta`
device so even MixMIM-H costs nothing), including the entries mixmae-jax computes instead of
storing: the frozen sin-cos tables (float32) and the int64 `relative_position_index` buffers.

    sd = params_to_state_dict(params, config.model)                      # models_mixmim
    sd = params_to_state_dict(params, config.model, format="finetune")   # models_mixmim_ft
    save_torch_checkpoint(sd, "mixmim_b.pth")   # {'model': sd}, loads with weights_only=True
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import tempfile

import numpy as np
import torch

from mixmae_jax.convert import keymap as K

FORMATS = ("pretrain", "finetune")

# Fields of the model config that shape the official state_dict (the rest is training-only).
_SHAPE_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads",
                 "window_sizes", "mlp_ratio", "qkv_bias", "decoder_dim", "decoder_depth",
                 "decoder_num_heads")

# main_finetune.py re-initialises the head with timm trunc_normal_(std=2e-5) (bounds +-2).
HEAD_INIT_STD = 2e-5


def _cfg_key(model_cfg) -> tuple:
    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)
    out = []
    for field in _SHAPE_FIELDS:
        v = get(field, None)
        out.append((field, tuple(v) if isinstance(v, (list, tuple)) else v))
    if get("shift_windows", False):
        raise K.ConversionError("model.shift_windows=True has no official MixMIM layout "
                                "(MixMIM never shifts windows)")
    return tuple(out)


@functools.lru_cache(maxsize=32)
def _reference_layout(cfg_key: tuple, fmt: str, num_classes: int):
    from mixmae_jax.convert import torch_reference as R

    cfg = {k: v for k, v in cfg_key if v is not None}
    with torch.device("meta"):
        if fmt == "pretrain":
            model = R.MixMIMPretrainTorch.from_model_config(cfg)
        else:
            model = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=num_classes)
    return tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())


def reference_layout(model_cfg, *, format: str = "pretrain", num_classes: int = 1000):
    """OrderedDict key -> (shape, torch dtype) of the official state_dict for this config."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    layout = _reference_layout(_cfg_key(model_cfg), format, int(num_classes))
    return collections.OrderedDict((k, (shape, dtype)) for k, shape, dtype in layout)


def _to_numpy(value) -> np.ndarray:
    """A host numpy copy of a jax / numpy leaf (float32 unless integer)."""
    if hasattr(value, "shape") and not hasattr(value, "__array__"):
        raise K.ConversionError(f"cannot export an abstract value {value!r}; pass concrete params")
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr


def _fresh_head(num_classes: int, in_dim: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(seed))
    weight = torch.empty(num_classes, in_dim)
    torch.nn.init.trunc_normal_(weight, std=HEAD_INIT_STD, a=-2.0, b=2.0, generator=gen)
    return {"head.weight": weight, "head.bias": torch.zeros(num_classes)}


def params_to_state_dict(params, model_cfg, *, format: str = "pretrain", num_classes: int = 1000,
                         seed: int = 0) -> collections.OrderedDict[str, torch.Tensor]:
    """Flax params (pure dict from `nnx.split(model, nnx.Param)`) -> official state_dict.

    format="pretrain": `models_mixmim.MixMIM` (needs the encoder and decoder params of a
      `MixMIMModel`).
    format="finetune": `models_mixmim_ft.MixMIM`: the encoder only, decoder params are dropped;
      the head comes from `params["head"]` when present (a `SwinClassifier`), otherwise it is
      initialised fresh like official main_finetune (`head.weight` trunc-normal std 2e-5 from
      `seed`, `head.bias` zeros) with `num_classes` outputs.

    Returns an OrderedDict of CPU tensors in the official key order. Every expected key must be
    produced with the reference shape; otherwise ConversionError names each offending key.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    layout = reference_layout(model_cfg, format=format, num_classes=num_classes)
    flat = K.flatten(params)

    values: dict[str, np.ndarray | torch.Tensor] = {}
    problems: list[str] = []
    for path, value in flat.items():
        if format == "finetune" and path.startswith("decoder."):
            continue  # the finetuning model has no decoder
        try:
            name = K.flax_to_torch_name(path)
        except K.ConversionError:
            problems.append(f"{path}: no official key for this parameter")
            continue
        if name not in layout:
            problems.append(f"{name} (from {path}): not a key of the official {format} model")
            continue
        array = _to_numpy(value)
        out = K.to_torch_layout(path, array)
        if np.may_share_memory(out, array) or not out.flags.writeable:
            out = np.array(out)  # the tensor must own its memory, not alias the caller's params
        values[name] = out

    for name, value in K.constant_entries(model_cfg, pretrain=format == "pretrain").items():
        values[name] = value
    if format == "finetune" and "head.weight" in layout and not any(
            k.startswith("head.") for k in values):
        values.update(_fresh_head(num_classes, layout["head.weight"][0][1], seed))

    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for name, (shape, dtype) in layout.items():
        if name not in values:
            problems.append(f"{name}: missing (no parameter maps to it)")
            continue
        value = values[name]
        if not isinstance(value, torch.Tensor):
            value = np.ascontiguousarray(value)
            if not value.flags.writeable:  # constant tables are cached read-only arrays
                value = np.array(value)
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
        if tuple(tensor.shape) != shape:
            hint = ""
            if name.startswith("head."):
                hint = " (the params' head has a different number of classes: pass num_classes)"
            problems.append(f"{name}: shape {tuple(tensor.shape)}, official {shape}{hint}")
            continue
        out[name] = tensor.to(dtype).contiguous()
    if problems:
        raise K.ConversionError(
            f"params_to_state_dict(format={format!r}): {len(problems)} problem(s):\n  "
            + "\n  ".join(problems))
    return out


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def save_torch_checkpoint(state_dict, path) -> None:
    """Write `{'model': state_dict}` to `path` atomically.

    The bytes go to a temp file in the same directory, are fsynced, and replace `path` with
    `os.replace`: a failed or interrupted write never leaves a half-written output and never
    touches an existing file. Only tensors in plain containers are pickled, so the result loads
    with `torch.load(path, weights_only=True)`.
    """
    bad = [str(k) for k, v in state_dict.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise K.ConversionError("state_dict entries must be str -> torch.Tensor; bad entries: "
                                + ", ".join(bad))
    payload = {"model": collections.OrderedDict(
        (k, v.detach().cpu()) for k, v in state_dict.items())}
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    try:  # keep the mode of a file we replace; otherwise what a plain open() would give
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
