"""Mesh set-up, regex sharding rules, optimizer-state placement and the distributed start-up."""

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from jax_subprocess import run_python

from mixmae_jax.models.paths import path_name
from mixmae_jax.train import distributed, sharding

MESH_2x4 = AbstractMesh((2, 4), ("data", "fsdp"))
MESH_8x1 = AbstractMesh((8, 1), ("data", "fsdp"))


def _specs(tree, mesh, rules):
    specs = sharding.param_specs(tree, mesh, rules)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {path_name(p, "/"): s for p, s in flat}


def _shapes(**shapes):
    return {k.replace("__", "/"): jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}


def test_axis_rule_shards_largest_divisible_dim():
    tree = {
        "wide": jax.ShapeDtypeStruct((8, 24), jnp.float32),  # both divide: the larger one
        "tall": jax.ShapeDtypeStruct((12, 6), jnp.float32),  # only dim 0 divides by 4
        "square": jax.ShapeDtypeStruct((8, 8), jnp.float32),  # tie: the later dim
        "odd": jax.ShapeDtypeStruct((3, 5), jnp.float32),  # none divides: replicated
        "conv": jax.ShapeDtypeStruct((4, 4, 3, 8), jnp.float32),
        "vec": jax.ShapeDtypeStruct((16,), jnp.float32),
        "scalar": jax.ShapeDtypeStruct((), jnp.float32),
    }
    got = _specs(tree, MESH_2x4, [(".*", "fsdp")])
    assert got == {
        "wide": P(None, "fsdp"),
        "tall": P("fsdp"),
        "square": P(None, "fsdp"),
        "odd": P(),
        "conv": P(None, None, None, "fsdp"),
        "vec": P("fsdp"),
        "scalar": P(),
    }
    # A size-1 axis shards nothing.
    assert set(_specs(tree, MESH_8x1, [(".*", "fsdp")]).values()) == {P()}


def test_first_matching_rule_wins_and_default_replicates():
    params = {
        "encoder": {
            "layers": {
                0: {
                    "blocks": {
                        1: {"attn": {"qkv": {"kernel": jnp.zeros((8, 24)), "bias": jnp.zeros(24)}}}
                    }
                }
            }
        },
        "decoder": {"mask_token": jnp.zeros((1, 1, 8)), "pred": {"kernel": jnp.zeros((8, 48))}},
    }
    rules = [
        (r"encoder/layers/\d+/blocks/\d+/attn/qkv/kernel$", (None, "fsdp")),
        (r"kernel$", "replicate"),
        (r"mask_token", "fsdp"),
        (r"qkv/kernel", "fsdp"),  # never reached: the first rule took it
    ]
    assert _specs(params, MESH_2x4, rules) == {
        "encoder/layers/0/blocks/1/attn/qkv/kernel": P(None, "fsdp"),
        "encoder/layers/0/blocks/1/attn/qkv/bias": P(),  # no rule
        "decoder/mask_token": P(None, None, "fsdp"),
        "decoder/pred/kernel": P(),
    }


def test_min_size_and_named_fsdp_rules():
    tree = {
        "big": {"kernel": jax.ShapeDtypeStruct((512, 2048), jnp.float32)},
        "small": {"kernel": jax.ShapeDtypeStruct((32, 64), jnp.float32)},
        "norm": {"scale": jax.ShapeDtypeStruct((2048,), jnp.float32)},
        "relative_position_bias_table": jax.ShapeDtypeStruct((729, 16), jnp.float32),
    }
    want = {
        "big/kernel": P(None, "fsdp"),
        "small/kernel": P(),
        "norm/scale": P(),
        "relative_position_bias_table": P(),
    }
    assert _specs(tree, MESH_2x4, sharding.FSDP_RULES) == want
    assert _specs(tree, MESH_2x4, [("FSDP_DEFAULT", "fsdp")]) == want  # config spelling
    assert _specs(tree, MESH_2x4, [(".*", "fsdp", 2048)])["small/kernel"] == P(None, "fsdp")


