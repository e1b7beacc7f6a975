"""End-to-end training: a corrupt newest checkpoint, SIGTERM, kill -9, a full disk, the NaN guard,
validation (every method's two steps and exact resume are the contract suite's, test_methods.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from recipes import mixmim_config, override

from mixmae_jax import config as config_lib
from mixmae_jax import tasks
from mixmae_jax.config import ConfigError
from mixmae_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(os.path.dirname(sys.executable), "mixmae-pretrain")  # the console tool


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """32 px, 2 stages (8x8 -> 4x4 tokens), mask on the 4x4 grid, batch 8: compiles in seconds."""
    c = mixmim_config()
    c.model.update(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                   window_sizes=(4, 4), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    c.data.update(image_size=32, shuffle_buffer=64)
    c.batch_size = 8
    c.total_steps = 4
    c.optim.update(warmup_epochs=0, base_lr=1e-3)
    c.log_every = 1
    c.checkpoint_every = 2
    return override(c, overrides)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """40 random-texture PNGs of 40x40 (RandomResizedCrop to 32 has room)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(40):
        base = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((40, 40), Image.BICUBIC)
        img.save(folder / f"img_{i:03d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_folder):
    """A finished tiny run on `image_folder` (steps 1-4, checkpoints 2 and 4), in this process:
    the tests that resume, restart or break a run start from a copy of it."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    tasks.train(tiny_config(**{"data.source": "folder", "data.folder": image_folder}), workdir,
                print_fn=lambda s: None)
    return workdir


def _copy(run, tmp_path) -> str:
    return shutil.copytree(run, str(tmp_path / "run"))


def _jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resume_after_a_corrupt_newest_checkpoint_redoes_its_steps(tmp_path, image_folder,
                                                                   finished_run, monkeypatch):
    """A finished run whose newest checkpoint (step 4) was cut short: the resume says which step
    and file, moves it aside, restores step 2 and redoes 2 steps (its input stream, opened at
    step 4, is closed and opened again at step 2; both are closed when it returns). A tool's
    restore of a step without metadata names it and the steps that remain."""
    from mixmae_jax.data import input_pipeline

    stream = input_pipeline.TrainIterator
    opened, closed = [], []
    real_init, real_close = stream.__init__, stream.close
    monkeypatch.setattr(stream, "__init__",
                        lambda self, *a, **k: (opened.append(self), real_init(self, *a, **k))[1])
    monkeypatch.setattr(stream, "close", lambda self: (closed.append(self), real_close(self))[1])
    config = tiny_config(**{"data.source": "folder", "data.folder": image_folder})
    workdir = _copy(finished_run, tmp_path)
    step4 = os.path.join(workdir, "checkpoints", "4", "state")
    files = [os.path.join(d, f) for d, _, fs in os.walk(step4) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    lines = []
    config.total_steps = 5
    out = tasks.train(config, workdir, print_fn=lines.append)
    assert any(s.startswith("checkpoint step 4 (") and "moved to" in s for s in lines), lines
    assert any("Resumed from step 2" in s and "2 steps will be redone" in s for s in lines)
    assert out["step"] == 5 and os.path.isdir(os.path.join(workdir, "checkpoints", "4.unreadable"))
    assert [r["step"] for r in _jsonl(workdir)] == [1, 2, 3, 4, 5]
    # A pipeline left open holds the process ~5 s at exit (TrainIterator.close).
    assert len(opened) == 2 and set(map(id, closed)) == set(map(id, opened))

    for d, _, fs in os.walk(os.path.join(workdir, "checkpoints", "5")):
        for f in fs:
            if f == "_METADATA":
                os.remove(os.path.join(d, f))
    with pytest.raises(ValueError, match=r"checkpoint step 5 in .*cannot be read.*other steps: "
                                         r"2, 4 \(--step N\)"):
        tasks.restore_params(workdir)
    assert tasks.restore_params(workdir, 4)[2] == 4


@pytest.mark.slow
def test_resume_refuses_incompatible_config(tmp_path, image_folder, finished_run):
    workdir = _copy(finished_run, tmp_path)
    changed = tiny_config(**{"data.source": "folder", "data.folder": image_folder,
                             "model.embed_dim": 32, "total_steps": 6})
    with pytest.raises(ValueError, match="model.embed_dim"):
        tasks.train(changed, workdir, print_fn=lambda s: None)
    assert [r["step"] for r in _jsonl(workdir)] == [1, 2, 3, 4]  # nothing written


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_state(tmp_path, image_folder):
    # A huge learning rate: step 1 is finite, its update blows the weights up, a later step's
    # loss is not finite.
    config = tiny_config(**{"data.source": "folder", "data.folder": image_folder,
                            "optim.base_lr": 1e36, "checkpoint_every": 100, "total_steps": 6})
    with pytest.raises(trainer.NonFiniteLossError, match=r"not finite at step (\d+)") as info:
        tasks.train(config, str(tmp_path), print_fn=lambda s: None)
    bad = int(re.search(r"not finite at step (\d+)", str(info.value)).group(1))
    assert bad >= 2
    _, params, step = tasks.restore_params(str(tmp_path))
    assert step == bad - 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def _start_long_run(tmp_path, image_folder, stderr):
    """A tiny mixmae-pretrain run far longer than the test, once it has logged its first step
    (or given up: the caller checks it still runs): (workdir, process)."""
    workdir = str(tmp_path / "run")
    cmd = [PRETRAIN, "--config", os.path.join(REPO, "configs/mixmim_b.py") + ":tiny",
           "--workdir", workdir, "--config.data.source=folder",
           f"--config.data.folder={image_folder}", "--config.total_steps=100000",
           "--config.checkpoint_every=100000", "--config.log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
    deadline = time.time() + 240
    metrics = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            break
        time.sleep(0.5)
    return workdir, proc


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, image_folder):
    workdir, proc = _start_long_run(tmp_path, image_folder, stderr=subprocess.STDOUT)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = [line for line in out.splitlines() if "Preempted (SIGTERM): saved step" in line]
    assert saved, out
    step = int(saved[0].split("saved step ")[1].split(",")[0])
    assert step >= 1
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(step)]
    # The step in flight is the last one run, logged and saved: nothing runs after it, and the
    # (flushed) progress lines end with it, before the "Preempted" line.
    assert _jsonl(workdir)[-1]["step"] == step
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert progress[-1].startswith(f"step {step}/")
    assert out.index(progress[-1]) < out.index(saved[0])


@pytest.mark.slow
def test_ctrl_c_saves_the_step_in_flight_and_exits(tmp_path, image_folder):
    """Ctrl-C (SIGINT) as SIGTERM: the step in flight finishes and is saved, one line says so,
    no traceback; the exit status is 130, as after any Ctrl-C."""
    workdir, proc = _start_long_run(tmp_path, image_folder, stderr=subprocess.PIPE)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    saved = [line for line in out.splitlines() if "Interrupted (Ctrl-C): saved step" in line]
    assert len(saved) == 1, out
    step = int(saved[0].split("saved step ")[1].split(",")[0])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(step)]
    assert _jsonl(workdir)[-1]["step"] == step
    assert err.strip().splitlines() == ["Ctrl-C: the step in flight finishes and is saved, then "
                                        "the run exits (Ctrl-C again: exit at once, unsaved)"]


@pytest.mark.slow
def test_resume_and_restart_speak_plainly_and_keep_the_metrics_one_run(tmp_path, image_folder,
                                                                      finished_run):
    """A resume prints its config changes on the run's own output (no `WARNING:root:`) and each
    progress line once; a restart from step 0 (the earlier run died before its first checkpoint)
    drops the earlier metrics and marks the restart for TensorBoard, as a resume does."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    config = tiny_config(**{"data.source": "folder", "data.folder": image_folder,
                            "total_steps": 5})
    workdir = _copy(finished_run, tmp_path)
    lines = []
    tasks.train(config, workdir, print_fn=lines.append)
    assert "Resuming with config change total_steps: 4 -> 5" in lines, lines
    assert [line.split(" |")[0] for line in lines if line.startswith("step ")] == ["step 5/5"]
    assert any(", 1 device, global batch 8, 5 steps/epoch, steps 4 -> 5" in line
               for line in lines), lines

    shutil.rmtree(os.path.join(workdir, "checkpoints"))  # as if killed before its first save
    lines = []
    tasks.train(config, workdir, print_fn=lines.append)
    assert "Dropped 5 lines of metrics.jsonl past step 0" in lines, lines
    assert [r["step"] for r in _jsonl(workdir)] == [1, 2, 3, 4, 5]
    acc = plugin_event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                                    purge_orphaned_data=True)
    acc.Reload()
    assert [e.step for e in acc.Tensors("loss")] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_skipped_images_are_named_on_the_console(tmp_path, image_folder):
    """data.skip_corrupt: the run names (and counts) what it skipped, not only metrics.jsonl."""
    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    names = sorted(os.listdir(folder))
    for name in names[9:]:
        os.remove(folder / name)
    (folder / names[0]).write_bytes(b"\x89PNG\r\n\x1a\n cut short")  # 1 bad, 8 good
    config = tiny_config(**{"data.source": "folder", "data.folder": str(folder),
                            "data.skip_corrupt": True, "total_steps": 2})
    lines = []
    tasks.train(config, str(tmp_path / "run"), print_fn=lines.append)
    skipped = [line for line in lines if line.startswith("Skipped ")]
    assert skipped and re.fullmatch(  # met once per epoch, and prefetched ahead of the step
        rf"Skipped (\d+) unreadable images? \(data.skip_corrupt\): "
        rf"{re.escape(str(folder / names[0]))}( \(\1 times\))?; \1 so far", skipped[0]), skipped
    assert _jsonl(str(tmp_path / "run"))[-1]["corrupt_images"] >= 1


