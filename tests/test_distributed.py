"""Sharded steps on 8 host devices, FSDP, and a real two-process run on localhost."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from jax_subprocess import host_devices_env
from numerics import assert_tensors_close

from mixmae_jax.numerics import DEVICES_GRAD_RTOL as GRAD_RTOL
from mixmae_jax.numerics import DEVICES_LOSS_RTOL as LOSS_RTOL
from mixmae_jax.numerics import U32, rel_err

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")


def _run(args, env, timeout=400):
    proc = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _tree(npz, prefix):
    return {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}


ADAM_EPS = 1.0  # tiny_config() in distributed_worker.py: the update is ~lr * g / eps


def _assert_same_update(r, name, ref, lr):
    """Params after the step: |update difference| <= lr/eps * (gradient tolerance), plus one
    rounding of each side's fp32 params (Adam with a large eps does not amplify the noise)."""
    got, want, grads = _tree(r, f"{name}/params/"), _tree(r, f"{ref}/params/"), _tree(
        r, f"{ref}/grads/")
    for k in want:
        bound = lr / ADAM_EPS * GRAD_RTOL * np.abs(grads[k]).max() + 2 * U32 * np.abs(want[k]).max()
        err = float(np.abs(got[k].astype(np.float64) - want[k]).max())
        assert err <= bound, f"{name}: params {k} after one step differ by {err:.3g} > {bound:.3g}"


@pytest.mark.slow
def test_eight_devices_match_one_device_and_fsdp(tmp_path):
    """One step on 8 devices (data parallel, FSDP 2x4, and 2-step accumulation) equals the same
    8 device groups computed on one device: loss, every gradient, the updated params."""
    out = str(tmp_path / "eq.npz")
    _run([out, "equivalence"], host_devices_env(8))
    r = np.load(out)
    lr = float(r["one/lr"])
    p0 = _tree(r, "one/params0/")
    for name in ("one_t", "dp8", "fsdp2x4", "accum2"):  # the same init on every layout, bit-exact
        for k, v in _tree(r, f"{name}/params0/").items():
            np.testing.assert_array_equal(v, p0[k], err_msg=f"{name} init {k}")
        assert float(r[f"{name}/lr"]) == lr
    grads_one = _tree(r, "one/grads/")
    for name in ("dp8", "fsdp2x4"):
        np.testing.assert_allclose(r[f"{name}/loss"], r["one/loss"], rtol=LOSS_RTOL, err_msg=name)
        assert_tensors_close(_tree(r, f"{name}/grads/"), grads_one, GRAD_RTOL, f"{name} gradients")
        _assert_same_update(r, name, "one", lr)
    # Accumulation: the mean of the two micro-batches' losses and gradients.
    np.testing.assert_allclose(r["accum2/loss"], (r["one/loss"] + r["one_t/loss"]) / 2,
                               rtol=LOSS_RTOL)
    grads_t = _tree(r, "one_t/grads/")
    mean = {k: (grads_one[k].astype(np.float64) + grads_t[k]) / 2 for k in grads_one}
    assert_tensors_close(_tree(r, "accum2/grads/"), mean, GRAD_RTOL, "accum2 gradients")
    assert rel_err(grads_t["decoder/pred/kernel"], grads_one["decoder/pred/kernel"]) > 0.1
    assert int(r["one/num_sharded"]) == 0 and int(r["dp8/num_sharded"]) == 0
    assert int(r["fsdp2x4/num_sharded"]) > 10  # FSDP rules really sharded the kernels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 processes x 4 devices (CPU collectives over localhost) == 1 process x 8 devices."""
    single = str(tmp_path / "single.npz")
    t0 = time.perf_counter()
    _run([single, "train"], host_devices_env(8, WORKDIR=str(tmp_path / "w1")))
    multi = str(tmp_path / "multi.npz")
    coordinator = f"127.0.0.1:{_free_port()}"
    env = host_devices_env(4, WORKDIR=str(tmp_path / "w2"))
    procs = [subprocess.Popen([sys.executable, WORKER, multi, "train", str(i), "2", coordinator],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, o in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-5000:]
    print(f"multi-process test: {time.perf_counter() - t0:.1f} s")
    a, b = np.load(single), np.load(multi)
    assert int(b["processes"]) == 2 and int(a["processes"]) == 1
    assert bool(a["restored_equal"]) and bool(b["restored_equal"])
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=LOSS_RTOL)
    # gloo's cross-process sums and the in-process ones differ in order only: 4 steps of Adam
    # with a large eps move each tensor by M; the two runs agree to GRAD_RTOL of that movement.
    pa, pb, p0 = _tree(a, "params/"), _tree(b, "params/"), _tree(a, "params0/")
    assert pa.keys() == pb.keys() == p0.keys()
    for k in pa:
        moved = np.abs(pa[k].astype(np.float64) - p0[k]).max()
        bound = GRAD_RTOL * moved + 4 * U32 * np.abs(pa[k]).max()
        err = float(np.abs(pb[k].astype(np.float64) - pa[k]).max())
        assert err <= bound, f"params {k} after 4 steps differ by {err:.3g} > {bound:.3g}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
