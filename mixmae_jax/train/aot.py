"""Compiling the real train step ahead of time for a TPU slice or NVIDIA GPUs, from any machine.

    mixmae-bench --config configs/mixmim_b.py --topology v5e:16x16 --config.compute_dtype=bfloat16

libtpu's metadata backend and the CUDA plugin compile for devices that are not attached (the
workflow of MaxText's train_compile.py): the experiment (train/experiment.py) is built on the
target's abstract devices, its step is lowered with abstract state and batch (no parameter is
ever materialised) and compiled by the target's own compiler. What comes back, per device:

* memory: arguments, outputs, aliased (donated) bytes, temporaries and code; the total
  argument + output - alias + temp is what must fit in the chip's memory;
* every collective of the optimized program by kind, with count and bytes, a loop body counted
  as often as the loop runs (the scan over blocks);
* on TPU, XLA's own cost model of the step (`optimal_seconds`): a roofline lower bound that does
  not model communication. It is only meaningful for a program without loops, so it is read from
  a second compile of the step with its blocks unrolled (`estimate=True`), and is always
  reported as the compiler's estimate, never as a measurement.

Model FLOPs come from the cost analysis of the same step lowered for one CPU device, unrolled and
without recomputation (the accelerators' analyses give none or count a loop once).

Set-up: the compilers are large (libtpu ~680 MB, the CUDA plugin ~480 MB) and announce
themselves on every JAX start, so the development set-up installs them outside the environment's
import path (`make setup`: `pip install --target .venv/accelerators`); `activate()` puts them on
it for this process, before JAX starts. Where they are installed normally (a TPU VM, a GPU
machine) nothing needs activating.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path

GIB = 1 << 30
SPEC_DIR = Path(__file__).with_name("gpu_specs")
# Where `make setup` installs libtpu and the CUDA plugin (outside the venv's import path).
ACCELERATOR_DIR = Path(sys.prefix) / "accelerators"


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator kind: how to describe its topology, its memory and its dense bf16 peak."""

    name: str  # what --topology starts with
    product: str
    platform: str  # "tpu" | "cuda"
    memory_bytes: int  # per device (TPU: a chip; v4 runs a chip's two cores as one device)
    peak_bf16_flops: float  # dense, per device (public specs)
    example: str  # a topology of this kind, for --list-topologies
    tpu_options: tuple = ()  # extra get_topology_desc keywords
    spec: str = ""  # GPU: the GpuTargetConfigProto text file in gpu_specs/

    @property
    def usable_bytes(self) -> int:
        """What one program may use. JAX on a GPU preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of
        the memory (default 0.75) and everything must fit in that pool; a TPU program may use
        all of the HBM."""
        if self.platform != "cuda":
            return self.memory_bytes
        return int(self.memory_bytes * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                            "0.75")))


def _spec_memory(spec: str) -> int:
    text = (SPEC_DIR / spec).read_text()
    return int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))


TARGETS = {t.name: t for t in (
    Target("v4", "TPU v4 (a chip, megacore)", "tpu", 32 * GIB, 275e12, "v4:4x4x4",
           (("chip_config_name", "megacore"),)),
    Target("v5e", "TPU v5e", "tpu", 16 * GIB, 197e12, "v5e:16x16"),
    Target("v5p", "TPU v5p", "tpu", 95 * GIB, 459e12, "v5p:4x4x4"),
    Target("v6e", "TPU v6e (Trillium)", "tpu", 32 * GIB, 918e12, "v6e:8x8"),
    Target("a100", "NVIDIA A100 SXM 80GB", "cuda", _spec_memory("a100_sxm_80.txtpb"), 312e12,
           "a100:1x1x8", spec="a100_sxm_80.txtpb"),
    Target("h100", "NVIDIA H100 SXM 80GB", "cuda", _spec_memory("h100_sxm.txtpb"), 989e12,
           "h100:1x2x8", spec="h100_sxm.txtpb"),
    Target("h200", "NVIDIA H200 141GB", "cuda", _spec_memory("h200.txtpb"), 989e12,
           "h200:1x1x8", spec="h200.txtpb"),
)}


class TopologyError(ValueError):
    """--topology names no known target; the message lists them."""