def _tool(*args, **kwargs):
    return subprocess.run([PRETRAIN, *map(str, args)], capture_output=True, text=True, **kwargs)


def _in_process(*args):
    """mixmae-pretrain's entry point with these arguments, in this process: the runs that set up
    or check a fault test's workdir, which need not pay a process start (the tool process is the
    one the fault happens to)."""
    from mixmae_jax import cli

    cli.pretrain_main([str(a) for a in args])


@pytest.mark.slow
def test_library_output_stays_off_the_terminal(tmp_path, image_folder):
    """TensorFlow's start-up lines and deprecation warnings go to the log, not around the one
    error line (a refusal after TensorFlow started: too few images for a batch)."""
    folder = tmp_path / "few"
    folder.mkdir()
    for name in sorted(os.listdir(image_folder))[:3]:
        shutil.copy(os.path.join(image_folder, name), folder)
    proc = _tool("--config", os.path.join(REPO, "configs/mixmim_b.py") + ":tiny",
                 "--workdir", tmp_path / "run", "--config.data.source=folder",
                 f"--config.data.folder={folder}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: image folder '{folder}' has 3 usable images, fewer than one global batch "
        "(batch_size=8); lower batch_size"], proc.stderr
    assert not os.path.exists(tmp_path / "run")


def _tool_args(image_folder, workdir):
    """A tiny MixMIM run of `mixmae-pretrain` on `image_folder`, checkpoints every 2 steps."""
    return ["--config", os.path.join(REPO, "configs/mixmim_b.py") + ":tiny", "--workdir",
            workdir, "--config.data.source=folder", f"--config.data.folder={image_folder}",
            "--config.checkpoint_every=2", "--config.log_every=1"]


