"""Checkpoints: a thin wrapper over Orbax's (v0) CheckpointManager, a config snapshot, SIGTERM.

Layout of a workdir:

    config.json                 snapshot of the run config (checked on resume)
    checkpoints/<step>/state    the train state pytree (Orbax, tensorstore arrays)

The input position is not stored: it is a function of the step (see data/input_pipeline.py).

Saves are asynchronous: `save` returns once it holds the arrays (so a train step may donate them
next; tested), a background thread writes them, and the next save, `wait()` or `close()` waits.
Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an
interrupted save is never listed as a step. Such leftovers are not deleted automatically
(Orbax's `cleanup_tmp_directories` would also delete the save in progress of a run when a tool
opens its workdir); remove them by hand if the disk space matters.

Restores go into an abstract tree of `jax.ShapeDtypeStruct`s carrying shardings, so a run can
resume on a different mesh (see `sharding.state_shardings` / `abstract_with_shardings`).

Preemption and Ctrl-C, in the train loop (`install_preemption_handler` before the loop):

    preempt = install_preemption_handler()
    for step in ...:
        state, metrics = train_step(state, batch)
        ckpt.save(step + 1, state)                      # every `save_every` steps
        if preempt.should_stop(step + 1):
            ckpt.save(step + 1, state, force=True)
            break
    ckpt.close()                                        # waits for the async write

On a single process SIGTERM and SIGINT (Ctrl-C) only raise a flag; the step finishes, the state
is saved and the loop ends cleanly. With several processes JAX's preemption service (started by
`jax.distributed.initialize`) catches SIGTERM itself and `should_stop` asks it for the step all
processes agree on, so every process saves the same step; a Ctrl-C is handed to that service as
a SIGTERM of its own process. A second Ctrl-C ends the process at once, unsaved.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mixmae_jax import config as config_lib
from mixmae_jax import models

CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"  # a fine-tuning run's best params (tasks/finetune.py)

# Resuming with a different value under these keys would silently train a different model or
# optimiser (or fail to restore the state), so it is refused. Other keys (run length, logging and
# checkpoint cadence, mesh, sharding rules, data location and prefetch, ...) may change.
PROTECTED_CONFIG_KEYS = ("model", "method", "optim", "batch_size")
# Execution strategy only: the same numbers (up to float rounding), other memory or speed.
SAFE_PROTECTED_KEYS = ("model.remat", "model.scan_blocks")


class ConfigMismatchError(ValueError):
    """The config differs from the stored snapshot in keys that make resuming unsafe."""


# ---------------------------------------------------------------------------------------------
# Config snapshot
# ---------------------------------------------------------------------------------------------


def load_config_snapshot(workdir: str):
    """The config a run was started with (config.json beside its checkpoints)."""
    import ml_collections

    path = epath.Path(workdir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config snapshot; is {workdir!r} a mixmae workdir?")
    return ml_collections.ConfigDict(read_config_snapshot(path))


def read_config_snapshot(path: epath.Path) -> dict:
    """The dict in a config.json; a file that is not one is named with the cause."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        cause = "not text: was it overwritten by another file?"
    except json.JSONDecodeError as e:
        cause = f"not JSON: {e.msg} at line {e.lineno}"
    else:
        if isinstance(config, dict):
            return config
        cause = f"a JSON {type(config).__name__}, not the run's config"
    raise ValueError(f"{path}: the run's config snapshot cannot be read ({cause})")


