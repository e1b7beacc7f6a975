"""Where the tools write, checked before they compute anything.

The convention (README, "Outputs"): a tool writes only the outputs it is given (`--out`, and a
training run's own workdir), each atomically; an existing `--out` is replaced only with
`--overwrite`; no output may be one of the tool's inputs, or a file a run owns in its workdir
(`RUN_FILES`: a new file beside them, such as `workdirs/demo/reconstruction.png`, is fine); a
place that cannot be written (a read-only directory, a path through a file, an unreachable
bucket) is named with its cause. Every refusal is an OutputError, one line naming the flag.
"""

from __future__ import annotations

import os
import uuid

# What a run owns in its workdir (train/checkpoint.py, train/metrics.py, console.py).
RUN_FILES = ("config.json", "checkpoints", "best", "metrics.jsonl", "tensorboard", "log.txt")


class OutputError(ValueError):
    """An output the tool must not or cannot write; the message starts with the flag."""


def expand(path: str) -> str:
    """`~` expanded (a shell leaves `--out=~/x` as it is)."""
    return os.path.expanduser(path) if isinstance(path, str) else path


def check_out(path: str, *, flag: str = "--out", inputs=(), overwrite: bool = False,
              folder_out: bool = False) -> str:
    """The output file `path` (expanded) if the tool may write it; else OutputError.
    folder_out: the output is a folder the tool fills (a transformers / timm export), replaced as
    a whole: an existing non-empty one only with `overwrite`."""
    path = expand(path)
    real = os.path.realpath(path)
    for item in inputs:
        if item and os.path.realpath(expand(item)) == real:
            raise OutputError(f"{flag} {path}: is one of the tool's inputs; write elsewhere")
    workdir, owned = _run_file(real)
    if workdir:
        raise OutputError(f"{flag} {path}: {owned} belongs to the run in {workdir}; write "
                          "elsewhere (a new file beside it is fine)")
    if folder_out:
        if os.path.lexists(path) and not os.path.isdir(path):
            raise OutputError(f"{flag} {path}: is a file; this output is a folder")
        if os.path.isdir(path) and os.listdir(path) and not overwrite:
            raise OutputError(f"{flag} {path}: exists; pass --overwrite to replace it")
    elif os.path.isdir(path):
        raise OutputError(f"{flag} {path}: is a directory; give a file name")
    elif os.path.lexists(path) and not overwrite:
        raise OutputError(f"{flag} {path}: exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    check_writable(folder, flag, path)
    if not folder_out and not os.path.isdir(folder):  # (an export folder's parents are made)
        raise OutputError(f"{flag} {path}: no such directory {folder}")
    return path


def _run_file(real: str) -> tuple[str, str]:
    """(workdir, its entry) when `real` is or lies inside a file a run owns, else ('', '')."""
    parts = real.split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        workdir = os.sep.join(parts[:i]) or os.sep
        if parts[i] in RUN_FILES and os.path.isfile(os.path.join(workdir, "config.json")):
            return workdir, parts[i]
    return "", ""


def check_writable(directory: str, flag: str, shown: str | None = None) -> None:
    """OutputError naming `flag` and the cause unless a file can be created in `directory` (or,
    while it does not exist, in the nearest folder above it, where it would be created).

    A probe file is created and removed: permission bits alone do not tell (root, read-only
    mounts, ACLs). gs:// and other remote paths are probed through their file system."""
    shown = shown or directory
    if "://" in directory:
        return _check_remote(directory, flag)
    folder = os.path.abspath(expand(directory))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise OutputError(f"{flag} {shown}: {folder} is a file, not a directory")
    probe = os.path.join(folder, f".mixmae-write-test-{uuid.uuid4().hex}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {shown}: cannot write in {folder} ({e.strerror})") from None


def _check_remote(path: str, flag: str) -> None:
    from etils import epath

    bucket = path.split("://", 1)[1].split("/", 1)[0]
    probe = epath.Path(path) / f".mixmae-write-test-{uuid.uuid4().hex}"
    try:
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - each file system raises its own errors
        raise OutputError(f"{flag} {path}: cannot write to bucket {bucket} "
                          f"({_remote_cause(e)})") from None


def _remote_cause(e: Exception) -> str:
    """The useful clause of a remote file system's error (TensorFlow's GCS client: the
    'error details', else the first line)."""
    text = getattr(e, "message", None) or str(e)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    if "error details: " in first:
        first = first.split("error details: ", 1)[1]
    return first[:200]


def image_format(path: str, flag: str = "--out") -> str:
    """PIL's format for the image file `path` (by its extension), or OutputError."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    formats = Image.registered_extensions()
    if ext not in formats or formats[ext] not in Image.SAVE:
        raise OutputError(f"{flag} {path}: unknown image type {ext or '(no extension)'!r}; "
                          "use .png or .jpg")
    return formats[ext]


def write_bytes(path: str, data: bytes) -> None:
    """`data` to `path` atomically: a temporary file beside it, then renamed over it."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