@pytest.fixture(scope="module")
def finished_tool_run(tmp_path_factory, image_folder):
    """`_tool_args`'s run of steps 1-4 (checkpoints 2 and 4), through the tool's entry point in
    this process: the fault tests start their tool process on a copy of it."""
    workdir = str(tmp_path_factory.mktemp("finished_tool") / "run")
    _in_process(*_tool_args(image_folder, workdir), "--config.total_steps=4")
    return workdir


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_reported_in_one_plain_line(tmp_path, image_folder,
                                                                     finished_tool_run):
    """The quarantine of an unreadable newest step says which file is truncated, in one line on
    the run's output; TensorStore's coroutine tracebacks and TensorFlow's lines go to log.txt,
    so stderr stays empty."""
    workdir = _copy(finished_tool_run, tmp_path)
    args = _tool_args(image_folder, workdir)
    for d, _, files in os.walk(os.path.join(workdir, "checkpoints", "4")):
        for f in files:
            if os.path.basename(d) == "d":
                os.truncate(os.path.join(d, f), 10)
    proc = _tool(*args, "--config.total_steps=5")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    moved = [line for line in proc.stdout.splitlines() if "cannot be read" in line]
    assert len(moved) == 1, proc.stdout
    assert re.match(r"checkpoint step 4 \(\S+\) cannot be read \(\S+/d/\w+ is truncated: 10 of "
                    r"its \d+ bytes\); moved to \S+/4\.unreadable$", moved[0]), moved[0]
    assert "Resumed from step 2" in proc.stdout
    assert "==== mixmae-pretrain" in open(os.path.join(workdir, "log.txt")).read()


