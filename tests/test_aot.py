"""Ahead-of-time compilation for TPU slices and GPUs (train/aot.py, `mixmae-bench --topology`):
the parsing of the optimized program, the batch search, and the communication every method's
step must have: a data-parallel step holds only its gradient all-reduce; an FSDP step gathers
each weight where it is used and reduce-scatters its gradient, within a stated factor of the
bytes its sharding implies (README, "Where each recipe runs"). That rule is part of the method
contract: it runs for every method of `methods.NAMES` (the rest of the contract is
test_methods.py).

TPU steps compile in this process (libtpu loads on demand); a GPU step needs the CUDA plugin
registered before JAX starts, so it compiles in a fresh process.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from recipes import METHOD_RECIPES

from mixmae_jax import bench, methods, tasks
from mixmae_jax import config as config_lib
from mixmae_jax.train import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# Every method's tiny pretraining recipe (the contract suite's, tests/recipes.py).
METHOD_CONFIGS = {name: f"{METHOD_RECIPES[name]}:tiny" for name in methods.NAMES}
# What an FSDP step may move beyond what its sharding implies (aot.communication_theory):
# README, "Where each recipe runs", derives it.
FSDP_FACTOR = 1.3
# A data-parallel step also all-reduces its few scalar metrics, and XLA may reduce a gradient
# in another form than the parameter's: the gradient of a relative-position bias table as the
# (heads, T, T) bias it indexes, of UM-MAE's position MLP as the bias it outputs (+0.8% of the
# bytes for MixMIM's tiny model, +7.5% for UM-MAE's), a bias's as a smaller partial sum.
METRIC_BYTES = 4096
GRADIENT_FORM = 1.1

needs_libtpu = pytest.mark.skipif(
    not (aot.ACCELERATOR_DIR / "libtpu").is_dir() and not aot.importlib.util.find_spec("libtpu"),
    reason="libtpu not installed (make setup installs it)")


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_topology_names():
    target, dims = aot.parse_topology("v5e:16x16")
    assert (target.platform, target.memory_bytes, dims) == ("tpu", 16 << 30, (16, 16))
    assert aot.parse_topology("v4:4x4x4")[1] == (4, 4, 4)
    assert aot.parse_topology("h100:8")[1] == (1, 1, 8)  # one host of 8
    assert aot.parse_topology("h200:2x8")[1] == (1, 2, 8)
    assert aot.parse_topology("H100:1x2x8")[0].name == "h100"
    for bad, words in (("v5e", "KIND:SHAPE"), ("tpu9:2x2", "v5e"), ("v5e:2x2x2x2", "2-D"),
                       ("h100:1x1x2x8", "SLICES"), ("v5e:0x2", "KIND:SHAPE")):
        with pytest.raises(aot.TopologyError, match=words):
            aot.parse_topology(bad)


def test_gpu_targets_read_their_memory_from_the_shipped_descriptions():
    assert aot.TARGETS["h100"].memory_bytes == 84942979072  # 79.1 GiB: H100 SXM "80 GB"
    assert aot.TARGETS["h200"].memory_bytes == 151397597184
    # JAX preallocates 75% of a GPU unless told otherwise.
    assert aot.TARGETS["h100"].usable_bytes == int(0.75 * 84942979072)


# ---------------------------------------------------------------------------------------------
# Reading an optimized program
# ---------------------------------------------------------------------------------------------

# A hand-written module: a scan of 18 rounds with one all-reduce of 8 floats in its body, an
# async all-gather (4x4 -> 16x4 floats), TPU's reduce-scatter (an all-reduce of 16x4 floats
# fused with its slice), a combined all-reduce of two arrays (8 + 4 bf16) and a loop whose trip
# count depends on data, with a 2-element all-reduce in it.
HLO = """HloModule m, entry_computation_layout={()->()}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(18)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[]{:T(128)}, f32[8]{0}) parameter(0)
  %x = f32[8]{0:T(256)} get-tuple-element(%p), index=1
  %ar = f32[8]{0:T(256)} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[]{:T(128)}, f32[8]{0}) tuple(%i, %ar)
}

