"""Where each recipe runs: `mixmae-bench --topology` for every recipe on the targets a user would
pick, one JSON line per compile, then the README's Markdown table from them.

    python launch/aot_table.py run --out aot.jsonl [--only mixmim_b] [--fit]   # compiles
    python launch/aot_table.py table --out aot.jsonl                            # Markdown

`run` skips rows already in the file (a long sweep resumes), and compiles each row in its own
process (the GPU compiler registers at JAX's start; an out-of-memory compile is a row, not a
crash). Compiles are slow on a small machine: minutes for a B recipe at pod scale, mostly one
core each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each recipe at its official global batch (the config's), on what it was sized for. The L/H
# models shard over `fsdp` (their configs' FSDP rules), a chip's worth of model per shard group.
B_TARGETS = ("v5e:16x16", "h100:1x2x8", "h100:1x1x8", "h200:1x2x8", "h200:1x1x8")
LH_TARGETS = ("v5p:4x4x4", "v4:4x4x4", "h100:1x2x8", "h200:1x2x8")
# A mesh axis spans whole torus axes: 16 of a 4x4x4 torus; a host's 8 GPUs.
FSDP = {"v5p:4x4x4": 16, "v4:4x4x4": 16, "h100:1x2x8": 8, "h200:1x2x8": 8}
RECIPES = {
    # pretraining
    "mixmim_b": B_TARGETS, "mae_vit_b": B_TARGETS, "simmim_swin_b": B_TARGETS,
    "mixedae_vit_b": B_TARGETS, "ummae_swin_t": B_TARGETS, "ummae_pvt_s": B_TARGETS,
    "ummae_vit_b": B_TARGETS, "simmim_ummae_swin_t": B_TARGETS, "simmim_ummae_pvt_s": B_TARGETS,
    "mixmim_l": LH_TARGETS, "mixmim_h": LH_TARGETS, "mae_vit_l": LH_TARGETS,
    "mae_vit_h": LH_TARGETS, "simmim_swin_l": LH_TARGETS, "ummae_swin_l": LH_TARGETS,
    "mixedae_vit_l": LH_TARGETS,
    # fine-tuning
    "finetune_mixmim_b": B_TARGETS, "finetune_mae_vit_b": B_TARGETS,
    "finetune_simmim_swin_b": B_TARGETS, "finetune_ummae_swin_t": B_TARGETS,
    "finetune_ummae_pvt_s": B_TARGETS,
}
LARGE = ("_l", "_h")


def rows(only=(), dtypes=("bfloat16", "float32"), targets=()):
    """Every (recipe, target, dtype), the first dtype's rows first; `targets`: these instead of
    each recipe's own (an L/H recipe needs its FSDP size in FSDP)."""
    for dtype in dtypes:
        for recipe, recipe_targets in RECIPES.items():
            if only and recipe not in only:
                continue
            for target in targets or recipe_targets:
                overrides = [f"--config.compute_dtype={dtype}"]
                if recipe.endswith(LARGE):
                    if target not in FSDP:
                        raise SystemExit(f"error: --targets {target}: no FSDP size for the L/H "
                                         f"recipes on it (FSDP in {__file__})")
                    overrides.append(f"--config.mesh.fsdp={FSDP[target]}")
                yield {"recipe": recipe, "topology": target, "dtype": dtype,
                       "overrides": overrides}


def _key(row) -> tuple:
    return row["recipe"], row["topology"], row["dtype"], tuple(row["overrides"])