# ---------------------------------------------------------------------------------------------
# Config validation (no compilation involved)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, devices, key", [
    ({"model.window_sizes": (3, 4)}, 1, "model.window_sizes"),
    ({"model.img_size": 30}, 1, "model.img_size"),
    ({"model.num_heads": (3, 4)}, 1, "model.num_heads"),
    ({"model.depths": (1, 1, 1)}, 1, "model.depths"),
    ({"data.image_size": 64}, 1, "data.image_size"),
    ({"batch_size": 12}, 8, "batch_size"),
    ({"batch_size": 8}, 8, "batch_size"),  # one image per device cannot be paired
    ({"method.mask_ratio": 1.0}, 1, "method.mask_ratio"),
    ({"optim.grad_accum_steps": 3}, 1, "optim.grad_accum_steps"),
    ({"compute_dtype": "float16"}, 1, "compute_dtype"),
    ({"data.source": "folder"}, 1, "data.folder"),
    ({"model.remat": "sometimes"}, 1, "model.remat"),
])
def test_validation_names_the_key(overrides, devices, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        config_lib.validate(tiny_config(**overrides), num_devices=devices)


@pytest.mark.slow
def test_tensorboard_reads_a_resumed_run_as_one(tmp_path, image_folder, finished_run):
    """A run logs steps 1-4, dies before saving step 4 (its checkpoint is lost), resumes from
    step 2 and runs 3-4: metrics.jsonl and TensorBoard (its loader, which drops the orphaned
    steps 3-4 when the steps restart) both hold one value per step, the resumed run's."""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    config = tiny_config(**{"data.source": "folder", "data.folder": image_folder})
    workdir = _copy(finished_run, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # killed before step 4 was saved
    tasks.train(config, workdir, print_fn=lambda s: None)
    rows = _jsonl(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # The loader TensorBoard's server uses (v2 summaries are tensors).
    acc = plugin_event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"),
                                                    purge_orphaned_data=True)
    acc.Reload()
    events = acc.Tensors("loss")
    assert [e.step for e in events] == [1, 2, 3, 4]
    values = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
    np.testing.assert_allclose(values, [r["loss"] for r in rows], rtol=1e-6)


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_then_resume_logs_the_same_losses(tmp_path,
                                                                         image_folder):
    """The fault suite's core: a run killed with SIGKILL three times (checkpoints every 2 steps,
    asynchronous, so kills land during writes too) and resumed each time logs exactly the
    losses of an uninterrupted run, step for step."""
    total = 16
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    # the same program as the tool's (flags, compilation cache)
    _in_process(*_tool_args(image_folder, straight), f"--config.total_steps={total}")
    rng = np.random.default_rng(0)
    path = os.path.join(killed, "metrics.jsonl")

    def lines():  # raw lines: a kill may have cut the last one short
        return len(open(path).read().splitlines()) if os.path.exists(path) else 0

    kills = 0
    for _ in range(8):
        proc = subprocess.Popen([PRETRAIN, *_tool_args(image_folder, killed),
                                 f"--config.total_steps={total}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if kills < 3:
            # Kill a random number of logged steps into this attempt.
            target = lines() + int(rng.integers(2, 5))
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None and lines() < target:
                time.sleep(0.05)
            if proc.poll() is None:
                time.sleep(float(rng.uniform(0, 0.3)))  # somewhere inside the next steps
                proc.kill()
                kills += 1
        proc.wait(timeout=300)
        if proc.returncode == 0 and tasks.restore_params(killed)[2] == total:
            break
    assert kills == 3
    by_step = lambda rows: {r["step"]: r["loss"] for r in rows}  # noqa: E731
    a, b = by_step(_jsonl(straight)), by_step(_jsonl(killed))
    assert sorted(b) == list(range(1, total + 1))
    assert a == b


@pytest.mark.slow
def test_a_full_disk_during_a_save_ends_with_one_clear_error_and_an_intact_checkpoint(
        tmp_path, image_folder, finished_tool_run):
    """A resumed run whose checkpoint write fails (the process may write files of at most
    256 KiB: RLIMIT_FSIZE, as a full disk) stops at its next checkpoint step with one `error:`
    line naming the step, the directory and the newest intact step; that step resumes."""
    import resource

    workdir = _copy(finished_tool_run, tmp_path)
    args = _tool_args(image_folder, workdir)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    # It reads the suite's compilation cache but writes nothing there: an entry cut at 256 KiB
    # would greet the next run with an unreadable-entry warning.
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=str(1 << 40))
    proc = _tool(*args, "--config.total_steps=8", preexec_fn=limit_file_size, env=env)
    assert proc.returncode == 2
    # Orbax's writer threads' tracebacks go to the run's log.txt: stderr holds our one line.
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    errors = re.findall(r"error: checkpoint step 6 could not be written in \S*checkpoints "
                        r"\((.*?)\); the newest intact checkpoint is step 4", proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "File too large" in errors[0] or "Failed to write" in errors[0], errors
    assert tasks.restore_params(workdir)[2] == 4
    _in_process(*args, "--config.total_steps=8")
    assert tasks.restore_params(workdir)[2] == 8