%dcond (p: (f32[2])) -> pred[] {
  %p = (f32[2]{0}) parameter(0)
  %v = f32[2]{0} get-tuple-element(%p), index=0
  %z = f32[2]{0} constant({0, 0})
  %le = pred[2]{0} compare(%v, %z), direction=LE
  ROOT %any = pred[] reduce(%le), to_apply=%add
}

%dbody (p: (f32[2])) -> (f32[2]) {
  %p = (f32[2]{0}) parameter(0)
  %v = f32[2]{0} get-tuple-element(%p), index=0
  %r = f32[2]{0} all-reduce(%v), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (f32[2]{0}) tuple(%r)
}

%all-reduce-scatter.3 (input: f32[16,4]) -> f32[8,4] {
  %input = f32[16,4]{1,0:T(8,128)} parameter(0)
  %ar2 = f32[16,4]{1,0:T(8,128)} all-reduce(%input), replica_groups={{0,1}}, to_apply=%add
  %zero = u32[] constant(0)
  ROOT %ds = f32[8,4]{1,0} dynamic-slice(%ar2, %zero, %zero), dynamic_slice_sizes={8,4}
}

ENTRY %main (a: f32[8], w: f32[4,4], h: bf16[4]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %w = f32[4,4]{1,0} parameter(1)
  %h = bf16[4]{0} parameter(2)
  %ags = (f32[4,4]{1,0}, f32[16,4]{1,0}) all-gather-start(%w), dimensions={0}
  %agd = f32[16,4]{1,0} all-gather-done(%ags)
  %rs = f32[8,4]{1,0} fusion(%agd), kind=kCustom, calls=%all-reduce-scatter.3
  %both = (f32[8]{0}, bf16[4]{0}) all-reduce(%a, %h), replica_groups={{0,1}}, to_apply=%add
  %i0 = s32[] constant(0)
  %t0 = (s32[], f32[8]{0}) tuple(%i0, %a)
  %loop = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body
  %v0 = f32[2]{0} constant({1, 2})
  %d0 = (f32[2]{0}) tuple(%v0)
  %dloop = (f32[2]{0}) while(%d0), condition=%dcond, body=%dbody
  ROOT %out = f32[8]{0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_count_loop_bodies_async_pairs_and_tpu_reduce_scatter():
    c = aot.collectives(HLO)
    # 18 rounds x 8 floats, the combined pair (32 + 8 bytes), the data-dependent loop once.
    assert c["all-reduce"] == {"count": 18 + 1 + 1, "bytes": 18 * 32 + 40 + 8}
    assert c["all-gather"] == {"count": 1, "bytes": 16 * 4 * 4}  # the gathered array
    assert c["reduce-scatter"] == {"count": 1, "bytes": 16 * 4 * 4}  # the reduced input
    assert c["all-to-all"]["count"] == c["collective-permute"]["count"] == 0
    assert c["in_data_dependent_loops"] == 1
    assert aot.total_bytes(c) == 18 * 32 + 48 + 2 * 256


def test_known_trip_count_wins_over_the_condition():
    hlo = HLO.replace("condition=%cond, body=%body",
                      'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}')
    assert aot.collectives(hlo)["all-reduce"]["count"] == 5 + 1 + 1


class _Compiled:
    """What `aot.tpu_estimate` reads of a compiled step."""

    def __init__(self, hlo: str, optimal_seconds: float):
        self.hlo, self.seconds = hlo, optimal_seconds

    def cost_analysis(self):
        return {"optimal_seconds": self.seconds}

    def as_text(self):
        return self.hlo


def test_loops_are_read_with_their_rounds_and_largest_array():
    assert aot.loops(HLO) == [(18, 8 * 4), (None, 2 * 4)]


def test_no_estimate_for_a_step_that_loops_over_large_arrays():
    """XLA's cost model counts a loop's body once: a loop over large arrays (MixedAE's top-k
    bisection, gradient accumulation) would make the estimate low, so there is none; loops over
    a few scalars (HLO's) do not matter; each ConcatBitcast's -1 s is undone."""
    assert aot.tpu_estimate(_Compiled(HLO, 0.25)) == (0.25, "")
    bitcasts = HLO + '\n// custom_call_target="ConcatBitcast"\n' * 2
    assert aot.tpu_estimate(_Compiled(bitcasts, -1.75)) == (0.25, "")
    big = HLO.replace("f32[8]", f"f32[{aot.SMALL_LOOP_BYTES // 4 + 1}]")
    seconds, why = aot.tpu_estimate(_Compiled(big, 0.25))
    assert seconds is None and "1 loop(s)" in why and "rounds: 18" in why


# ---------------------------------------------------------------------------------------------
# --fit: the batch search
# ---------------------------------------------------------------------------------------------


class _FakeExperiment:
    """What `bench._fit` asks of an experiment, with a compile that costs nothing."""

    num_devices = 4

    def __init__(self, grain=2):
        self.config = config_lib.load_config(os.path.join(CONFIGS, "mixmim_b.py:tiny"))
        self.config.batch_size = 4 * 8
        self.method = type("M", (), {"min_images_per_group": grain})()
        self.task = type("T", (), {"kind": "pretraining"})()


# MAE-B's step on 8 H100s (bf16), as compiled: per-device batch -> bytes per GPU. Not a line:
# XLA's buffer assignment changes with the batch (481 images take 62 MB more than 480, the mean
# step is 133 MB).
MAE_B_H100 = {256: 35020220016, 368: 49398913136, 424: 56587627632, 452: 60190507120,
              466: 61908731760, 480: 63767952240, 481: 63829936752, 512: 67576363376}
H100_USABLE = 63707234304  # 75% of 80 GB


def _mae_b_h100(per):
    """MAE_B_H100's bytes, linear between the compiled sizes; temporaries: all but 3 GB."""
    sizes = sorted(MAE_B_H100)
    a = max([p for p in sizes if p <= per] or sizes[:1])
    b = min([p for p in sizes if p > a] or sizes[-1:])
    return MAE_B_H100[a] + (per - a) * (MAE_B_H100[b] - MAE_B_H100[a]) / max(b - a, 1)


@pytest.mark.parametrize("memory, usable, compiler_refuses_above, want, most_compiles", [
    (lambda p: 1000 + 100 * p, 3050, None, 20, 3),  # 20.5 -> 20, predicted from one compile
    (lambda p: 1000 + 100 * p, 1150, None, 0, 2),  # not even 2 per device fit
    (lambda p: 1000 + 100 * p, 100_000, None, 990, 3),  # far above the start
    (lambda p: 1000 + 100 * p, 3050, 14, 14, 6),  # a TPU compiler refuses above 14 (no bytes)
    (lambda p: 1000 + 90 * p, 5000, None, 44, 3),  # a non-integer number of images
    (lambda p: 1000 + 100 * p + p * p / 5, 100_000, None, 496, 7),  # grows faster than a line
    (lambda p: 5000 + 100 * p - 400 * (p > 40), 9050, None, 44, 8),  # buffers laid out anew
    (_mae_b_h100, H100_USABLE, None, 478, 3),  # as compiled (the grain 2 of the fake method)
])
def test_fit_finds_the_largest_batch_that_fits(monkeypatch, memory, usable,
                                               compiler_refuses_above, want, most_compiles):
    """The answer is the largest multiple of the grain whose memory fits (fit_exact), found in a
    few compiles where memory is close to a line in the batch."""
    compiles = []

    def compile_step(exp, batch_size):
        per = batch_size // exp.num_devices
        compiles.append(per)
        if compiler_refuses_above is not None and per > compiler_refuses_above:
            return {"fits": False, "out_of_memory": "Ran out of memory in memory space hbm"}, None
        total = int(memory(per))
        return {"total_bytes": total, "temp_bytes": total - int(memory(0))}, None

    monkeypatch.setattr(aot, "compile_step", compile_step)
    result = bench._fit(_FakeExperiment(), usable, max_compiles=12)
    assert (result["fit_per_device_batch"] or 0) == want
    assert memory(want) <= usable < memory(want + 2) or compiler_refuses_above == want
    assert result["fit_exact"] and result["fit_compiles"] == len(set(compiles)) == len(compiles)
    assert len(compiles) <= most_compiles, compiles
    if want:
        assert want % 2 == 0  # MixMIM pairs images on each device
        assert result["fit_first_failing_per_device_batch"] == want + 2


def test_fit_says_when_its_compiles_ran_out_before_it_knew(monkeypatch):
    monkeypatch.setattr(aot, "compile_step", lambda exp, batch: (
        {"total_bytes": 1000 + 100 * batch // 4, "temp_bytes": 0}, None))
    result = bench._fit(_FakeExperiment(), 10**9, max_compiles=2)  # 8, then (no slope yet) 16
    assert result["fit_per_device_batch"] == 16 and not result["fit_exact"]
    assert result["fit_first_failing_per_device_batch"] is None and result["fit_compiles"] == 2


@needs_libtpu
def test_a_config_that_cannot_run_on_the_target_is_one_error_line(capsys):
    tiny = os.path.join(CONFIGS, "mixmim_b.py:tiny")
    assert bench.main(["--config", tiny, "--topology", "v5e:2x2", "--batch", "6"]) == 2
    out = capsys.readouterr().err.strip().splitlines()  # errors go to stderr
    assert out == ["error: batch_size: global batch 6 is not divisible by the 4 devices"]
    assert bench.main(["--config", tiny, "--topology", "v5e:2x2",
                       "--config.mesh.fsdp=3"]) == 2
    assert capsys.readouterr().err.startswith("error: mesh.fsdp=3 does not divide the 4 devices")
    # 8 is no product of the v5p-128 torus's axes (4, 4, 4): jax refuses that mesh on the pod
    assert bench.main(["--config", tiny, "--topology", "v5p:4x4x4", "--batch", "64",
                       "--config.mesh.fsdp=8"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: mesh.data=8 x mesh.fsdp=8 cannot be laid out on the 4x4x4 mesh")
    assert bench.main(["--config", tiny, "--topology", "tpu9:2x2"]) == 2
    assert "v5e:16x16" in capsys.readouterr().err  # the known targets, by example
    assert bench.main(["--list-topologies"]) == 0
    assert "h200:1x1x8" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Compiled steps: what the sharding implies
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v5e_2x2():
    """Four v5e chips, compiled for with XLA's least scheduling effort: the collectives are
    chosen before scheduling (the SPMD partitioner, the combiners), so they are the same, in
    ~25% less compile time (a tiny MixMIM step: 14 -> 11 s)."""
    before = jax.config.jax_exec_time_optimization_effort
    jax.config.update("jax_exec_time_optimization_effort", -1.0)
    yield aot.devices(*aot.parse_topology("v5e:2x2"))
    jax.config.update("jax_exec_time_optimization_effort", before)


def _compile(devices, spec, *overrides, rules=None):
    config = config_lib.load_config(os.path.join(CONFIGS, spec), overrides)
    if rules is not None:
        config.sharding_rules = rules
    exp = tasks.build_experiment(config, devices)
    return exp, aot.compile_step(exp, config.batch_size)[0]


def _moved(step):
    return {k for k, v in step["collectives"].items() if isinstance(v, dict) and v["count"]}


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_CONFIGS) + ["finetune", "mixmim in bf16"])
def test_a_data_parallel_step_only_all_reduces_its_gradient(v5e_2x2, method):
    """4 devices, 2 images each: the only collective is the gradient's all-reduce, of about the
    parameters' bytes in float32, bf16 compute too. (MixMIM's decoder once took both branches as
    [z; z] along the sharded batch: all-to-all and collective-permute moved half of every
    device's rows and back; a bf16 step once reduced its gradients in bf16.)"""
    spec = {"finetune": "finetune_mae_vit_b.py:tiny",
            "mixmim in bf16": "mixmim_b.py:tiny"}.get(method) or METHOD_CONFIGS[method]
    dtype = "bfloat16" if "bf16" in method else "float32"
    exp, step = _compile(v5e_2x2, spec, f"--config.compute_dtype={dtype}")
    param_bytes = 4 * exp.num_params
    assert _moved(step) == {"all-reduce"}, step["collectives"]
    assert param_bytes / GRADIENT_FORM <= step["collectives"]["all-reduce"]["bytes"] <= (
        GRADIENT_FORM * param_bytes + METRIC_BYTES), (step["collectives"], param_bytes)
    assert step["collectives"]["in_data_dependent_loops"] == 0  # e.g. Mixup's Beta sampling
    assert 0 < step["total_bytes"] < aot.TARGETS["v5e"].memory_bytes


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_an_fsdp_step_gathers_weights_and_reduces_gradients_once(v5e_2x2, method):
    """Every kernel of at least 1 Ki elements sharded over 4 devices (fsdp=4), 4 images each:
    activations stay where they are (no all-to-all or collective-permute to speak of), each
    sharded weight is gathered where it is used, each gradient is reduced once, and the total
    is within FSDP_FACTOR of what the sharding implies."""
    exp, step = _compile(v5e_2x2, METHOD_CONFIGS[method], "--config.mesh.fsdp=4",
                         "--config.batch_size=16", rules=((".*", "fsdp", 1024),))
    theory = aot.communication_theory(exp)
    sharded, replicated = theory["sharded_param_bytes"], theory["replicated_param_bytes"]
    c = step["collectives"]
    assert sharded > 0.9 * 4 * exp.num_params  # the rule shards most of the model
    activations = c["all-to-all"]["bytes"] + c["collective-permute"]["bytes"]
    assert activations <= 0.05 * theory["total"], c
    # At least once each: TPU gathers an fp32 kernel in bf16 for a default-precision matmul.
    assert c["all-gather"]["bytes"] >= 0.5 * sharded, c
    # Reduce-scattered, or (small ones) all-reduced and sliced: once each, in float32.
    reduced = c["reduce-scatter"]["bytes"] + c["all-reduce"]["bytes"]
    assert (sharded + replicated) / GRADIENT_FORM <= reduced <= (
        GRADIENT_FORM * (sharded + replicated) + METRIC_BYTES), (c, theory)
    assert aot.total_bytes(c) <= FSDP_FACTOR * theory["total"], (c, theory)


@needs_libtpu
@pytest.mark.slow
def test_a_targets_step_stays_out_of_the_persistent_cache(v5e_2x2):
    """The suite runs with JAX's persistent cache on, as a user may: a program compiled for a
    target that is not attached cannot be loaded back from it (no client), so the same step
    compiled again must compile, not warn that the cache entry is unreadable."""
    import warnings

    assert jax.config.jax_compilation_cache_dir  # tests/conftest.py
    jax.jit(lambda x: x + 1.0)(jax.numpy.ones(3))  # the process uses the cache (decided once)
    config = config_lib.load_config(os.path.join(CONFIGS, "mae_vit_b.py:tiny"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # two experiments, as two runs of the tool (one experiment's step compiles once)
        first, second = (aot.compile_step(tasks.build_experiment(config, v5e_2x2), 8)[0]
                         for _ in range(2))
    assert not [w for w in caught if "compilation cache" in str(w.message)], caught
    assert first["total_bytes"] == second["total_bytes"] and first["collectives"] == second[
        "collectives"]

    # ... and what this process compiles next for its own CPU goes through the cache as before
    def after_a_targets_compile(x):
        return x * 3.0 + 1.0

    cache = jax.config.jax_compilation_cache_dir
    jax.jit(after_a_targets_compile)(jax.numpy.ones(3))
    assert [f for f in os.listdir(cache) if f.startswith("jit_after_a_targets_compile-")]


@pytest.mark.slow
def test_gpu_target_compiles_in_a_fresh_process():
    """h100:1x1x4 through the console tool: the CUDA plugin registers itself at JAX's start, so
    `mixmae-bench --topology` activates it first. Its data-parallel MAE step all-reduces its
    gradient only, and the report says where the memory goes. (MAE: the GPU compiler takes 7 s
    for its tiny step, 23 s for MixMIM's; every method's rule is checked on TPU above, where
    the same SPMD partitioner chooses the collectives.)"""
    from jax_subprocess import run_python

    if not (aot.ACCELERATOR_DIR / "jax_plugins").is_dir():
        pytest.skip("the jax CUDA plugin is not installed (make setup installs it)")
    out = run_python("""
        import sys
        from mixmae_jax import bench, tasks
        sys.exit(bench.main(sys.argv[1:]))
    """, "--config", os.path.join(CONFIGS, "mae_vit_b.py:tiny"), "--topology", "h100:1x1x4")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["target"] == "NVIDIA H100 SXM 80GB" and result["devices"] == 4
    assert {k for k, v in result["collectives"].items()
            if isinstance(v, dict) and v["count"]} == {"all-reduce"}
    assert result["fits"] and result["estimated_step_s"] is None  # no cost model on GPU
    assert "collectives per step and device" in out and "fits" in out


@needs_libtpu
def test_the_tpu_compilers_loops_are_read(v5e_2x2):
    """A loop as libtpu writes it: 32 halvings over a (256, 2048) array, as MixedAE's top-k
    bisection does over its logits, get no estimate; the same loop over 64 floats does."""
    mesh = Mesh(np.array(v5e_2x2), ("data",))

    def bisect(x):
        def halve(_, lo):
            return jnp.where(jnp.sum(x >= lo, axis=-1, keepdims=True) >= 8, lo + 1.0, lo - 1.0)
        return jax.lax.fori_loop(0, 32, halve, jnp.zeros((x.shape[0], 1), x.dtype))

    for rows, cols, estimated in ((4 * 256, 2048, False), (4, 16, True)):
        x = jax.ShapeDtypeStruct((rows, cols), jnp.float32,
                                 sharding=NamedSharding(mesh, PartitionSpec("data")))
        compiled = jax.jit(bisect).lower(x).compile()
        assert [n for n, _ in aot.loops(compiled.as_text())] == [32]
        seconds, why = aot.tpu_estimate(compiled)
        assert (seconds is not None) == estimated, why


@needs_libtpu
@pytest.mark.slow
def test_a_tpu_target_gives_the_compilers_estimate_labelled_as_one(capsys):
    """On TPU the report carries XLA's cost model of the unrolled step: a positive time no
    shorter than the model FLOPs at the chip's peak (MFU <= 1; the cost model's -1 s per
    `ConcatBitcast` once made it negative), labelled as the compiler's, never as a measurement."""
    tiny = os.path.join(CONFIGS, "mae_vit_b.py:tiny")
    assert bench.main(["--config", tiny, "--topology", "v5e:2x2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["estimated_step_s"] > 0 and result["estimate_compile_s"] > 0
    floor = result["flops_per_device"] / result["peak_flops_per_device"]
    assert result["estimated_step_s"] >= floor and 0 < result["estimated_mfu"] <= 1
    assert "not a measurement" in result["estimate_note"]
    assert "XLA's estimated step time (the compiler's cost model, not a measurement)" in out
