"""Checkpoints: bit-exact round trip, keep-K, interrupted saves, config snapshot, preemption, mesh
changes between save and restore."""

import json
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_subprocess import run_python
from recipes import mixmim_config

from mixmae_jax.train import checkpoint, optim, sharding


def _config():
    c = mixmim_config()
    c.epochs, c.optim.warmup_epochs = 2, 1
    return c


def _state(seed=0):
    """A train state with non-trivial params and Adam moments (one update applied)."""
    rng = np.random.default_rng(seed)
    params = {
        "encoder": {
            "layers": {
                0: {
                    "blocks": {
                        1: {
                            "attn": {
                                "qkv": {
                                    "kernel": rng.normal(size=(8, 24)),
                                    "bias": rng.normal(size=24),
                                },
                                "relative_position_bias_table": rng.normal(size=(9, 2)),
                            }
                        }
                    }
                }
            }
        },
        "decoder": {"mask_token": rng.normal(size=(1, 1, 8))},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    tx, _ = optim.make_optimizer(_config(), 4)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: x * 0.1 + 1.0, params)
    for _ in range(3):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.int32(7),
        "rng": jax.random.PRNGKey(seed),
    }


def _abstract(state):
    mesh = sharding.make_mesh(_config().mesh)
    return sharding.abstract_with_shardings(state, sharding.state_shardings(state, mesh))


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_is_bit_exact(tmp_path):
    state = _state()
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=10, keep=3, config=_config())
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, force=True)
    ckpt.close()

    ckpt = checkpoint.Checkpointer(tmp_path, save_every=10, keep=3, config=_config())
    assert ckpt.latest_step() == 7
    restored = ckpt.restore(None, _abstract(state))
    _assert_same(restored, state)
    with pytest.raises(FileNotFoundError, match="step 8"):
        ckpt.restore(8, _abstract(state))
    ckpt.close()


def _two_steps(tmp_path):
    """Steps 2 and 4 saved (different states); returns the states."""
    states = {2: _state(2), 4: _state(4)}
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=0, keep=0, config=_config())
    for step, st in states.items():
        ckpt.save(step, st, force=True)
    ckpt.close()
    return states


def _truncate_largest_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated file", "missing metadata", "deleted directory"])
def test_an_unreadable_newest_step_is_moved_aside_and_the_previous_one_restored(tmp_path,
                                                                                damage):
    states = _two_steps(tmp_path)
    step4 = tmp_path / checkpoint.CHECKPOINT_DIR / "4"
    if damage == "truncated file":
        _truncate_largest_file(step4 / "state")
    elif damage == "missing metadata":
        for p in step4.rglob("_METADATA"):
            p.unlink()
    else:
        for p in sorted(step4.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    warnings = []
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=0, keep=0)
    step, restored = ckpt.restore_newest_intact(_abstract(states[2]), warn=warnings.append)
    assert step == 2
    _assert_same(restored, states[2])
    assert ckpt.all_steps() == [2]
    ckpt.close()
    assert len(warnings) == 1 and "checkpoint step 4 (" in warnings[0]
    assert "moved to" in warnings[0] and (step4.parent / "4.unreadable").exists()


def test_nothing_is_moved_when_no_step_can_be_read(tmp_path):
    states = _two_steps(tmp_path)
    for step in (2, 4):
        _truncate_largest_file(tmp_path / checkpoint.CHECKPOINT_DIR / str(step) / "state")
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=0, keep=0)
    with pytest.raises(checkpoint.CheckpointReadError, match="steps 4, 2"):
        ckpt.restore_newest_intact(_abstract(states[2]))
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


def test_tools_restore_the_params_alone(tmp_path):
    states = _two_steps(tmp_path)
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=0, keep=0)
    params = ckpt.restore_params(4, _abstract(states[4])["params"])
    ckpt.close()
    _assert_same(params, states[4]["params"])


def test_interval_keep_and_forced_saves(tmp_path):
    state = _state()
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=2, keep=2)
    saved = [s for s in range(7) if ckpt.save(s, state)]
    assert saved == [0, 2, 4, 6]
    assert ckpt.save(7, state, force=True)  # e.g. on preemption
    assert not ckpt.save(7, state, force=True)  # never written twice
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]
    ckpt.close()


