"""mixmae-bench: time the real jitted train step (or the input pipeline alone) and report MFU.

    mixmae-bench --config configs/mixmim_b.py --batch 8 --steps 5
    mixmae-bench --config configs/mae_vit_b.py --batch 8 --config.compute_dtype=bfloat16
    mixmae-bench --config configs/demo.py --input-only

The step is the trainer's own (same sharding, donation, mixing on device), fed synthetic uint8
images already on the devices, timed after compilation. FLOPs come from XLA's cost analysis of the
compiled step (forward + backward + optimizer, per device); the peak is the chip's dense bf16
rate from a table of known accelerators, or on CPU a large fp32 matmul timed in this process
(interleaved with the step timings, because a shared CPU's speed drifts). The last line printed is
one JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import statistics
import time

# Dense bf16 peak FLOP/s per chip (public specs), matched against `device.device_kind`.
PEAK_BF16 = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
)


def known_peak(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for name, peak in PEAK_BF16:
        if name in kind:
            return peak
    return None


def matmul_flops_per_sec(n: int = 2048, reps: int = 3) -> float:
    """Median fp32 rate of an n^3 matmul on the default device (the CPU's practical peak)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def _parse(argv):
    from mixmae_jax.console import ArgumentParser, HelpFormatter, positive

    p = ArgumentParser(prog="mixmae-bench", description=__doc__.split("\n\n")[0],
                       formatter_class=HelpFormatter)
    p.add_argument("--config", help="config file[:arg]")
    p.add_argument("--batch", type=positive(int), default=None,
                   help="global batch (default: config's)")
    p.add_argument("--steps", type=positive(int), default=5,
                   help="timed steps after 2 warm-up steps")
    p.add_argument("--input-only", action="store_true", help="time the input pipeline alone")
    p.add_argument("--seconds", type=positive(float), default=20.0,
                   help="input-only: how long to read")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the forward loss and forward+backward alone")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of the timed "
                   "steps to this directory (open with TensorBoard/XProf or Perfetto)")
    t = p.add_argument_group("ahead-of-time compilation for an accelerator that is not attached")
    t.add_argument("--topology", default=None, help="compile the step for this target instead "
                   "of timing it here, e.g. v5e:16x16, v4:4x4x4, h100:1x2x8 (--list-topologies)")
    t.add_argument("--list-topologies", action="store_true", help="list the known targets")
    t.add_argument("--fit", action="store_true", help="also find the largest per-device batch "
                   "that fits the target's memory")
    t.add_argument("--no-estimate", action="store_true", help="TPU: skip the second, unrolled "
                   "compile that gives XLA's step-time estimate")
    p.add_argument("--debug", action="store_true", help="show library output and the "
                   "traceback of errors on the terminal (else: one error line)")
    p.epilog = ("Config overrides as for mixmae-pretrain: --config.KEY=VALUE, e.g. "
                "--config.compute_dtype=bfloat16 (repeatable).\n\n" + AOT_HELP)
    args, rest = p.parse_known_args(argv)
    args.overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.config and not args.list_topologies:
        p.error("--config is required")
    if (args.fit or args.no_estimate) and not args.topology:
        p.error("--fit and --no-estimate go with --topology")
    return args


AOT_HELP = """\
With --topology the step is compiled, not run: per device it reports the argument, output, temp
and code bytes and whether they fit the chip, the model FLOPs, every collective by kind (count
and bytes per step), the compile time and, on TPU, XLA's estimated step time (the compiler's
cost model, not a measurement) with the MFU it would imply."""


def _input_only(config, args) -> dict:
    from mixmae_jax.data import input_pipeline

    rate = input_pipeline.benchmark_input(config.data, config.batch_size, seconds=args.seconds)
    return {"mode": "input_only", "images_per_sec": rate, "batch": config.batch_size,
            "image_size": config.data.image_size, "source": config.data.source,
            "host_cpus": os.cpu_count()}


