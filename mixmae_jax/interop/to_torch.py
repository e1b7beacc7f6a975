"""mixmae-jax params -> an official PyTorch state_dict, and an atomic checkpoint writer.

The official layout is the contract: `params_to_state_dict` emits exactly the keys, order, shapes
and dtypes of the method's official `state_dict()` (its `keymap.Layout.reference_layout`, derived
from the JAX model's parameter paths and proven equal to the plain torch references' by the
tests), including the entries mixmae-jax computes instead of storing: frozen sin-cos tables
(float32), int64 `relative_position_index` buffers, Swin's shifted-window `attn_mask` buffers.

    layout = layout_for(config)
    sd = params_to_state_dict(params, layout)                      # e.g. models_mixmim
    sd = params_to_state_dict(params, layout, format="finetune")   # e.g. models_mixmim_ft
    save_torch_checkpoint(sd, "mixmim_b.pth")   # {'model': sd}, loads with weights_only=True
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile

import numpy as np
import torch

from mixmae_jax.interop import keymap as K


def _to_numpy(value) -> np.ndarray:
    """A host numpy copy of a jax / numpy leaf (float32 unless integer)."""
    if hasattr(value, "shape") and not hasattr(value, "__array__"):
        raise K.ConversionError(f"cannot export an abstract value {value!r}; pass concrete params")
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr


def _pretrain_only(layout: K.Layout, path: str) -> bool:
    try:
        return layout.torch_name(path, "pretrain").startswith(layout.pretrain_only)
    except K.ConversionError:
        return False


def params_to_state_dict(params, layout: K.Layout, *, format: str = "pretrain",
                         num_classes: int = 1000, seed: int = 0
                         ) -> collections.OrderedDict[str, torch.Tensor]:
    """Flax params (pure dict from `nnx.split(model, nnx.Param)`) -> official state_dict.

    format="pretrain": the pretraining model (needs encoder and decoder params).
    format="finetune": the finetuning model: pretraining-only params (decoder, mask token) are
      dropped; finetuning-only entries the params lack (the head) are initialised like the
      official finetuning code (`layout.fresh_finetune_entries`, from `seed`, `num_classes`
      outputs); a classifier's own head is exported as it is.

    Returns an OrderedDict of CPU tensors in the official key order. Every expected key must be
    produced with the reference shape; otherwise ConversionError names each offending key.
    """
    reference = layout.reference_layout(format, num_classes)
    values: dict[str, np.ndarray | torch.Tensor] = {}
    problems: list[str] = []
    for path, value in K.flatten(params).items():
        try:
            name = layout.torch_name(path, format)
        except K.ConversionError:
            name = None
        if name is None or name not in reference:
            if format == "finetune" and _pretrain_only(layout, path):
                continue  # the decoder, mask token: the finetuning model has no place for them
            problems.append(f"{path}: no official key for this parameter" if name is None else
                            f"{name} (from {path}): not a key of the official {format} model")
            continue
        array = _to_numpy(value)
        if array.ndim != len(reference[name][0]):  # not even the official rank: no transpose
            problems.append(f"{name}: shape {array.shape} (as {path}), official "
                            f"{reference[name][0]}")
            continue
        out = layout.to_torch(path, array)
        if np.may_share_memory(out, array) or not out.flags.writeable:
            out = np.array(out)  # the tensor must own its memory, not alias the caller's params
        values[name] = out

    for name, value in layout.constant_entries(format).items():
        values.setdefault(name, value)  # a learned table (a classifier's pos_embed) wins
    if format == "finetune":
        missing = [k for k in reference if k not in values]
        if missing and all(k.startswith(layout.finetune_only) for k in missing):
            values.update(layout.fresh_finetune_entries(reference, num_classes, seed))

    out: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for name, (shape, dtype) in reference.items():
        if name not in values:
            problems.append(f"{name}: missing (no parameter maps to it)")
            continue
        value = values[name]
        if not isinstance(value, torch.Tensor):
            value = np.ascontiguousarray(value)
            if not value.flags.writeable:  # constant tables are cached read-only arrays
                value = np.array(value)
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
        dtype = torch.from_numpy(np.empty(0, dtype)).dtype
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


def _own_storage(tensors) -> collections.OrderedDict:
    """Contiguous CPU tensors, none sharing storage with another (safetensors refuses
    aliases)."""
    out, seen = collections.OrderedDict(), set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def _atomic(path, write) -> None:
    """`write(tmp)` a sibling temp file, fsync it, and rename it over `path` (never half a
    file, never a touched existing file on failure)."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_safetensors(tensors, path, metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a `.safetensors` file atomically, with string metadata (what a reader
    needs: method, model, image size, the run's config as JSON)."""
    from safetensors.torch import save_file

    bad = [str(k) for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise K.ConversionError("tensors must be torch.Tensor; bad entries: " + ", ".join(bad))
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    tensors = _own_storage(tensors)
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


EXPORT_FILES = ("config.json", "model.safetensors")


def save_export_dir(path, config: dict, tensors, metadata: dict[str, str] | None = None) -> None:
    """A transformers / timm checkpoint folder: config.json and model.safetensors, written into
    a sibling temp folder that then replaces `path`. An existing `path` must be such a folder
    (or empty): anything else in it is refused, never deleted."""
    import json
    import shutil

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"--out {path}: a file; this target writes a folder "
                                  f"({' + '.join(EXPORT_FILES)})")
        other = sorted(set(os.listdir(path)) - set(EXPORT_FILES))
        if other:
            raise FileExistsError(f"--out {path}: a folder holding other files ({', '.join(other)})"
                                  f"; choose a new or empty folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        save_safetensors(tensors, os.path.join(tmp, "model.safetensors"), metadata)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o755)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=parent)
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