def test_async_save_survives_buffer_donation(tmp_path):
    # The train step donates the state it was given; an async save of that state must still write
    # the values it was given. (On CPU, JAX skips the donation while the save holds the buffers;
    # on accelerators Orbax has copied them to the host before `save` returns.)
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    state = step(_state())
    expected = jax.tree.map(np.array, state)
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2)
    assert ckpt.save(1, state)
    for _ in range(3):
        state = step(state)
    jax.block_until_ready(state)
    ckpt.wait()
    _assert_same(ckpt.restore(1, _abstract(expected)), expected)
    ckpt.close()


def test_interrupted_save_is_never_the_latest(tmp_path):
    state = _state()
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=5)
    ckpt.save(3, state)
    ckpt.close()
    # A save killed half-way leaves Orbax's temporary directory behind, here even with content.
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(ckpt_dir / "3", ckpt_dir / "9.orbax-checkpoint-tmp-1795000000")

    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=5)
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    _assert_same(ckpt.restore(None, _abstract(state)), state)
    # The resumed run saves that step again, beside the leftover.
    later = jax.tree.map(lambda x: x + 1, state)
    assert ckpt.save(9, later)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 9]
    _assert_same(ckpt.restore(None, _abstract(state)), later)
    ckpt.close()


def test_config_snapshot_refuses_incompatible_changes(tmp_path):
    cfg = _config()
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=cfg)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["optim"]["b2"] == 0.95 and stored["model"]["depths"] == [2, 2, 18, 2]
    ckpt.save(1, _state())
    ckpt.close()

    bad = _config()
    bad.optim.base_lr = 3e-4
    bad.model.depths = (2, 2, 6, 2)
    bad.log_every = 7  # compatible, not reported as a problem
    with pytest.raises(checkpoint.ConfigMismatchError) as err:
        checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=bad)
    msg = str(err.value)
    assert "optim.base_lr: 0.00015 -> 0.0003" in msg
    assert "model.depths: [2, 2, 18, 2] -> [2, 2, 6, 2]" in msg
    assert "log_every" not in msg and "2 key(s)" in msg
    # One line, and no advice that fails (deleting config.json leads to Orbax's shape error).
    assert "\n" not in msg and "delete" not in msg and "resume with the snapshot's values" in msg
    assert json.loads((tmp_path / "config.json").read_text()) == stored  # left untouched

    ok = _config()
    ok.total_steps, ok.epochs, ok.log_every, ok.checkpoint_every = 500, 800, 7, 100
    ok.mesh.fsdp, ok.sharding_rules = 4, (("FSDP_DEFAULT", "fsdp"),)
    ok.data.prefetch, ok.data.skip_corrupt, ok.model.remat = 4, True, "full"
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=ok).close()
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 800


def test_resume_accepts_a_model_key_newer_than_the_snapshot_at_its_default(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=_config())
    ckpt.save(1, _state())
    ckpt.close()
    # A snapshot written before model.ape_grid existed: the run used what absence means (0).
    path = tmp_path / "config.json"
    stored = json.loads(path.read_text())
    assert stored["model"].pop("ape_grid") == 0
    path.write_text(json.dumps(stored))

    changed = _config()
    changed.model.ape_grid = 56  # a different table: refused, and the snapshot is kept
    with pytest.raises(checkpoint.ConfigMismatchError, match=r"model.ape_grid: '<absent>' -> 56"):
        checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=changed)
    assert json.loads(path.read_text()) == stored
    # A protected key the model does not define stays refused when it appears.
    extra = _config()
    extra.model.unknown_key = 0
    with pytest.raises(checkpoint.ConfigMismatchError, match="model.unknown_key"):
        checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=extra)

    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=_config()).close()
    assert json.loads(path.read_text())["model"]["ape_grid"] == 0  # the snapshot catches up