def parse_topology(name: str) -> tuple[Target, tuple[int, ...]]:
    """'v5e:16x16' -> (TARGETS['v5e'], (16, 16)); GPUs: 'h100:1x2x8' = slices x hosts x GPUs
    ('h100:8' and 'h100:2x8' also read as one slice)."""
    kind, _, shape = name.partition(":")
    target = TARGETS.get(kind.lower())
    dims = tuple(int(d) for d in shape.split("x")) if re.fullmatch(r"\d+(x\d+)*", shape) else ()
    if target is None or not dims or min(dims) < 1:
        examples = ", ".join(t.example for t in TARGETS.values())
        raise TopologyError(f"--topology {name!r}: expected KIND:SHAPE with KIND one of "
                            f"{', '.join(TARGETS)} (e.g. {examples}; mixmae-bench "
                            "--list-topologies)")
    if target.platform == "cuda":
        if len(dims) > 3:
            raise TopologyError(f"--topology {name!r}: a GPU topology is SLICESxHOSTSxGPUS")
        dims = (1,) * (3 - len(dims)) + dims
    elif len(dims) not in (2, 3):
        raise TopologyError(f"--topology {name!r}: a TPU topology is 2-D (v5e, v6e: e.g. 16x16) "
                            "or 3-D (v4, v5p: e.g. 4x4x4)")
    return target, dims


def list_topologies() -> str:
    rows = [f"  {t.example:<12} {t.product}: {t.memory_bytes / GIB:.0f} GiB, "
            f"{t.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per device" for t in TARGETS.values()]
    return ("Targets (--topology KIND:SHAPE; TPU shapes are chips per dimension, GPU shapes are "
            "SLICESxHOSTSxGPUS):\n" + "\n".join(rows))


# ---------------------------------------------------------------------------------------------
# The compilers
# ---------------------------------------------------------------------------------------------


def _importable() -> None:
    """libtpu and the CUDA plugin importable, libtpu's start-up quiet (it reads these when it
    loads; the topology, not these, decides what is compiled for)."""
    if ACCELERATOR_DIR.is_dir() and str(ACCELERATOR_DIR) not in sys.path:
        sys.path.insert(0, str(ACCELERATOR_DIR))
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu's lock file: one per host


def activate() -> None:
    """Prepares this process to compile for any target. Call before JAX starts its backends: the
    CUDA plugin registers itself then, and XLA reads its flags then (TPU targets alone can be
    compiled for later: libtpu loads on demand)."""
    _importable()
    # The step is compiled, not run: the attached backend is the CPU (for the FLOP count), and
    # the plugins do not probe for hardware that is not there.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # No autotuning runs without a GPU, and Triton's GEMM tiling then fails on the real step
    # ("Couldn't find output tile sizes"): cuBLAS GEMMs are what XLA falls back to anyway.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TopologyError(
            f"--topology needs {what}, which is not installed: `make setup` installs it into "
            f"{ACCELERATOR_DIR} (see requirements-accelerators.txt), or pip install it")


def devices(target: Target, dims: tuple[int, ...]) -> list:
    """The target's abstract devices (compile-only: nothing runs on them)."""
    _importable()
    from jax.experimental import topologies

    shape = "x".join(map(str, dims))
    if target.platform == "tpu":
        _require("libtpu", "libtpu (TPU targets)")
        options = dict(target.tpu_options)
        # Full pods and cube-multiples of a 3-D slice have wraparound links (as MaxText sets).
        if len(dims) == 2:
            options["wrap"] = [d == 16 for d in dims] + [False]
        else:
            options["wrap"] = [all(d % 4 == 0 for d in dims)] * 3
        return topologies.get_topology_desc(topology_name=f"{target.name}:{shape}",
                                            platform="tpu", **options).devices
    _require("jax_plugins.xla_cuda12", "the jax CUDA plugin (GPU targets)")
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() and "cuda" not in xla_bridge.backends():
        # The plugin registers itself when JAX first starts; a process that started JAX before
        # `activate()` cannot compile for a GPU.
        raise TopologyError("--topology for a GPU: JAX started before the CUDA plugin was "
                            "made importable; call aot.activate() first, in a fresh process")
    return topologies.get_topology_desc(
        topology_name="", platform="cuda", target_config=(SPEC_DIR / target.spec).read_text(),
        topology=shape).devices


# ---------------------------------------------------------------------------------------------
# Reading the optimized program
# ---------------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation|"
                     r"branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")


def _shapes_bytes(text: str) -> list[int]:
    """Bytes of every array shape written in `text` (a result type, possibly a tuple)."""
    out = []
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
    return out


@dataclasses.dataclass
class _Instruction:
    name: str
    opcode: str
    result: str
    operands: list[str]
    line: str


def _parse_module(hlo: str):
    """{computation: [instructions]}, the entry computation's name."""
    computations, current, entry = {}, None, None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        m = _INSTRUCTION.match(line) if current else None
        if m:
            name, result, opcode, rest = m.groups()
            args = rest.split(")", 1)[0] if not rest.startswith("(") else rest
            operands = re.findall(r"%([\w.\-]+)", args.split("),")[0])
            computations[current].append(_Instruction(name, opcode, result, operands, line))
    return computations, entry