def _train_step(config, args) -> dict:
    import jax
    import jax.numpy as jnp

    from mixmae_jax import imaging, tasks
    from mixmae_jax.train import step as step_lib

    step_lib.enable_compilation_cache(config.get("compilation_cache_dir", ""))
    exp = tasks.build_experiment(config)
    n_dev = exp.num_devices
    state = exp.init_state()
    b, s = config.batch_size, config.model.img_size

    def synthetic(key, like):
        if like.dtype == jnp.uint8:
            return jax.random.randint(key, like.shape, 0, 256, jnp.int32).astype(jnp.uint8)
        return jax.random.randint(key, like.shape, 0, config.num_classes)

    batch = {k: jax.jit(synthetic, static_argnums=1, out_shardings=exp.batch_sharding)(
        jax.random.PRNGKey(i), jax.ShapeDtypeStruct(v.shape, v.dtype))
        for i, (k, v) in enumerate(exp.abstract_batch().items())}
    t0 = time.perf_counter()
    compiled = exp.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    from mixmae_jax.train import aot

    flops_per_device = aot.model_flops(config, tasks.for_config, b) / n_dev
    mem = compiled.memory_analysis()

    for _ in range(2):  # warm-up (first runs allocate)
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    peak_per_device = None if on_cpu else known_peak(device.device_kind)
    peak_source = f"table: dense bf16 {device.device_kind}" if peak_per_device else None
    matmul_rates, times = [], []
    if args.profile:
        jax.profiler.start_trace(args.profile)
    for _ in range(args.steps):
        if on_cpu:
            matmul_rates.append(matmul_flops_per_sec())
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    if args.profile:
        jax.profiler.stop_trace()
    if on_cpu:
        peak_per_device = statistics.median(matmul_rates)
        peak_source = "fp32 2048^3 matmul timed in-process (median, interleaved)"

    step_time = statistics.median(times)
    result = {
        "mode": "train_step",
        "config": args.config,
        "method": config.method.name,
        "task": exp.task.kind,
        "model": config.model.name,
        "batch": b,
        "image_size": s,
        "compute_dtype": config.compute_dtype,
        "devices": n_dev,
        "device": device.device_kind,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "images_per_sec": b / step_time,
        "flops_per_step": flops_per_device * n_dev,
        "tflops_per_sec": flops_per_device * n_dev / step_time / 1e12,
        "peak_flops": peak_per_device * n_dev if peak_per_device else None,
        "peak_source": peak_source,
        "mfu": flops_per_device / step_time / peak_per_device if peak_per_device else None,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "peak_memory_bytes": None,
        "compiled_temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem else None,
    }
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats:
        result["peak_memory_bytes"] = stats.get("peak_bytes_in_use")

    if args.breakdown:  # forward alone and forward+backward alone, same batch and mask
        params = state["params"]
        batch_f = dict(batch, image=jax.jit(imaging.normalize)(batch["image"]))
        objective = exp.task.objective
        plan = objective.make_plan(jax.random.PRNGKey(1), b, n_dev)

        def loss_fn(p):
            return objective.loss(step_lib.bind(exp.graphdef, p), batch_f, plan, n_dev)[0]

        for name, fn in (("forward_s", jax.jit(loss_fn)), ("forward_backward_s",
                                                           jax.jit(jax.grad(loss_fn)))):
            jax.block_until_ready(fn(params))
            ts = []
            for _ in range(max(args.steps // 2, 2)):
                t = time.perf_counter()
                jax.block_until_ready(fn(params))
                ts.append(time.perf_counter() - t)
            result[name] = statistics.median(ts)
    return result


# ---------------------------------------------------------------------------------------------
# Ahead of time, for a target that is not attached (train/aot.py)
# ---------------------------------------------------------------------------------------------


def _compile_for_target(config, args) -> dict:
    from mixmae_jax import tasks
    from mixmae_jax.train import aot

    target, dims = aot.parse_topology(args.topology)
    devices = aot.devices(target, dims)
    exp = tasks.build_experiment(config, devices)
    n = exp.num_devices
    b = config.batch_size
    usable = target.usable_bytes
    result = {
        "mode": "ahead_of_time",
        "config": args.config,
        "method": config.method.name,
        "task": exp.task.kind,
        "model": config.model.name,
        "topology": args.topology,
        "target": target.product,
        "devices": n,
        "hosts": len({d.process_index for d in devices}),
        "mesh": dict(exp.mesh.shape),
        "batch": b,
        "per_device_batch": b / n,
        "compute_dtype": config.compute_dtype,
        "remat": config.model.get("remat", "none"),
        "scan_blocks": bool(config.model.get("scan_blocks", True)),
        "params": exp.num_params,
        "param_bytes": 4 * exp.num_params,
        "device_memory_bytes": target.memory_bytes,
        "usable_memory_bytes": usable,
    }
    step, compiled = aot.compile_step(exp, b)
    result.update(step)
    theory = aot.communication_theory(exp)
    result["collectives_theory"] = theory
    if "collectives" in step:
        result["collective_bytes"] = aot.total_bytes(step["collectives"])
        result["collective_bytes_over_theory"] = result["collective_bytes"] / theory["total"]
    if "total_bytes" in step:
        result["fits"] = step["total_bytes"] <= usable
        result["headroom_bytes"] = usable - step["total_bytes"]
    flops = aot.model_flops(config, tasks.for_config, b)
    result["flops_per_step"] = flops
    result["flops_per_device"] = flops / n
    result["peak_flops_per_device"] = target.peak_bf16_flops
    result["estimated_step_s"] = None
    if target.platform == "tpu" and not args.no_estimate and compiled is not None:
        unrolled = tasks.build_experiment(aot.unrolled(config), devices)
        est, compiled_unrolled = aot.compile_step(unrolled, b)
        result["estimated_step_s"], why_not = (aot.tpu_estimate(compiled_unrolled)
                                               if compiled_unrolled is not None else
                                               (None, "the unrolled step does not fit"))
        result["estimate_compile_s"] = est["compile_s"]
        if why_not:
            result["estimate_note"] = why_not
    if result["estimated_step_s"]:
        result["estimated_mfu"] = (flops / n / result["estimated_step_s"]
                                   / target.peak_bf16_flops)
        result["estimate_note"] = ("XLA's TPU cost model of the unrolled step (a roofline that "
                                   "ignores communication), not a measurement")
    if args.fit:
        result.update(_fit(exp, usable))
    return result


def _fit(exp, usable: int, max_compiles: int = 8) -> dict:
    """The largest per-device batch whose step fits `usable` bytes, in steps of what each device
    needs (MixMIM's pairs, the gradient-accumulation micro-batches). Each probe is a compile: the
    first at the config's batch, then where memory, taken as a line through the two compiled
    sizes nearest the chip's memory, meets `usable` (a secant search), kept strictly inside the
    bracket of sizes known to fit and not to, or the bracket's middle after three probes on one
    side. A prediction one step off is thus followed by its neighbour, which closes the bracket:
    `fit_exact` says the answer is the largest that fits, not the largest found within
    `max_compiles`."""
    from mixmae_jax.train import aot

    n, config = exp.num_devices, exp.config
    grain = max(exp.method.min_images_per_group if exp.task.kind == "pretraining" else 1, 1)
    grain *= int(config.optim.grad_accum_steps)
    total, temp = {}, {}  # per-device batch -> bytes; None where the compiler ran out of memory

    def fits(per: int) -> bool:
        figures = aot.compile_step(exp, per * n)[0]
        total[per], temp[per] = figures.get("total_bytes"), figures.get("temp_bytes")
        return total[per] is not None and total[per] <= usable

    def boundary() -> float | None:
        """Where the line through the two compiled sizes whose memory is nearest `usable` (at
        first, one size's temporaries in proportion to the batch) reaches it; None: no line."""
        sized = [p for p, b in total.items() if b is not None]
        if len(sized) >= 2:
            a, b = sorted(sorted(sized, key=lambda p: abs(total[p] - usable))[:2])
        elif sized and temp[sized[0]]:
            a = sized[0]
            return a + (usable - total[a]) / (temp[a] / a)
        else:
            return None
        per_image = (total[b] - total[a]) / (b - a)
        return a + (usable - total[a]) / per_image if per_image > 0 else None

    lo, hi = 0, None  # the largest size known to fit, the smallest known not to
    probe = max(config.batch_size // n // grain * grain, grain)
    sides = []  # fits or not, probe by probe
    while True:
        sides.append(fits(probe))
        if sides[-1]:
            lo = probe
        else:
            hi = probe
        if (hi is not None and hi - lo <= grain) or len(total) >= max_compiles:
            break
        guess = boundary()
        # Three probes in a row on one side of a bracket: memory curves away from the line (or
        # the compiler refuses below it); halve the bracket instead.
        if guess is None or (hi is not None and len(sides) > 3 and len(set(sides[-3:])) == 1):
            guess = 2 * lo if hi is None else (lo + hi) / 2
        probe = int(guess) // grain * grain
        probe = max(probe, lo + grain)  # strictly inside the bracket
        if hi is not None:
            probe = min(probe, hi - grain)
    exact = hi is not None and hi - lo <= grain
    return {"fit_per_device_batch": lo or None, "fit_global_batch": lo * n or None,
            "fit_first_failing_per_device_batch": hi, "fit_grain": grain, "fit_exact": exact,
            "fit_compiles": len(total),
            "fit_total_bytes": {str(p): b for p, b in sorted(total.items())}}


def _table(result: dict) -> str:
    width = max(len(k) for k in result)
    rows = []
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        rows.append(f"{k:<{width}}  {v}")
    return "\n".join(rows)


def _gib(n) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _aot_report(r: dict) -> str:
    """The ahead-of-time figures as a person reads them (the JSON line follows)."""
    mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['method']} {r['task']} ({r['model']}, {r['params'] / 1e6:.1f}M params) compiled "
        f"for {r['topology']}: {r['devices']} x {r['target']}, {r['hosts']} host(s), mesh "
        f"{mesh}",
        f"global batch {r['batch']} ({r['per_device_batch']:g} per device), "
        f"{r['compute_dtype']}, model.remat={r['remat']}, scan_blocks={r['scan_blocks']}",
    ]
    if not r.get("fits") and "out_of_memory" in r:
        lines.append(f"does not fit: the compiler ran out of memory: {r['out_of_memory']}")
    else:
        lines += [
            f"per device: arguments {_gib(r['argument_bytes'])}, outputs "
            f"{_gib(r['output_bytes'])}, donated {_gib(r['alias_bytes'])}, temporaries "
            f"{_gib(r['temp_bytes'])}, code {_gib(r['code_bytes'])}",
            f"  total {_gib(r['total_bytes'])} of {_gib(r['usable_memory_bytes'])} usable: "
            + ("fits" if r["fits"] else "DOES NOT FIT") + f", headroom "
            f"{_gib(r['headroom_bytes'])}",
            "collectives per step and device (count, bytes; theory from the sharding):"]
        theory = r["collectives_theory"]
        for kind, v in r["collectives"].items():
            if isinstance(v, dict) and (v["count"] or theory.get(kind)):
                lines.append(f"  {kind:<20} {v['count']:>6} {v['bytes'] / 1e6:>12.1f} MB "
                             f"{theory.get(kind, 0) / 1e6:>12.1f} MB")
        lines.append(f"  {'total':<20} {'':>6} {r['collective_bytes'] / 1e6:>12.1f} MB "
                     f"{theory['total'] / 1e6:>12.1f} MB  "
                     f"({r['collective_bytes_over_theory']:.2f}x theory)")
    lines.append(f"model FLOPs: {r['flops_per_step'] / 1e12:.2f} TFLOP per step, "
                 f"{r['flops_per_device'] / 1e12:.3f} per device")
    if r.get("estimated_step_s"):
        lines.append(f"XLA's estimated step time (the compiler's cost model, not a measurement):"
                     f" {r['estimated_step_s']:.4f} s, i.e. {100 * r['estimated_mfu']:.1f}% MFU")
    elif r.get("estimate_note"):
        lines.append(f"XLA's estimated step time: {r['estimate_note']}")
    lines.append(f"compile {r['compile_s']:.0f} s" + (
        f" (+ {r['estimate_compile_s']:.0f} s unrolled, for the estimate)"
        if r.get("estimate_compile_s") else ""))
    if "fit_compiles" in r:
        fit = r["fit_per_device_batch"]
        failing = r["fit_first_failing_per_device_batch"]
        if not fit:
            lines.append(f"no per-device batch fits ({r['fit_compiles']} compiles)")
        elif r["fit_exact"]:
            lines.append(f"largest per-device batch that fits: {fit} (global "
                         f"{r['fit_global_batch']}); {failing} does not ({r['fit_compiles']} "
                         "compiles)")
        else:
            lines.append(f"per-device batch {fit} fits (global {r['fit_global_batch']}); the "
                         f"search stopped after {r['fit_compiles']} compiles, "
                         + (f"{failing} does not" if failing else "no larger one failed yet"))
    return "\n".join(lines)


def main(argv=None) -> int:
    from mixmae_jax import console

    args = _parse(argv)
    return console.run("mixmae-bench", lambda: _main(args), debug=args.debug)


def _main(args) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.list_topologies or args.topology:
        from mixmae_jax.train import aot

        if args.list_topologies:
            print(aot.list_topologies())
            return 0
        aot.activate()  # before JAX starts: the CUDA plugin registers itself then
    from mixmae_jax import config as config_lib

    config = config_lib.load_config(args.config, args.overrides)
    if args.batch:
        config.batch_size = args.batch
    if args.topology:
        result = _compile_for_target(config, args)
    elif args.input_only:
        result = _input_only(config, args)
    else:
        result = _train_step(config, args)
    print(_aot_report(result) if args.topology else _table(result))
    print(json.dumps(result))
    return 0