def test_resume_accepts_an_infrastructure_key_newer_than_the_snapshot_at_its_default(tmp_path):
    """optim.warmup_steps came after runs had started: absent, they counted warmup in epochs,
    which is the key's default (-1); any other value would change the schedule."""
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=_config())
    ckpt.save(1, _state())
    ckpt.close()
    path = tmp_path / "config.json"
    stored = json.loads(path.read_text())
    assert stored["optim"].pop("warmup_steps") == -1
    path.write_text(json.dumps(stored))

    changed = _config()
    changed.optim.warmup_steps = 5
    with pytest.raises(checkpoint.ConfigMismatchError,
                       match=r"optim.warmup_steps: '<absent>' -> 5"):
        checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=changed)
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=_config()).close()
    assert json.loads(path.read_text())["optim"]["warmup_steps"] == -1


def test_config_without_checkpoint_may_change(tmp_path):
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=_config()).close()
    other = _config()
    other.batch_size = 64  # nothing saved yet: a fresh start, not a resume
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=other).close()
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 64
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]


def test_sigterm_requests_a_save_and_stop(tmp_path):
    handler = checkpoint.install_preemption_handler()
    try:
        assert not handler.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.requested and handler.should_stop(1)
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not handler._on_signal


def test_ctrl_c_requests_a_save_and_stop_as_sigterm_does(tmp_path):
    """SIGINT sets the flag (no KeyboardInterrupt in the step in flight) and names itself."""
    said = []
    before = signal.getsignal(signal.SIGINT)  # Python's handler; SIG_IGN in a background job
    handler = checkpoint.install_preemption_handler(said.append)
    try:
        assert not handler.should_stop(0)
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.requested and handler.should_stop(1) and handler.stopped_by == "Ctrl-C"
    finally:
        handler.uninstall()
    assert signal.getsignal(signal.SIGINT) is before
    assert said == ["Ctrl-C: the step in flight finishes and is saved, then the run exits "
                    "(Ctrl-C again: exit at once, unsaved)"]


_TWO_CTRL_C = """
import sys, time
from mixmae_jax.train import checkpoint
handler = checkpoint.install_preemption_handler(lambda s: print(s, file=sys.stderr, flush=True))
print("ready", flush=True)
time.sleep(120)  # a long step: the main thread never returns to the loop in time
print("the step ended", flush=True)
"""


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """The first Ctrl-C lets the step in flight go on; the second ends the process at once
    (status 130), saying so, though the main thread is still inside its step."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", _TWO_CTRL_C], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None, proc.stderr.read()  # the step in flight goes on
        start = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        took = time.time() - start
    finally:
        proc.kill()
    assert proc.returncode == 130 and took < 10, (proc.returncode, took, err)
    assert "the step ended" not in out
    assert err.strip().splitlines()[-1].startswith("Ctrl-C again: exiting at once"), err


_TWO_PROCESSES = """
import os, sys, time
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from mixmae_jax.train import checkpoint
handler = checkpoint.install_preemption_handler(lambda s: None)
open(os.path.join(out, f"ready{pid}"), "w").close()
step = 0
while not handler.should_stop(step):
    step += 1
    time.sleep(0.05)
handler.uninstall()
print(step, handler.stopped_by)
"""


def test_ctrl_c_on_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """With several processes a Ctrl-C goes through JAX's preemption service (as a SIGTERM of
    the process that got it): every process stops at the same step."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(i), port,
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not all(
                os.path.exists(tmp_path / f"ready{i}") for i in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.2)
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    (step0, by0), (step1, by1) = (out.split() for out, _ in outs)
    assert step0 == step1 and int(step0) > 0 and (by0, by1) == ("SIGTERM", "Ctrl-C"), outs


def test_an_unreadable_step_is_named_in_plain_words(tmp_path):
    """A truncated file: the message names it and its size, not TensorStore's spec or reprs."""
    state = _state()
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config=_config())
    ckpt.save(7, state, force=True)
    ckpt.close()
    data = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "checkpoints" / "7")
            for f in fs if os.path.basename(d) == "d"]
    assert data
    for path in data:
        os.truncate(path, 10)
    ckpt = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, read_only=True)
    with pytest.raises(checkpoint.CheckpointReadError) as err:
        ckpt.restore_newest_intact(_abstract(state))
    ckpt.close()
    msg = str(err.value)
    assert re.search(r"newest: \S+/checkpoints/7/\S+/d/\w+ is truncated: 10 of its \d+ bytes",
                     msg), msg
    assert "tensorstore_spec" not in msg and "<" not in msg and len(msg) < 400, msg