def config_to_dict(config: Any) -> dict:
    """JSON-normalised dict of a ConfigDict (tuples become lists, as they do in the snapshot)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort(sort_keys=True))
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


ABSENT = "<absent>"  # the value config_changes reports for a key one side lacks


def config_changes(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf that differs, was added or was removed."""
    a, b = _flatten(old), _flatten(new)
    return {
        k: (a.get(k, ABSENT), b.get(k, ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, ABSENT) != b.get(k, ABSENT)
    }


def _is_protected(key: str) -> bool:
    def under(prefix):
        return key == prefix or key.startswith(prefix + ".")

    return any(map(under, PROTECTED_CONFIG_KEYS)) and not any(map(under, SAFE_PROTECTED_KEYS))


def absent_key_defaults(config: Mapping) -> dict[str, Any]:
    """{dotted key: value} a config that lacks the key ran with.

    A key is added with the old behaviour as its default, in the model's `model_config()` (a
    `model.*` key, which `models.with_defaults` also fills into an old snapshot) or in
    `config.defaults()` (the others): a snapshot written before the key existed ran with that
    value.
    """
    out = _flatten(config_to_dict(config_lib.defaults()))
    name = config.get("model", {}).get("name")
    if name in models.NAMES:
        defaults = config_to_dict(models.get_model_module(name).model_config())
        out.update({f"model.{k}": v for k, v in _flatten(defaults).items()})
    return out


def check_config_compatible(old: Mapping, new: Mapping, where: str = CONFIG_NAME) -> dict:
    """Raise ConfigMismatchError naming each unsafe change; return all changes otherwise.

    A key missing from `old` (a snapshot older than the key) that `new` sets to the value the
    run had without it (`absent_key_defaults`) changes nothing, so it is allowed.
    """
    absent_defaults = absent_key_defaults(new)
    changes = config_changes(old, new)

    def unsafe(key, old_value, new_value):
        if old_value == ABSENT and key in absent_defaults:
            return new_value != absent_defaults[key]
        return _is_protected(key)

    bad = {k: v for k, v in changes.items() if unsafe(k, *v)}
    if bad:
        keys = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in bad.items())
        # No way around it is offered: the checkpoints hold the snapshot's model and optimizer.
        raise ConfigMismatchError(
            f"Refusing to resume: the config differs from the snapshot in {where} in "
            f"{len(bad)} key(s) that change the model, method or optimiser ({keys}); resume "
            "with the snapshot's values, or use a new workdir for the new config"
        )
    return changes


def write_atomic(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)  # readers see the old file or the new one, never a partial one


# ---------------------------------------------------------------------------------------------
# Checkpointer
# ---------------------------------------------------------------------------------------------


class CheckpointWriteError(ValueError):
    """An asynchronous checkpoint write failed (a full disk, a file-size limit, no permission)."""


class CheckpointReadError(ValueError):
    """No checkpoint step of a workdir can be read."""