def run(out: str, only=(), dtypes=("bfloat16", "float32"), fit: bool = False,
        extra=(), targets=()) -> None:
    done = set()
    if os.path.exists(out):
        with open(out) as f:
            done = {_key(json.loads(line)["row"]) for line in f if line.strip()}
    for row in rows(only, dtypes, targets):
        row["overrides"] += list(extra)
        if _key(row) in done:
            continue
        bench = os.path.join(os.path.dirname(sys.executable), "mixmae-bench")
        cmd = [bench, "--config",
               os.path.join(ROOT, "configs", row["recipe"] + ".py"), "--topology",
               row["topology"], *row["overrides"]] + (["--fit"] if fit else [])
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            result = {"error": (lines or proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
        record = {"row": row, "wall_s": time.time() - t0, "result": result}
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{row['recipe']:24s} {row['topology']:11s} {row['dtype']:9s} "
              f"{time.time() - t0:6.0f} s  " + _summary(result), flush=True)


def _gib(n) -> str:
    return f"{n / (1 << 30):.1f}"


def _summary(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error']}"
    if "total_bytes" not in r:
        return "does not fit (compiler out of memory)"
    return (f"{_gib(r['total_bytes'])} GiB of {_gib(r['usable_memory_bytes'])}, "
            f"{_collectives(r)}")


def _collectives(r: dict) -> str:
    short = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS",
             "all-to-all": "A2A", "collective-permute": "CP"}
    parts = [f"{short[k]} {v['bytes'] / 1e9:.2f}" for k, v in r["collectives"].items()
             if isinstance(v, dict) and v["count"]]
    return " + ".join(parts) + " GB" if parts else "none"


def _extrapolated_fit(r: dict) -> int:
    """The largest per-device batch if the temporaries grow in proportion to the batch and the
    rest (parameters, optimizer state, code) stays: one compile's estimate, where `--fit`
    compiles until it knows. XLA lays buffers out anew for each batch, so it may miss either
    way (MAE-B on 8 H100s: ~482 extrapolated, 479 exact)."""
    fixed = r["total_bytes"] - r["temp_bytes"]
    return int((r["usable_memory_bytes"] - fixed) // (r["temp_bytes"] / r["per_device_batch"]))


def table(out: str) -> str:
    """The Markdown table of every compiled row (newest record of each row); the largest batch
    as `--fit` found it, or else (~) extrapolated from the one compile."""
    records = {}
    with open(out) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                records[_key(rec["row"])] = rec
    head = ("| recipe | target | dtype | `model.remat` | batch (per device) | memory per device: "
            "total / usable | fits | collectives per step and device | XLA's estimate | compile |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    body = []
    for rec in records.values():
        row, r = rec["row"], rec["result"]
        if "error" in r:
            body.append(f"| {row['recipe']} | {row['topology']} | {row['dtype']} | | | "
                        f"error: {r['error']} | | | | |")
            continue
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        # overrides beyond the row's dtype and mesh, e.g. --config.optim.grad_accum_steps=2
        extra = [o.removeprefix("--config.") for o in row["overrides"] if o.startswith(
            "--config.") and not o.startswith(("--config.compute_dtype", "--config.mesh."))]
        recipe = row["recipe"] + "".join(f" `{o}`" for o in extra)
        batch = f"{r['batch']} ({r['per_device_batch']:g})"
        if "total_bytes" in r:
            memory = f"{_gib(r['total_bytes'])} / {_gib(r['usable_memory_bytes'])} GiB"
            fits = "yes" if r["fits"] else "**no**"
        else:
            memory, fits = "compiler: out of memory", "**no**"
        if r.get("fit_per_device_batch") and r.get("fit_exact"):
            fits += f", at most {r['fit_per_device_batch']} per device"
        elif r.get("fit_per_device_batch"):  # --fit's compiles ran out before it knew
            fits += f", {r['fit_per_device_batch']} per device or more"
        elif "total_bytes" in r:
            fits += f", ~{_extrapolated_fit(r)} per device"
        est = (f"{r['estimated_step_s']:.3f} s ({100 * r['estimated_mfu']:.0f}% MFU)"
               if r.get("estimated_step_s") else
               "none: a loop" if r.get("estimate_note", "").startswith("no estimate") else "")
        coll = _collectives(r) if "collectives" in r else ""
        body.append(f"| {recipe} | {row['topology']} ({mesh}) | {row['dtype']} "
                    f"| {r.get('remat', '')} | {batch} "
                    f"| {memory} | {fits} | {coll} | {est} | {r['compile_s']:.0f} s |")
    return head + "\n".join(body) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="launch/aot_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("run", "table"))
    p.add_argument("--out", required=True, help="the JSON lines file")
    p.add_argument("--only", nargs="*", default=(), help="recipes (default: all)")
    p.add_argument("--dtypes", nargs="*", default=("bfloat16", "float32"))
    p.add_argument("--targets", nargs="*", default=(), help="topologies, e.g. a100:1x1x8 "
                   "(default: each recipe's own)")
    p.add_argument("--fit", action="store_true", help="also search the largest batch")
    args, extra = p.parse_known_args(argv)
    if args.command == "run":
        run(args.out, tuple(args.only), tuple(args.dtypes), args.fit, extra, tuple(args.targets))
    else:
        print(table(args.out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