def _trip_count(instruction: _Instruction, computations) -> int | None:
    """A while loop's trip count: XLA's known_trip_count, or `i < N` in its condition with the
    counter starting at 0 (lax.scan's form)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", instruction.line)
    body = computations.get(cond.group(1), []) if cond else []
    constants = {i.name: i for i in body if i.opcode == "constant"}
    for i in body:
        if i.opcode == "compare" and "direction=LT" in i.line:
            for operand in i.operands:
                if operand in constants:
                    value = re.search(r"constant\((-?\d+)\)", constants[operand].line)
                    if value:
                        return int(value.group(1))
    return None


def collectives(hlo: str) -> dict:
    """{kind: {"count", "bytes"}} of the optimized HLO module text, per device, with each loop
    body counted as many times as its loop runs. Bytes are each collective's whole array on one
    device: the gathered result of an all-gather, the reduced input of a reduce-scatter, the
    operand of the others. An async pair (`-start` / `-done`) counts once. TPU forms count as
    what they do: a reduce-scatter as an all-reduce fused with the slice each device keeps, and
    a collective matmul's ring of collective-permutes (`windowed_dot_general_body_ag` / `_rs`)
    as the all-gather or reduce-scatter it replaces. Also
    "in_data_dependent_loops": collectives inside a loop whose trip count is not a constant
    (counted once per loop entry, though they run every round)."""
    computations, entry = _parse_module(hlo)
    shapes = {i.name: i.result for body in computations.values() for i in body}
    multiplier = {entry: 1}
    uncertain = set()  # computations run by a loop whose trip count is data-dependent
    context = {entry: entry}  # the loop body (or the entry) whose run executes a computation
    order = [entry]
    while order:  # callers before callees: a computation's count is its callers' total
        name = order.pop()
        for i in computations.get(name, []):
            for key, called in _CALLED.findall(i.line):
                times, unknown = 1, False
                if i.opcode == "while" and key == "body":
                    trips = _trip_count(i, computations)
                    times, unknown = trips or 1, trips is None
                for callee in re.findall(r"[\w.\-]+", called):
                    if callee in computations:
                        multiplier[callee] = multiplier.get(callee, 0) + multiplier[name] * times
                        context[callee] = callee if i.opcode == "while" else context[name]
                        if unknown or name in uncertain:
                            uncertain.add(callee)
                        order.append(callee)
    # One entry per collective: TPU spreads an asynchronous one over a chain of fusions, each
    # holding a copy of it under the same channel id, in one loop body (or the entry).
    found = {}
    for name, body in computations.items():
        times = multiplier.get(name, 0)
        for i in body:
            kind = i.opcode.removesuffix("-start")
            if kind not in COLLECTIVES or not times:
                continue
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                kind = "reduce-scatter"  # TPU's form: an all-reduce fused with its slice
            elif kind == "collective-permute" and "windowed_dot_general_body_" in name:
                # A matmul overlapped with the gather of its operand (or the scatter of its
                # result), chunk by chunk round the ring: a collective matmul.
                kind = "all-gather" if "_body_ag" in name else "reduce-scatter"
            operand_bytes = sum(sum(_shapes_bytes(shapes.get(o, ""))) for o in i.operands)
            results = _shapes_bytes(i.result)
            if i.opcode.endswith("-start") and i.result.lstrip().startswith("("):
                # (operands..., results..., contexts): keep the results
                results = [b for b in results[len(i.operands):] if b > 4] or results
            channel = re.search(r"channel_id=(\d+)", i.line)
            key = (kind, (channel.group(1), context[name]) if channel else (name, i.name))
            nbytes = max(operand_bytes, sum(results))
            seen = found.get(key, (0, 0, False))
            found[key] = (max(seen[0], times), max(seen[1], nbytes),
                          seen[2] or name in uncertain)
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    out["in_data_dependent_loops"] = 0
    for (kind, _), (times, nbytes, in_loop) in found.items():
        out[kind]["count"] += times
        out[kind]["bytes"] += times * nbytes
        out["in_data_dependent_loops"] += in_loop
    return out


def communication_theory(exp) -> dict:
    """Bytes per step per device that the state's sharding implies, counted as `collectives`
    counts them (whole arrays, fp32 parameters):

    * a replicated parameter's gradient is all-reduced once;
    * a parameter sharded over "fsdp" is all-gathered for the forward pass and again for the
      backward pass (only its shard is kept between them: that is what FSDP saves), and its
      gradient is reduce-scattered once (then all-reduced over "data", shard by shard, when the
      mesh also has a data axis).

    Activations never move: every device keeps its own slice of the batch."""
    import jax

    fsdp = dict(exp.mesh.shape).get("fsdp", 1)
    data = exp.num_devices // fsdp
    sharded = replicated = 0
    for leaf in jax.tree.leaves(exp.abstract_params):
        nbytes = leaf.size * leaf.dtype.itemsize
        if any(leaf.sharding.spec) and fsdp > 1:
            sharded += nbytes
        else:
            replicated += nbytes
    out = {"all-gather": 2 * sharded, "reduce-scatter": sharded,
           "all-reduce": replicated + (sharded // fsdp if data > 1 else 0)}
    out["total"] = sum(out.values())
    out["sharded_param_bytes"], out["replicated_param_bytes"] = sharded, replicated
    return out


def total_bytes(collective_counts: dict) -> int:
    return sum(v["bytes"] for v in collective_counts.values() if isinstance(v, dict))


def loops(hlo: str) -> list[tuple[int | None, int]]:
    """(trip count, bytes of the largest array its body holds) of each while loop of an
    optimized program, in the module's order, each loop once however often it runs. Trip count
    None: data-dependent."""
    computations, _ = _parse_module(hlo)
    out = []
    for body in computations.values():
        for i in body:
            if i.opcode == "while":
                called = re.search(r"body=%?([\w.\-]+)", i.line)
                held = [b for j in computations.get(called.group(1) if called else "", [])
                        for b in _shapes_bytes(j.result)]
                out.append((_trip_count(i, computations), max(held, default=0)))
    return out


SMALL_LOOP_BYTES = 1 << 20


def tpu_estimate(compiled) -> tuple[float | None, str]:
    """(seconds, why not): XLA's TPU cost model of a step, with its one known defect undone (each
    `ConcatBitcast` custom call contributes -1 s). The model counts a loop's body once whatever
    its trip count, so a step that still runs a loop after its blocks are unrolled (MixedAE's
    top-k bisection, a gradient-accumulation scan) gets no estimate rather than a low one."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    if not cost or "optimal_seconds" not in cost:
        return None, "the backend gives no cost model"
    text = compiled.as_text()
    # A loop over a few scalars (Mixup's Beta draw) costs nothing to speak of, however often.
    counted_once = [n for n, held in loops(text) if n != 1 and held > SMALL_LOOP_BYTES]
    if counted_once:
        rounds = ", ".join("data-dependent" if n is None else str(n) for n in counted_once)
        return None, (f"no estimate: the step runs {len(counted_once)} loop(s) over large arrays "
                      f"(rounds: {rounds}), whose bodies XLA's cost model counts once")
    return float(cost["optimal_seconds"]) + text.count('"ConcatBitcast"'), ""


