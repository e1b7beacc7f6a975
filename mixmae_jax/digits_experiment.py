"""The digits experiment (`make experiment`): pretrained vs randomly initialised encoders on
scikit-learn's handwritten digits, frozen (k-NN, linear probe) and fine-tuned (10 labels per
class and all labels), 3 fine-tuning seeds, one Markdown table.

    python -m mixmae_jax.digits_experiment --workdir workdirs/experiment/mixmim \
        [--method mixmim|mae|mixedae|ummae|simmim] [--seeds 0 1 2]

Steps (configs/digits.py holds every value): the method's pretraining on the 1,200 train images
without labels (resumed if already there); k-NN and linear probe of the pretrained and of a
random encoder on the frozen features; then per seed, fine-tuning from each start with each
label budget, top-1 on the 597 test images at the end of each run. Writes results.json and
results.md into --workdir and prints the table. Compiled steps go to a persistent compilation
cache in the workdir, so the 12 fine-tuning runs compile once.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "digits.py")


def _config_path() -> str:
    path = os.path.abspath(CONFIG)
    if not os.path.isfile(path):  # an installed package without the repository's configs/
        raise FileNotFoundError(f"{path}: run the experiment from a checkout of mixmae-jax")
    return path


def frozen_accuracy(config, params, *, probe_lr: float = 50.0) -> dict[str, float]:
    """k-NN and linear-probe top-1 of an encoder's frozen features (train -> test)."""
    from mixmae_jax.data import eval_pipeline
    from mixmae_jax.eval import knn, linear_probe
    from mixmae_jax.methods import get_method
    from mixmae_jax.train import step as step_lib

    method = get_method(config)
    graphdef, _ = step_lib.graphdef_and_abstract_params(method)
    features = knn.FrozenFeatures(method, graphdef)
    data = eval_pipeline.labelled_data(config.data)
    (xf, xl), (qf, ql) = (
        features(params, data, split, batch_size=200, image_size=config.data.image_size,
                 crop_pct=1.0) for split in ("train", "test"))
    out = {"knn": knn.knn_accuracy(xf, xl, qf, ql, num_classes=10)["top1"]}
    out["linprobe"] = linear_probe.linear_probe(xf, xl, qf, ql, num_classes=10,
                                                base_lr=probe_lr)["top1"]
    return out


def _mean_std(values) -> str:
    v = np.asarray(values, np.float64) * 100
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


NAMES = {"mixmim": "MixMIM", "mae": "MAE", "mixedae": "MixedAE", "ummae": "UM-MAE",
         "simmim": "SimMIM"}


def table(results: dict) -> str:
    """The README table from results.json's dict."""
    name = NAMES[results.get("method", "mixmim")]
    rows = [f"| evaluation | pretrained ({name}) | random init |", "| --- | --- | --- |"]
    for key, label in (("knn", "k-NN (k=20), frozen"), ("linprobe", "linear probe, frozen")):
        rows.append(f"| {label} | {100 * results['frozen']['pretrained'][key]:.1f} | "
                    f"{100 * results['frozen']['random'][key]:.1f} |")
    for labels, label in (("10", "fine-tune, 10 labels per class"),
                          ("all", "fine-tune, all 1,200 labels")):
        cells = [_mean_std([r["top1"] for r in results["finetune"]
                            if r["labels"] == labels and r["init"] == init])
                 for init in ("pretrained", "random")]
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")
    seeds = sorted({r["seed"] for r in results["finetune"]})
    return "\n".join(rows) + (f"\n\nTop-1 % on the 597 test digits; fine-tuning: mean ± std "
                              f"over seeds {seeds}.")


def save_toy_encoder(out: str, workdir: str) -> None:
    """Pretrains `configs/digits.py:toy` in `workdir` and writes its encoder's params to `out`
    (npz, one array per parameter path): the suite's pretrained-vs-random toy."""
    from mixmae_jax import config as config_lib
    from mixmae_jax import tasks
    from mixmae_jax.train import step as step_lib

    config = config_lib.load_config(f"{_config_path()}:toy")
    tasks.train(config, workdir, print_fn=lambda s: None)
    _, params, step = tasks.restore_params(workdir)
    arrays = step_lib.flat_arrays(params["encoder"])
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: the encoder after {step} steps ({len(arrays)} arrays)")


def load_toy_encoder(path: str, params):
    """`params` (a digits.py:toy model's) with the encoder from `save_toy_encoder`'s file."""
    from mixmae_jax.train import step as step_lib

    try:
        encoder = step_lib.from_flat_arrays(params["encoder"], np.load(path), path)
    except ValueError as e:
        raise ValueError(f"{e}; the toy model changed, make the file again "
                         "(configs/digits.py, `:toy`)") from None
    return dict(params, encoder=encoder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m mixmae_jax.digits_experiment",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="mixmim", choices=sorted(NAMES),
                   help="the pretraining method (configs/digits.py:method=...)")
    p.add_argument("--workdir", default=None, help="default: workdirs/experiment/METHOD")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--toy-encoder", default="", metavar="NPZ",
                   help="only pretrain configs/digits.py:toy and save its encoder here")
    args = p.parse_args(argv)
    if args.toy_encoder:
        import tempfile

        with tempfile.TemporaryDirectory() as workdir:
            save_toy_encoder(args.toy_encoder, workdir)
        return
    args.workdir = args.workdir or os.path.join("workdirs", "experiment", args.method)
    path = _config_path()  # before anything is written
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax
    from absl import logging

    from mixmae_jax import config as config_lib
    from mixmae_jax import tasks
    from mixmae_jax.methods import get_method
    from mixmae_jax.train import step as step_lib

    logging.set_verbosity(logging.WARNING)
    os.makedirs(args.workdir, exist_ok=True)
    step_lib.enable_compilation_cache(os.path.join(args.workdir, "jax_cache"))
    t0 = time.perf_counter()
    quiet = lambda s: None  # noqa: E731

    pre_dir = os.path.join(args.workdir, "pretrain")
    pre_cfg = config_lib.load_config(f"{path}:method={args.method}")
    print(f"[{time.perf_counter() - t0:6.0f}s] pretraining -> {pre_dir}", flush=True)
    tasks.train(pre_cfg, pre_dir, print_fn=quiet)
    _, params, _ = tasks.restore_params(pre_dir)
    random_params = jax.jit(lambda: step_lib.init_params(
        get_method(pre_cfg), jax.random.PRNGKey(0)))()
    results = {"method": args.method, "frozen": {"pretrained": frozen_accuracy(pre_cfg, params),
                          "random": frozen_accuracy(pre_cfg, random_params)},
               "finetune": []}
    print(f"[{time.perf_counter() - t0:6.0f}s] frozen: {results['frozen']}", flush=True)
    for seed in args.seeds:
        for labels in ("10", "all"):
            for init in ("pretrained", "random"):
                name = f"ft_{labels}_{init}_s{seed}"
                cfg = config_lib.load_config(
                    f"{path}:method={args.method},finetune,labels={labels},seed={seed}")
                cfg.init = pre_dir if init == "pretrained" else ""
                out = tasks.train(cfg, os.path.join(args.workdir, name), print_fn=quiet)
                top1 = out["final_top1"]
                results["finetune"].append({"seed": seed, "labels": labels, "init": init,
                                            "top1": top1, "best_top1": out["best_top1"]})
                print(f"[{time.perf_counter() - t0:6.0f}s] {name}: top-1 {top1:.4f}",
                      flush=True)
    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    md = table(results)
    with open(os.path.join(args.workdir, "results.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"({results['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
