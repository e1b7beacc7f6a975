"""The accelerator check (`launch/gpu_check.sh`): what a lent GPU must show, in one short run,
without TensorFlow or torch (the GPU image has neither).

    python -m mixmae_jax.gpu_check refs --out REFS.npz        # here, on the CPU
    python -m mixmae_jax.gpu_check fit --kind h200 --out B.json   # here: batches that fit
    python -m mixmae_jax.gpu_check parity --refs REFS.npz      # there: loss + every gradient
    python -m mixmae_jax.gpu_check smoke --workdir DIR         # two train steps, Orbax round trip
    python -m mixmae_jax.gpu_check bench --out DIR [--configs ...] [--dtypes ...] [--batch N]
    python -m mixmae_jax.gpu_check summary --out DIR           # gpu_check.json of all parts

Parity is transitive: the suite proves the JAX step on the CPU equal to the plain torch references
in float64 (the methods' parity tests); `refs` saves, for the tiny variant of every pretraining
config, the parameters, images, plan inputs, loss and every gradient of that CPU step; `parity`
recomputes them on the default backend with the highest matmul precision and bounds the relative
errors by the suite's acceptance limits (mixmae_jax/numerics.py: the loss FWD_TOL = 1e-5, the
gradients GRAD_TOL = 1e-4). `fit` compiles each bench config's step ahead of time for one GPU of
the lent kind (`mixmae-bench --topology KIND:1 --fit`) and saves the largest batch that fits;
`bench` runs `mixmae-bench` for each config and dtype at that batch (or, without one, a starting
batch halved on out-of-memory) and writes `gpu_bench.json` and `gpu_bench.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from mixmae_jax.numerics import FWD_TOL, GRAD_TOL, rel_err

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# The tiny variant of every pretraining config: parity cases.
PARITY_CASES = ("mixmim_b.py:tiny", "mae_vit_b.py:tiny", "simmim_swin_b.py:tiny",
                "ummae_swin_t.py:tiny", "simmim_ummae_pvt_s.py:tiny", "mixedae_vit_b.py:tiny")
# Every pretraining recipe at B size (UM-MAE: its Swin-T recipe), with a batch to start from.
BENCH_CONFIGS = {"mixmim_b.py": 128, "mae_vit_b.py": 256, "simmim_swin_b.py": 128,
                 "ummae_swin_t.py": 256, "mixedae_vit_b.py": 256}
PARITY_BATCH = 4


def _config(spec: str, overrides=()):
    from mixmae_jax import config as config_lib

    path, _, arg = spec.partition(":")
    full = path if os.path.isabs(path) else os.path.join(CONFIG_DIR, path)
    return config_lib.load_config(full + (f":{arg}" if arg else ""), overrides)


def loss_and_grads(spec: str, params=None, images=None):
    """(params, images, loss, grads) of the pretraining loss of `spec` at batch 4 (fixed plan and
    drop-path keys); params and images are made from seed 0 unless given."""
    import jax

    from mixmae_jax import imaging
    from mixmae_jax.methods import get_method
    from mixmae_jax.train import step as step_lib

    config = _config(spec)
    method = get_method(config)
    graphdef, _ = step_lib.graphdef_and_abstract_params(method)
    fresh = jax.jit(lambda: step_lib.init_params(method, jax.random.PRNGKey(0)))()
    params = fresh if params is None else step_lib.from_flat_arrays(fresh, params, "refs")
    if images is None:
        s = config.model.img_size
        images = np.random.default_rng(0).integers(0, 256, (PARITY_BATCH, s, s, 3), np.uint8)

    def loss_fn(p, images):
        batch = {"image": imaging.normalize(images)}
        plan = method.make_plan(jax.random.PRNGKey(1), PARITY_BATCH, 1)
        loss, _ = method.loss(step_lib.bind(graphdef, p), batch, plan, 1, jax.random.PRNGKey(2))
        return loss

    # Full float32 matmuls on every backend (a GPU's default is TF32), in this call only.
    with jax.default_matmul_precision("highest"):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, images)
    return step_lib.flat_arrays(params), images, float(loss), step_lib.flat_arrays(grads)


def make_refs(out: str, cases=PARITY_CASES) -> None:
    import jax

    arrays = {}
    for case in cases:
        params, images, loss, grads = loss_and_grads(case)
        arrays[f"{case}|images"] = images
        arrays[f"{case}|loss"] = np.float64(loss)
        arrays.update({f"{case}|params|{k}": v for k, v in params.items()})
        arrays.update({f"{case}|grads|{k}": v for k, v in grads.items()})
        print(f"{case}: loss {loss:.6f}, {len(grads)} gradients", flush=True)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB, backend "
          f"{jax.default_backend()})")


def parity(refs: str) -> list[dict]:
    """Every case of `refs` on the default backend: one row per case, `ok` False past a limit."""
    data = np.load(refs)
    cases = sorted({k.split("|")[0] for k in data.files})
    rows = []
    for case in cases:
        def part(kind, case=case):
            prefix = f"{case}|{kind}|"
            return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}

        want = part("grads")
        _, _, loss, grads = loss_and_grads(case, part("params"), data[f"{case}|images"])
        largest = max(np.linalg.norm(g) for g in want.values())
        # A gradient that is exactly zero in theory (e.g. a bias under softmax) is bounded
        # against the largest gradient instead of its own rounding noise.
        errs = {k: rel_err(grads[k], want[k], 1e-3 * largest) for k in want}
        worst = max(errs, key=errs.get)
        row = dict(case=case, loss_rel_err=rel_err(loss, data[f"{case}|loss"]),
                   worst_grad=worst, worst_grad_rel_err=errs[worst], gradients=len(errs))
        row["ok"] = row["loss_rel_err"] <= FWD_TOL and errs[worst] <= GRAD_TOL
        rows.append(row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {case:28s} loss {row['loss_rel_err']:.2e}  "
              f"worst gradient {errs[worst]:.2e} ({worst})", flush=True)
    return rows


def smoke(workdir: str, spec: str = "mixmim_b.py:tiny") -> dict:
    """Two real train steps (the trainer's jitted step, synthetic images), then an Orbax save and
    restore of the state through the project's Checkpointer: finite losses, moved params, the
    restored state equal to the saved one."""
    import jax

    from mixmae_jax import tasks
    from mixmae_jax.train import checkpoint as ckpt_lib
    from mixmae_jax.train import step as step_lib

    config = _config(spec)
    exp = tasks.build_experiment(config)
    state = exp.init_state()
    start = step_lib.flat_arrays(state["params"])
    s, b = config.model.img_size, config.batch_size
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(2):
        batch = {"image": jax.device_put(rng.integers(0, 256, (b, s, s, 3), np.uint8),
                                         exp.batch_sharding)}
        state, metrics = exp.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    end = step_lib.flat_arrays(state["params"])
    moved = max(float(np.max(np.abs(v - start[k]))) for k, v in end.items())
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=1, keep=1, config=config)
    ckpt.save(2, state, force=True)
    ckpt.wait()
    restored = ckpt.restore(2, exp.abstract_state)
    ckpt.close()
    back = step_lib.flat_arrays(restored["params"])
    same = all(np.array_equal(v, back[k]) for k, v in end.items())
    out = dict(config=spec, losses=losses, step=int(state["step"]), params_moved=moved,
               restored_equal=same)
    out["ok"] = bool(np.all(np.isfinite(losses)) and out["step"] == 2 and moved > 0 and same)
    print(f"{'ok  ' if out['ok'] else 'FAIL'} smoke {spec}: losses {losses}, step {out['step']}, "
          f"largest parameter change {moved:.2e}, restored equal {same}", flush=True)
    return out


def _run_bench_main(argv) -> tuple[int, list[str]]:
    """(exit code, printed lines) of `mixmae-bench argv` in this process."""
    import contextlib
    import io

    from mixmae_jax import bench

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = bench.main(argv)
    return code, buf.getvalue().strip().splitlines()


def _bench_one(spec: str, dtype: str, batch: int, steps: int) -> dict:
    code, lines = _run_bench_main(["--config", os.path.join(CONFIG_DIR, spec), "--batch",
                                   str(batch), "--steps", str(steps),
                                   f"--config.compute_dtype={dtype}"])
    if code != 0 or not lines:
        raise RuntimeError(f"mixmae-bench {spec} {dtype} batch {batch} failed: "
                           + "\n".join(lines[-5:]))
    return json.loads(lines[-1])


def fit(kind: str, out: str, configs=None, dtypes=("bfloat16", "float32"),
        max_compiles: int = 4, run_bench_main=_run_bench_main) -> dict:
    """{"<config>|<dtype>": global batch} for one GPU of `kind` (h100, h200, a100): each step
    compiled ahead of time with `--fit`, its largest fitting batch rounded down to a multiple of
    8 (a margin for what the real GPU's autotuned kernels need beyond the compile's plan).
    Written to `out` (JSON), which `bench --batches` reads."""
    from mixmae_jax.train import aot

    aot.activate()
    batches = {}
    for dtype in dtypes:
        for spec in configs or BENCH_CONFIGS:
            code, lines = run_bench_main([
                "--config", os.path.join(CONFIG_DIR, spec), "--topology", f"{kind}:1",
                "--fit", f"--config.compute_dtype={dtype}",
                "--batch", str(BENCH_CONFIGS.get(spec, 8))])
            found = json.loads(lines[-1]).get("fit_global_batch") if code == 0 else None
            if found:
                batches[f"{spec}|{dtype}"] = max(found // 8 * 8, min(found, 8))
            print(f"fit {kind} {spec} {dtype}: "
                  f"{batches.get(f'{spec}|{dtype}', 'none: ' + (lines or ['?'])[-1][:200])}",
                  flush=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(batches, f, indent=2)
    os.replace(tmp, out)
    return batches


def run_bench(out_dir: str, configs=None, dtypes=("bfloat16", "float32"), batch: int = 0,
              steps: int = 5, min_batch: int = 1, budget_s: float = 0.0,
              bench_one=_bench_one, batches=None) -> list[dict]:
    """Every dtype x config (all configs of the first dtype first) at its batch (`batch`, else
    the fitted one in `batches` ({"<config>|<dtype>": batch}, from `fit`), else a starting
    batch), halved on out-of-memory down to `min_batch`; past `budget_s` seconds (0: none) the
    rest are listed as skipped. Writes gpu_bench.json and gpu_bench.md into `out_dir`."""
    configs = list(configs or BENCH_CONFIGS)
    batches = batches or {}
    rows, start = [], time.perf_counter()
    for dtype in dtypes:
        for spec in configs:
            b = batch or batches.get(f"{spec}|{dtype}") or BENCH_CONFIGS.get(spec, 8)
            if budget_s and time.perf_counter() - start > budget_s:
                rows.append(dict(config=spec, dtype=dtype, batch=b,
                                 error=f"skipped: past the {budget_s:.0f} s budget"))
                print(_md_row(rows[-1]), flush=True)
                continue
            while True:
                t0 = time.perf_counter()
                try:
                    r = bench_one(spec, dtype, b, steps)
                    break
                except Exception as e:  # noqa: BLE001 - an OOM surfaces as several types
                    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                        r = dict(error=str(e).splitlines()[-1][:300])
                        break
                    if b // 2 < min_batch:
                        r = dict(error=f"out of memory down to batch {b}")
                        break
                    b //= 2
            rows.append({**r, "config": spec, "dtype": dtype, "batch": b,
                         "wall_s": time.perf_counter() - t0})
            print(_md_row(rows[-1]), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_bench.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(out_dir, "gpu_bench.md"), "w") as f:
        f.write(MD_HEADER + "\n".join(_md_row(r) for r in rows) + "\n")
    return rows


MD_HEADER = ("| config | dtype | batch | step (s) | images/s | MFU | peak memory (GB) "
             "| compile (s) |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")


def _md_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['config']} | {r['dtype']} | {r['batch']} | error: {r['error']} | | | | |"
    mem = r.get("peak_memory_bytes") or r.get("compiled_temp_bytes") or 0
    return (f"| {r['config']} | {r['dtype']} | {r['batch']} | {r['step_time_s']:.4f} | "
            f"{r['images_per_sec']:.1f} | {100 * r['mfu']:.1f}% | {mem / 1e9:.2f} | "
            f"{r['compile_s']:.1f} |")


def summary(out_dir: str) -> dict:
    """One JSON of the check (gpu_check.json): the device, parity rows, smoke, bench rows, and
    `ok` only when every part ran and passed."""
    def read(name):
        path = os.path.join(out_dir, name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return f.read() if name.endswith(".txt") else json.load(f)

    out = dict(device=read("nvidia-smi.txt"), parity=read("parity.json"),
               smoke=read("smoke.json"), bench=read("gpu_bench.json"))
    out["ok"] = bool(out["parity"] and all(r["ok"] for r in out["parity"])
                     and out["smoke"] and out["smoke"]["ok"]
                     and out["bench"] and not any("error" in r for r in out["bench"]))
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"gpu_check.json: ok={out['ok']}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixmae_jax.gpu_check",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("refs", help="save the CPU references of every parity case")
    r.add_argument("--out", required=True)
    q = sub.add_parser("parity", help="loss and gradients against the references")
    q.add_argument("--refs", required=True)
    q.add_argument("--json", default="", help="also write the rows here")
    s = sub.add_parser("smoke", help="two train steps and an Orbax round trip")
    s.add_argument("--workdir", required=True)
    s.add_argument("--config", default="mixmim_b.py:tiny")
    s.add_argument("--json", default="")
    f = sub.add_parser("fit", help="the largest batch of every config and dtype that fits one "
                       "GPU of a kind, by compiling ahead of time (here, on the CPU)")
    f.add_argument("--kind", required=True, help="h100, h200 or a100")
    f.add_argument("--out", required=True, help="the batches (JSON)")
    f.add_argument("--configs", nargs="+", default=None)
    f.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    f.add_argument("--max-compiles", type=int, default=4,
                   help="compiles per config and dtype (the search narrows the batch)")
    b = sub.add_parser("bench", help="mixmae-bench of every config and dtype")
    b.add_argument("--out", required=True)
    b.add_argument("--batches", default="", help="fitted batches (JSON, from `fit`)")
    b.add_argument("--configs", nargs="+", default=None)
    b.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    b.add_argument("--batch", type=int, default=0, help="0: each config's own starting batch")
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--budget-s", type=float, default=0.0,
                   help="skip what is left after this many seconds (0: no limit)")
    m = sub.add_parser("summary", help="merge the parts' JSON into gpu_check.json")
    m.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.command == "summary":
        return 0 if summary(args.out)["ok"] else 1
    if args.command == "refs":
        make_refs(args.out)
        return 0
    if args.command == "fit":
        fit(args.kind, args.out, args.configs, tuple(args.dtypes), args.max_compiles)
        return 0
    if args.command == "parity":
        if not os.path.isfile(args.refs):
            print(f"error: --refs {args.refs}: no such file (make it with `refs` on the CPU)")
            return 2
        rows = parity(args.refs)
        result = rows
        ok = all(row["ok"] for row in rows)
    elif args.command == "smoke":
        result = smoke(args.workdir, args.config)
        ok = result["ok"]
    else:
        batches = None
        if args.batches and os.path.isfile(args.batches):
            with open(args.batches) as f:
                batches = json.load(f)
        result = run_bench(args.out, args.configs, tuple(args.dtypes), args.batch, args.steps,
                           budget_s=args.budget_s, batches=batches)
        ok = all("error" not in row for row in result)
    if getattr(args, "json", ""):
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