# ---------------------------------------------------------------------------------------------
# The compile
# ---------------------------------------------------------------------------------------------


def _is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text


def compile_step(exp, batch_size: int) -> tuple[dict, object]:
    """Compiles `exp`'s train step for a global batch and reads it: (figures, the compiled
    step). Figures: the memory (or `out_of_memory` with the compiler's words, and no compiled
    step), the collectives and the compile time."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    t0 = time.perf_counter()
    # Not through JAX's persistent cache: a program compiled for a target that is not attached
    # cannot be loaded back from it (no client: a warning at the next compile of the same
    # program, which compiles again), so writing it there is only disk. JAX decides once per
    # process whether it uses the cache: reset before and after, so the rest still does.
    cached = jax.config.jax_enable_compilation_cache
    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", False)
    try:  # the step as the trainer runs it: its state donated
        compiled = exp.train_step.lower(exp.abstract_state,
                                        exp.abstract_batch(batch_size)).compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit
        if not _is_out_of_memory(e):
            raise
        message = " ".join(str(e).split())
        return {"fits": False, "out_of_memory": message[:400],
                "compile_s": time.perf_counter() - t0}, None
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
        compilation_cache.reset_cache()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    figures = {
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "code_bytes": int(mem.generated_code_size_in_bytes),
    }
    figures["total_bytes"] = (figures["argument_bytes"] + figures["output_bytes"]
                              - figures["alias_bytes"] + figures["temp_bytes"])
    figures.update(collectives=collectives(compiled.as_text()), compile_s=compile_s)
    return figures, compiled


def unrolled(config):
    """The same step with its blocks unrolled (XLA's analyses count a loop body once)."""
    config = copy.deepcopy(config)
    config.model.scan_blocks = False
    return config


def model_flops(config, make_task, batch_size: int) -> float:
    """FLOPs of one train step of the global batch: the model's (forward, backward, optimizer),
    from XLA's analysis of the step lowered for one CPU device, unrolled and without
    recomputation (so neither a loop nor remat changes the count). Nothing is compiled."""

    from mixmae_jax.train import experiment, sharding

    config = unrolled(config)
    config.model.remat = "none"
    config.batch_size = batch_size
    exp = experiment.build(config, sharding.single_device_mesh(), task=make_task(config),
                           steps_per_epoch=1000)
    lowered = exp.train_step_without_donation().lower(exp.abstract_state,
                                                      exp.abstract_batch(batch_size))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))