def read_error_cause(error: Exception, limit: int = 200) -> str:
    """Why a step cannot be read, in plain words: the truncated file if that is it, else the
    error's first clauses without TensorStore's specs and Python object reprs."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    truncated = re.search(r'file "([^"]+)": Requested byte range \[\d+, (\d+)\) is not valid for '
                          r"value of size (\d+)", text)
    if truncated:
        path, want, size = truncated.groups()
        return f"{path} is truncated: {size} of its {want} bytes"
    text = re.sub(r"<[^<>]*>", "...", text.split(" [tensorstore_spec")[0])
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Checkpointer:
    """Async Orbax checkpoints of the train state every `save_every` steps, the last `keep` kept.

    Every process must call `save`/`restore` (they synchronise); only process 0 writes
    config.json. `save_every <= 0` saves only when forced; `keep <= 0` keeps everything.
    `config`: refuse it if it cannot resume the run there (ConfigMismatchError, nothing written),
    else write it as the snapshot; `config_changes` lists what it changes. `read_only`: a tool's
    view of a run (nothing is created or written).
    """

    def __init__(self, workdir: str | os.PathLike, *, save_every: int, keep: int, config=None,
                 subdir: str = CHECKPOINT_DIR, read_only: bool = False):
        workdir = os.fspath(workdir)
        if "://" not in workdir:  # Orbax's tensorstore paths must be absolute
            workdir = os.path.abspath(workdir)
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / subdir  # e.g. fine-tuning's best params in "best"
        policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
        if save_every > 0:
            policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(save_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep if keep > 0 else None),
            enable_async_checkpointing=True,
            cleanup_tmp_directories=False,  # see the module docstring
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state",), options=options
        )
        self._pending: int | None = None  # the step of the last asynchronous save started
        self.config_changes: dict[str, tuple[Any, Any]] = {}
        if config is not None:
            try:
                self._snapshot_config(config)
            except Exception:
                self._manager.close()
                raise

    def _snapshot_config(self, config: Any) -> None:
        path = self.workdir / CONFIG_NAME
        new = config_to_dict(config)
        if self.latest_step() is not None and path.exists():
            self.config_changes = check_config_compatible(read_config_snapshot(path), new,
                                                          os.fspath(path))
        if jax.process_index() == 0:
            write_atomic(path, json.dumps(new, indent=2, sort_keys=True) + "\n")

    def _write_failed(self, error: Exception) -> CheckpointWriteError:
        step = self._pending
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        for cause in ("No space left on device", "File too large", "Permission denied",
                      "Disk quota exceeded"):
            if cause in reason:
                reason = cause
                break
        else:
            reason = reason[:200]
        intact = [s for s in self.all_steps() if s != step]
        newest = f"step {max(intact)}" if intact else "none"
        return CheckpointWriteError(
            f"checkpoint step {step} could not be written in {self.directory} ({reason}); the "
            f"newest intact checkpoint is {newest}: free space or fix the location, then run "
            "the same command to resume from it")

    def _check_pending(self, wait: bool = False) -> None:
        """Raises CheckpointWriteError if the last asynchronous save failed (when `wait`: after
        waiting for it)."""
        if self._pending is None:
            return
        try:
            if wait:
                self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - whatever the storage layer raised
            error = self._write_failed(e)
            self._pending = None
            raise error from e

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Start saving `state` at `step` if due; True if so.

        Due means: a multiple of `save_every`, a preemption sync point, or `force`. A step that
        is already saved is never written twice.
        """
        step = int(step)
        self._check_pending()  # a failed earlier write stops the run here, named
        if step in self._manager.all_steps():
            return False
        try:
            started = self._manager.save(
                step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)
        except Exception as e:  # noqa: BLE001 - Orbax waits for the previous write first
            if self._pending is None:
                self._pending = step
            raise self._write_failed(e) from e
        if started:
            self._pending = step
        return started

    def restore(self, step: int | None, abstract_state: Any) -> Any:
        """The state saved at `step` (None: the latest), placed as `abstract_state`'s shardings."""
        step = self._resolve(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self._manager.restore(step, args=args)["state"]

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Only the `params` subtree of a step (tools: no optimizer moments, ~1/3 the memory)."""
        step = self._resolve(step)
        item = {"params": abstract_params}
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
        return self._manager.restore(step, args=args)["state"]["params"]

    def restore_newest_intact(self, abstract_state: Any, warn=logging.warning):
        """(step, state) of the newest step that can be read, or (None, None) if there are none.

        Steps that cannot be read (truncated or missing files, missing metadata) are moved aside
        to `checkpoints/<step>.unreadable[-k]`, never deleted, once an older step has restored:
        if no step restores, the cause is likely not the files (a changed model, a full disk),
        so nothing is moved and CheckpointReadError names every step tried.
        """
        failed = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure: try an older step
                failed.append((step, read_error_cause(e)))
                continue
            for bad, reason in failed:
                aside = self._move_aside(bad)
                warn(f"checkpoint step {bad} ({self.directory / str(bad)}) cannot be read "
                     f"({reason}); moved to {aside}")
            return step, state
        if failed:
            raise CheckpointReadError(
                f"no checkpoint in {self.directory} can be read (steps "
                f"{', '.join(str(s) for s, _ in failed)}; newest: {failed[0][1]}). Nothing was "
                "moved; fix the cause or use a new workdir.")
        return None, None

    def _move_aside(self, step: int) -> epath.Path:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.unreadable"
        k = 1
        while dst.exists():
            dst, k = self.directory / f"{step}.unreadable-{k}", k + 1
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mixmae_move_aside_{step}")
        self._manager.reload()
        return dst

    def _resolve(self, step: int | None) -> int:
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
        return step

    def wait(self) -> None:
        """Block until the last asynchronous save is on disk; CheckpointWriteError if it failed."""
        self._check_pending(wait=True)
        self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 - the write error above is the one to report
                if self._pending is not None:
                    raise


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------


class PreemptionHandler:
    """SIGTERM and SIGINT (Ctrl-C) set `requested`; `should_stop(step)` is what the train loop
    asks every step. `stopped_by` names what asked ("SIGTERM" or "Ctrl-C").

    The Python handlers only set flags (they run between bytecodes of the main thread, which
    may be inside a print). A watcher thread reads the signals from Python's wakeup descriptor,
    which the C handler writes at once even while the main thread waits on a compile or a step:
    it says what will happen, and on a second Ctrl-C ends the process then and there.
    """

    def __init__(self, say=print):
        self.requested = False
        self.stopped_by: str | None = None
        self._say = say
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int] | None = None  # (read end, write end) of the pipe
        self._previous_wakeup = -1
        self._watcher: threading.Thread | None = None
        # With several processes, JAX's preemption service owns SIGTERM and picks a common step;
        # replacing its C++ handler with ours would break that, so we only install ours otherwise.
        # (Several processes with that service disabled each see only their own SIGTERM: they
        # may stop at different steps, so keep the service on for multi-host runs.)
        self._use_jax_sync = jax.process_count() > 1 and jax.config.jax_enable_preemption_service

    def _on_signal(self, signum, frame) -> None:
        del frame
        if signum == signal.SIGINT and self._use_jax_sync:
            return  # the watcher hands it to JAX's service as a SIGTERM
        self.requested = True
        self.stopped_by = self.stopped_by or _SIGNAL_NAMES[signum]

    def _watch(self, fd: int) -> None:
        interrupts = 0
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # uninstalled
                return
            for signum in data:
                if signum == signal.SIGTERM:
                    self._say("SIGTERM: the step in flight finishes and is saved, then the run "
                              "exits")
                elif signum == signal.SIGINT:
                    interrupts += 1
                    if interrupts > 1:
                        self._say("Ctrl-C again: exiting at once; the steps since the last "
                                  "saved checkpoint are lost")
                        os._exit(130)
                    self.stopped_by = "Ctrl-C"
                    if self._use_jax_sync:  # every process stops at the step JAX agrees on
                        os.kill(os.getpid(), signal.SIGTERM)
                    self._say("Ctrl-C: the step in flight finishes and is saved, then the run "
                              "exits (Ctrl-C again: exit at once, unsaved)")

    def install(self) -> PreemptionHandler:
        signals = [signal.SIGINT] + ([] if self._use_jax_sync else [signal.SIGTERM])
        try:
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        except ValueError:  # not the main thread: signals stay as they were
            logging.warning("signal handlers not installed (not in the main thread)")
            return self
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._wakeup = (read, write)
        self._watcher = threading.Thread(target=self._watch, args=(read,), daemon=True,
                                         name="mixmae-signals")
        self._watcher.start()
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup)
            read, write = self._wakeup
            os.close(write)  # the watcher reads the end of the pipe and returns
            self._watcher.join(timeout=5)
            os.close(read)
            self._wakeup = None

    def should_stop(self, step: int) -> bool:
        """True when the loop should save `step` and exit. Call it on every process every step."""
        if self._use_jax_sync and multihost_utils.reached_preemption_sync_point(int(step)):
            self.requested = True
            self.stopped_by = self.stopped_by or "SIGTERM"
        return self.requested


_SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


def install_preemption_handler(say=print) -> PreemptionHandler:
    """Catch SIGTERM (preemption notice) and Ctrl-C from now on; `say` tells the user what
    happens. See the module docstring for the loop."""
    return PreemptionHandler(say).install()