# Orbax #3406: CheckpointManager.save asks JAX's preemption service for a sync point and raised
# when that service is disabled. Checked with a real (one-process) distributed runtime.
_PREEMPTION_SERVICE_OFF = """
import socket, sys
import jax
jax.config.update("jax_enable_preemption_service", False)
with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
import jax.numpy as jnp
from mixmae_jax.train import checkpoint
ckpt = checkpoint.Checkpointer(sys.argv[1], save_every=2, keep=1)
assert [s for s in range(3) if ckpt.save(s, {"w": jnp.ones(3)})] == [0, 2]
handler = checkpoint.install_preemption_handler()
assert not handler.should_stop(3)
ckpt.close()
print("OK")
"""

_RESHARD = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import PartitionSpec as P
from mixmae_jax.train import checkpoint, sharding

M = lambda data, fsdp: type("M", (), {"data": data, "fsdp": fsdp})
workdir = sys.argv[1]
rng = np.random.default_rng(0)
params = {"encoder": {"layers": {0: {"qkv": {"kernel": rng.normal(size=(256, 768)),
                                             "bias": rng.normal(size=768)}}}},
          "decoder": {"mask_token": rng.normal(size=(1, 1, 256))}}
params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
tx = optax.adamw(1e-3, weight_decay=0.05)
opt_state = tx.update(params, tx.init(params), params)[1]
state = {"params": params, "opt_state": opt_state, "step": jnp.int32(5),
         "rng": jax.random.PRNGKey(3)}
host = jax.tree.map(np.asarray, state)

def place(mesh, rules=()):
    return sharding.abstract_with_shardings(state, sharding.state_shardings(state, mesh, rules))

def check(restored):
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(host)):
        np.testing.assert_array_equal(np.asarray(a), b)

# Save from an 8-device data-parallel mesh.
data8 = sharding.make_mesh(M(-1, 1))
on8 = jax.device_put(state, jax.tree.map(lambda a: a.sharding, place(data8)))
ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=3)
assert ckpt.save(5, on8)
ckpt.close()

# Restore onto one device.
ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=3)
one = sharding.make_mesh(M(-1, 1), devices=jax.devices()[:1])
restored = ckpt.restore(None, place(one))
check(restored)
assert restored["params"]["decoder"]["mask_token"].sharding.device_set == {jax.devices()[0]}

# Restore onto a 2 x 4 data x fsdp mesh with the FSDP rules.
fsdp = sharding.make_mesh(M(2, 4))
restored = ckpt.restore(5, place(fsdp, sharding.FSDP_RULES))
check(restored)
kernel = restored["params"]["encoder"]["layers"][0]["qkv"]["kernel"]
assert kernel.sharding.spec == P(None, "fsdp"), kernel.sharding
assert {s.data.shape for s in kernel.addressable_shards} == {(256, 192)}
assert restored["opt_state"][0].nu["encoder"]["layers"][0]["qkv"]["kernel"].sharding.spec == (
    P(None, "fsdp"))
assert restored["params"]["encoder"]["layers"][0]["qkv"]["bias"].sharding.is_fully_replicated

# And the FSDP-sharded state saves and comes back on the data mesh.
assert ckpt.save(6, restored, force=True)
ckpt.wait()
check(ckpt.restore(6, place(data8)))
ckpt.close()
print("OK")
"""


def test_save_with_jax_preemption_service_disabled(tmp_path):
    assert run_python(_PREEMPTION_SERVICE_OFF, str(tmp_path)).strip().endswith("OK")


def test_restore_onto_a_different_mesh(tmp_path):
    assert run_python(_RESHARD, str(tmp_path), devices=8).strip().endswith("OK")