def test_bad_rules_are_named():
    tree = {"k": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
    with pytest.raises(ValueError, match="'model' is not a mesh axis"):
        sharding.param_specs(tree, MESH_2x4, [("k", "model")])
    with pytest.raises(ValueError, match="more dims"):
        sharding.param_specs(tree, MESH_2x4, [("k", (None, None, "fsdp"))])


def test_optimizer_state_follows_params():
    params = {"a": {"kernel": jnp.zeros((8, 24)), "bias": jnp.zeros(24)}, "b": jnp.zeros((4, 8))}
    tx = optax.MultiSteps(
        optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)), every_k_schedule=2
    )
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.int32(0),
        "rng": jax.random.PRNGKey(0),
    }
    shardings = sharding.state_shardings(state, MESH_2x4, [(r"kernel$", "fsdp")])
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    specs = {path_name(p, "/"): s.spec for p, s in flat}
    kernels = {k for k, s in specs.items() if s != P()}
    assert kernels == {
        "params/a/kernel",
        "opt_state/inner_opt_state/0/mu/a/kernel",
        "opt_state/inner_opt_state/0/nu/a/kernel",
        "opt_state/acc_grads/a/kernel",
    }
    assert all(specs[k] == P(None, "fsdp") for k in kernels)
    assert specs["opt_state/inner_opt_state/0/count"] == P()
    assert specs["rng"] == P() and specs["step"] == P()


def test_mesh_shape_validation():
    cfg = lambda data, fsdp: type("M", (), {"data": data, "fsdp": fsdp})  # noqa: E731
    assert sharding.mesh_shape(cfg(-1, 1), 8) == (8, 1)
    assert sharding.mesh_shape(cfg(-1, 4), 8) == (2, 4)
    assert sharding.mesh_shape(cfg(2, 4), 8) == (2, 4)
    with pytest.raises(ValueError, match=r"mesh\.fsdp=3 does not divide the 8 devices"):
        sharding.mesh_shape(cfg(-1, 3), 8)
    with pytest.raises(ValueError, match=r"mesh\.data=2 x mesh\.fsdp=2 = 4 devices.* 8"):
        sharding.mesh_shape(cfg(2, 2), 8)
    with pytest.raises(ValueError, match=r"mesh\.fsdp must be >= 1"):
        sharding.mesh_shape(cfg(-1, 0), 8)
    with pytest.raises(ValueError, match=r"mesh\.data=2"):
        sharding.make_mesh(cfg(2, 1))  # one CPU device here


def test_detect_multiprocess():
    detect = distributed.detect_multiprocess
    assert detect({}) is None
    assert detect({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert detect({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "16"}) == "slurm"
    assert detect({"OMPI_COMM_WORLD_SIZE": "4"}) == "openmpi"
    assert detect({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    assert detect({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == "tpu-pod"
    assert detect({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}) == "tpu-multislice"


def test_maybe_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in (
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    assert distributed.maybe_initialize_distributed() is False and calls == []
    assert distributed.maybe_initialize_distributed(num_processes=1) is False and calls == []
    assert distributed.maybe_initialize_distributed("h:1234", 2, 1) is True
    assert calls.pop() == dict(coordinator_address="h:1234", num_processes=2, process_id=1)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.maybe_initialize_distributed() is True and calls.pop() == {}


_MESH_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import PartitionSpec as P
from mixmae_jax.train import sharding

M = lambda data, fsdp: type("M", (), {"data": data, "fsdp": fsdp})
assert jax.device_count() == 8
mesh = sharding.make_mesh(M(-1, 1))
assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
mesh = sharding.make_mesh(M(2, 4))
assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
for bad in (M(3, 1), M(-1, 3)):
    try:
        sharding.make_mesh(bad)
        raise AssertionError("no error")
    except ValueError as e:
        assert "mesh." in str(e)

batch = jax.device_put(jnp.arange(16 * 3).reshape(16, 3), sharding.batch_sharding(mesh))
assert {s.data.shape for s in batch.addressable_shards} == {(2, 3)}  # 16 rows over 8 devices

params = {"kernel": jnp.arange(512.0 * 256).reshape(512, 256), "bias": jnp.ones(256)}
tx = optax.adamw(1e-3)
state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(3),
         "rng": jax.random.PRNGKey(0)}
shardings = sharding.state_shardings(state, mesh, sharding.FSDP_RULES)
placed = jax.device_put(state, shardings)
k = placed["params"]["kernel"]
assert k.sharding.spec == P("fsdp"), k.sharding  # the larger dim
assert {s.data.shape for s in k.addressable_shards} == {(128, 256)}
assert placed["opt_state"][0].mu["kernel"].sharding.spec == P("fsdp")
assert placed["params"]["bias"].sharding.is_fully_replicated
np.testing.assert_array_equal(np.asarray(k), np.asarray(params["kernel"]))

# A jitted update keeps the placement when given out_shardings.
step = jax.jit(lambda s: {**s, "step": s["step"] + 1}, out_shardings=shardings, donate_argnums=0)
out = step(placed)
assert out["params"]["kernel"].sharding.spec == P("fsdp")
print("OK")
"""


def test_mesh_and_placement_on_8_host_devices():
    assert run_python(_MESH_SCRIPT, devices=8).strip().endswith("OK")
