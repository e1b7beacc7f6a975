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

import argparse
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
    p = argparse.ArgumentParser(prog="mixmae-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg]")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: config's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    p.add_argument("--input-only", action="store_true", help="time the input pipeline alone")
    p.add_argument("--seconds", type=float, default=20.0, help="input-only: how long to read")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the forward loss and forward+backward alone")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of the timed "
                   "steps to this directory (open with TensorBoard/XProf or Perfetto)")
    p.epilog = ("Config overrides as for mixmae-pretrain: --config.KEY=VALUE, e.g. "
                "--config.compute_dtype=bfloat16 (repeatable).")
    args, rest = p.parse_known_args(argv)
    args.overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _input_only(config, args) -> dict:
    from mixmae_jax.data import input_pipeline

    rate = input_pipeline.benchmark_input(config.data, config.batch_size, seconds=args.seconds)
    return {"mode": "input_only", "images_per_sec": rate, "batch": config.batch_size,
            "image_size": config.data.image_size, "source": config.data.source,
            "host_cpus": os.cpu_count()}


def _train_step(config, args) -> dict:
    import jax
    import jax.numpy as jnp

    from mixmae_jax import config as config_lib
    from mixmae_jax import imaging
    from mixmae_jax.train import sharding
    from mixmae_jax.train import step as step_lib
    from mixmae_jax.train.trainer import build_state_fns, jit_train_step, task_for

    step_lib.enable_compilation_cache(config.get("compilation_cache_dir", ""))
    mesh = sharding.make_mesh(config.mesh)
    n_dev = mesh.devices.size
    task = task_for(config)
    if task.batch_keys == ("image",):
        config_lib.validate(config, num_devices=n_dev, process_count=jax.process_count())
    else:  # fine-tuning: the config's checks, no dataset needed (synthetic labels)
        from mixmae_jax.eval import finetune

        finetune.validate(config, num_devices=n_dev, process_count=jax.process_count())
    _, tx, lr_schedule, graphdef, init_fn, _, state_sh = build_state_fns(
        config, mesh, 1000, task)
    state = jax.jit(init_fn, out_shardings=state_sh)()
    batch_sh = sharding.batch_sharding(mesh)
    b, s = config.batch_size, config.model.img_size
    images = jax.jit(lambda k: jax.random.randint(k, (b, s, s, 3), 0, 256, jnp.int32)
                     .astype(jnp.uint8), out_shardings=batch_sh)(jax.random.PRNGKey(0))
    batch = {"image": images}
    if "label" in task.batch_keys:
        batch["label"] = jax.jit(lambda k: jax.random.randint(k, (b,), 0, config.num_classes),
                                 out_shardings=batch_sh)(jax.random.PRNGKey(1))
    step_fn = jit_train_step(config, mesh, task.objective, graphdef, tx, lr_schedule, state_sh,
                             batch_keys=task.batch_keys)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops_per_device = _step_flops(config, mesh, state, batch, task)
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
        "task": task.kind,
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
        batch_f = dict(batch, image=jax.jit(imaging.normalize)(images))
        objective = task.objective
        plan = objective.make_plan(jax.random.PRNGKey(1), b, n_dev)

        def loss_fn(p):
            return objective.loss(step_lib.bind(graphdef, p), batch_f, plan, n_dev)[0]

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


def _step_flops(config, mesh, state, batch, task) -> float:
    """FLOPs per device of the compiled step, from XLA's cost analysis.

    XLA counts a while loop's body once, so the blocks are unrolled for this count
    (model.scan_blocks=False: same computation, the timed step keeps its scan). The count is the
    model's: without the backward pass's recomputation (model.remat="none"), so MFU does not
    rise by recomputing.
    """
    import copy

    from mixmae_jax.train.trainer import build_state_fns, jit_train_step, task_for

    unrolled = copy.deepcopy(config)
    unrolled.model.scan_blocks = False
    unrolled.model.remat = "none"
    task = task_for(unrolled)
    _, tx, lr, graphdef, _, _, state_sh = build_state_fns(unrolled, mesh, 1000, task)
    fn = jit_train_step(unrolled, mesh, task.objective, graphdef, tx, lr, state_sh, donate=False,
                        batch_keys=task.batch_keys)
    compiled = fn.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def _table(result: dict) -> str:
    width = max(len(k) for k in result)
    rows = []
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        rows.append(f"{k:<{width}}  {v}")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = _parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from mixmae_jax import config as config_lib

    try:
        config = config_lib.load_config(args.config, args.overrides)
        if args.batch:
            config.batch_size = args.batch
        result = _input_only(config, args) if args.input_only else _train_step(config, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    print(_table(result))
    print(json.dumps(result))
    return 0
