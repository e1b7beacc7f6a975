"""Console entry points: mixmae-pretrain, mixmae-finetune, mixmae-convert, mixmae-visualize,
mixmae-eval, mixmae-bench.

Each runs through `console.run`: errors a user can fix (bad config, bad files, incompatible
resume, an output it must not write) print one `error: ...` line and exit with status 2, library
output goes to a log, `--debug` shows everything with tracebacks. Outputs follow `outputs.py`.
"""

from __future__ import annotations

import functools
import os
import sys

from mixmae_jax import console, outputs

HELP = console.HelpFormatter


def _exit(status: int) -> None:
    if status:
        sys.exit(status)


def _expand_paths(args, *names) -> None:
    """`~` in path flags (a shell leaves `--workdir=~/x` as it is)."""
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [outputs.expand(v) for v in value])
        elif value is not None:
            setattr(args, name, outputs.expand(value))


def _add_debug(p) -> None:
    p.add_argument("--debug", action="store_true", help="show library output and the traceback "
                   "of errors on the terminal (else: one error line; library output in a log)")


def _use_hugepage_malloc() -> None:
    """Re-execute once with glibc's malloc asking for transparent huge pages.

    XLA:CPU allocates its large temporaries afresh every step; with 4 KiB pages that costs
    ~900k page faults per MixMIM-B step. `glibc.malloc.hugetlb=1` (glibc >= 2.35) cuts them ~50x
    and the step time by ~15% on CPU; accelerator hosts are unaffected. glibc reads tunables only
    at start-up, hence the re-exec. Opt out with MIXMAE_NO_HUGEPAGES=1.
    """
    if (sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ
            or os.environ.get("MIXMAE_NO_HUGEPAGES")):
        return
    os.environ["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
    os.execv(sys.executable, [sys.executable, *sys.argv])


# ---------------------------------------------------------------------------------------------
# mixmae-pretrain: `--config file.py[:arg]` and `--config.key=value` overrides
# ---------------------------------------------------------------------------------------------

PRETRAIN_USAGE = """
  mixmae-pretrain --config configs/<name>.py[:variant] --workdir DIR [--config.KEY=VALUE ...]

examples:
  mixmae-pretrain --config configs/demo.py --workdir workdirs/demo
  mixmae-pretrain --config configs/mixmim_b.py --workdir gs://BUCKET/mixmim_b \\
      --config.data.manual_dir=/path/to/imagenet --config.compute_dtype=bfloat16

Any config field can be overridden with --config.KEY=VALUE (e.g. --config.batch_size=256).
The run's length: --config.total_steps=N (steps; wins over the recipe's epochs) or
--config.epochs=E with --config.total_steps=-1.
An existing run in --workdir is resumed. Ctrl-C finishes the step in flight, saves it and exits
(status 130); a second Ctrl-C exits at once, unsaved. Library output: WORKDIR/log.txt."""


FINETUNE_USAGE = """
  mixmae-finetune --config configs/finetune_<name>.py[:variant] --workdir DIR \\
      --init PRETRAIN_WORKDIR|FILE.pth [--config.KEY=VALUE ...]

examples:
  mixmae-finetune --config configs/finetune_mixmim_b.py --workdir gs://BUCKET/mixmim_b_ft \\
      --init gs://BUCKET/mixmim_b --config.data.manual_dir=/path/to/imagenet
  mixmae-finetune --config configs/digits.py:finetune --workdir workdirs/digits_ft \\
      --init workdirs/digits

--init takes a pretraining workdir (its newest intact step) or an official PyTorch checkpoint
(pretraining or fine-tuning layout); without it the classifier starts from random weights.
A demo run fine-tunes with its own config's variant: configs/demo.py:finetune (or
:mae,finetune ...) on the labelled digits.
An existing run in --workdir is resumed (--init is then ignored). The run's length, Ctrl-C and
the log: as mixmae-pretrain (--config.total_steps=N or --config.epochs=E)."""


def _train_main(argv, *, finetune: bool):
    if argv is None:
        _use_hugepage_malloc()
    prog = "mixmae-finetune" if finetune else "mixmae-pretrain"
    p = console.ArgumentParser(
        prog=prog, usage=FINETUNE_USAGE if finetune else PRETRAIN_USAGE, formatter_class=HELP,
        description="Fine-tune a pretrained encoder with its method's official recipe, "
        "evaluating top-1/top-5 on the eval split." if finetune else "Pretrain a model with a "
        "masked-image-modelling method (the config names both).")
    example = "configs/finetune_mixmim_b.py" if finetune else "configs/demo.py[:variant]"
    p.add_argument("--config", required=True, help=f"config file, e.g. {example}")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics, config snapshot and "
                   "log (local or gs://); an existing run there is resumed")
    if finetune:
        p.add_argument("--init", default=None, help="pretraining workdir or official .pth to "
                       "start from (sets config.init)")
    p.add_argument("--coordinator_address", default=None, help="host:port of process 0 "
                   "(multi-process GPU runs without SLURM; TPU pods and SLURM are detected)")
    p.add_argument("--num_processes", type=int, default=None,
                   help="number of processes (with --coordinator_address)")
    p.add_argument("--process_id", type=int, default=None,
                   help="this process's index (with --coordinator_address)")
    p.add_argument("--jax_distributed", action="store_true", help="call "
                   "jax.distributed.initialize() without arguments (Cloud TPU pods)")
    _add_debug(p)
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    _expand_paths(args, "config", "workdir", "init")
    _exit(console.run(prog, functools.partial(_train, args, overrides, finetune), debug=args.debug))


def _train(args, overrides, finetune: bool) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging

    from mixmae_jax.train import distributed

    distributed.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                             args.process_id, auto=args.jax_distributed)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from mixmae_jax import config as config_lib
    from mixmae_jax import tasks

    config = config_lib.load_config(args.config, overrides)
    is_finetune = config.get("task", "pretrain") == "finetune"
    if is_finetune != finetune:
        raise config_lib.ConfigError(
            f"--config {args.config}: a {'fine-tuning' if is_finetune else 'pretraining'} "
            f"config; run it with {'mixmae-finetune' if is_finetune else 'mixmae-pretrain'}")
    if finetune and args.init is not None:
        config.init = args.init
    # Flushed, so a piped log keeps its order against the signal notices on stderr.
    result = tasks.train(config, args.workdir, print_fn=functools.partial(print, flush=True))
    return 130 if result["stopped_by"] == "Ctrl-C" else 0  # a shell script stops there too


def pretrain_main(argv=None):
    _train_main(argv, finetune=False)


def finetune_main(argv=None):
    _train_main(argv, finetune=True)


# ---------------------------------------------------------------------------------------------
# mixmae-convert
# ---------------------------------------------------------------------------------------------


def _export_metadata(config, step, layout: str) -> dict[str, str]:
    """What a .safetensors reader needs besides the tensors."""
    m = config.model
    return {"layout": layout, "method": config.method.name, "model": m.name,
            "variant": str(m.get("variant", "")), "image_size": str(m.img_size),
            "step": str(step), "config": config.to_json()}


def _to_torch(args) -> None:
    from mixmae_jax.interop import layout_for, targets, to_torch
    from mixmae_jax.tasks import restore_params

    safetensors = args.out.endswith(".safetensors")
    if args.to != "official" and (safetensors or args.out.endswith(".pth")):
        raise ValueError(f"--out {args.out}: --to {args.to} writes a folder (config.json + "
                         "model.safetensors); give a folder name")
    args.out = outputs.check_out(args.out, inputs=[args.workdir], overwrite=args.overwrite,
                                 folder_out=args.to != "official")
    config, params, step = restore_params(args.workdir, args.step, best=args.best)
    num_classes = args.num_classes
    if config.get("task", "pretrain") == "finetune":  # a trained classifier: its own head
        if args.format != "finetune":
            raise ValueError(f"--format {args.format}: {args.workdir} is a fine-tuning run; "
                             "it exports to --format finetune")
        num_classes = config.num_classes
    source = f"step {step} of {args.workdir}"
    if args.to == "official":
        state_dict = to_torch.params_to_state_dict(params, layout_for(config), format=args.format,
                                                   num_classes=num_classes)
        if safetensors:
            to_torch.save_safetensors(state_dict, args.out, _export_metadata(
                config, step, f"official {args.format}"))
        else:
            to_torch.save_torch_checkpoint(state_dict, args.out)
        print(f"Wrote {args.out}: {len(state_dict)} entries (official {config.method.name} "
              f"{args.format} layout) from {source}")
        return
    export = targets.export(config, params, target=args.to, fmt=args.format,
                            num_classes=num_classes)
    to_torch.save_export_dir(args.out, export.config, export.tensors,
                             _export_metadata(config, step, export.model))
    print(f"Wrote {args.out}: {export.model}, {len(export.tensors)} tensors (config.json + "
          f"model.safetensors) from {source}")
    for note in export.notes:
        print(f"  note: {note}")
    print(f"  load: {export.load.replace('DIR', repr(args.out))}")


def _from_torch(args, overrides) -> None:
    import jax

    from mixmae_jax import config as config_lib
    from mixmae_jax import tasks
    from mixmae_jax.interop import from_torch, layout_for
    from mixmae_jax.train import checkpoint as ckpt_lib
    from mixmae_jax.train import experiment, sharding

    config = config_lib.load_config(args.config, overrides)
    config_lib.validate(config)
    outputs.check_writable(args.workdir, "--workdir")
    if os.path.isdir(os.path.join(args.workdir, ckpt_lib.CHECKPOINT_DIR)) and os.listdir(
            os.path.join(args.workdir, ckpt_lib.CHECKPOINT_DIR)):
        raise FileExistsError(f"--workdir {args.workdir} already holds checkpoints; "
                              "choose an empty workdir")
    ckpt = from_torch.read_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
    state_dict, absent, notes = ckpt.tensors, frozenset(), []
    if ckpt.kind in ("transformers", "timm"):
        from mixmae_jax.interop import targets

        state_dict, absent, notes = targets.to_official(ckpt.kind, ckpt.foreign_config,
                                                        ckpt.tensors, config, args.checkpoint)
    method = ckpt.metadata.get("method")
    if method and method != config.method.name:
        notes.append(f"{args.checkpoint} was exported from a {method} run; the config is "
                     f"{config.method.name}")
    exp = experiment.build(config, sharding.single_device_mesh(),
                           task=tasks.for_config(config), steps_per_epoch=1)
    # A concrete fresh state: parts the file lacks (e.g. the decoder, when importing a finetune
    # checkpoint into a pretraining config) keep their fresh initialisation.
    fresh = jax.device_get(exp.init_state()["params"])
    params, report = from_torch.state_dict_to_params(
        state_dict, layout_for(config), fresh, allow_ape_mismatch=args.allow_ape_mismatch,
        absent=absent)
    report.notes.extend(notes)
    state = exp.init_state(params)  # the optimizer's moments start at zero, as a fresh run's
    ckpt = ckpt_lib.Checkpointer(args.workdir, save_every=0, keep=0, config=config)
    try:
        ckpt.save(0, state, force=True)
    finally:
        ckpt.close()
    for line in report:
        print(f"  {line}")
    print(f"Wrote step 0 to {args.workdir}: resume with `mixmae-pretrain --config {args.config} "
          f"--workdir {args.workdir}`, the same overrides, and more steps")


def convert_main(argv=None):
    p = console.ArgumentParser(
        prog="mixmae-convert", description="Convert checkpoints between mixmae-jax (Orbax) and "
        "PyTorch: each method's official layout (.pth or .safetensors), Hugging Face "
        "transformers and timm (folders of config.json + model.safetensors).",
        formatter_class=HELP, epilog="""examples:
  mixmae-convert to-torch --workdir DIR [--step N] --out model.pth --format pretrain|finetune
  mixmae-convert to-torch --workdir DIR --out model.safetensors     # same tensors + metadata
  mixmae-convert to-torch --workdir MAE_DIR --to transformers --out vit-mae/  # ViTMAEForPreTraining
  mixmae-convert to-torch --workdir FINETUNE_DIR --best --to timm --format finetune --out vit/
  mixmae-convert from-torch --checkpoint official.pth --config configs/mixmim_b.py \\
      --workdir DIR [--trust-pickle]
  mixmae-convert from-torch --checkpoint vit-mae/ --config configs/mae_vit_b.py --workdir DIR

`mixmae-convert to-torch --help` and `from-torch --help` list each command's flags.""")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("to-torch", help="Orbax workdir -> {'model': state_dict} .pth, "
                       ".safetensors, or a transformers / timm folder", formatter_class=HELP)
    t.add_argument("--workdir", required=True, help="the mixmae-jax run to export (read only)")
    t.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    t.add_argument("--best", action="store_true", help="a fine-tuning run's best-top-1 params "
                   "(DIR/best) instead of its checkpoints")
    t.add_argument("--out", required=True, help="--to official: FILE.pth ({'model': "
                   "state_dict}) or FILE.safetensors (the same tensors, with the method, model, "
                   "image size and run config as metadata); --to transformers|timm: a folder. "
                   "Never one of the run's own files")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--to", choices=("official", "transformers", "timm"), default="official",
                   help="official: the method's official PyTorch model; transformers: "
                   "ViTMAEForPreTraining / ViTModel (MAE, MixedAE, UM-MAE ViT), "
                   "SwinForMaskedImageModeling / SwinForImageClassification (SimMIM); timm: "
                   "VisionTransformer (ViTs), SwinTransformer (SimMIM). See the README's table")
    t.add_argument("--format", choices=("pretrain", "finetune"), default="pretrain",
                   help="pretrain: the official pretraining model (MixMIM-B: 456 entries); "
                   "finetune: its finetuning model, encoder + a fresh head (MixMIM-B: 354), or "
                   "a fine-tuning run's trained classifier")
    t.add_argument("--num-classes", type=int, default=1000,
                   help="classes of the fresh head (a fine-tuning run keeps its own)")
    f = sub.add_parser("from-torch", help="official .pth / .safetensors, or a transformers / "
                       "timm folder -> a workdir mixmae-pretrain resumes",
                       epilog="Config overrides as for mixmae-pretrain: --config.KEY=VALUE.",
                       formatter_class=HELP)
    f.add_argument("--checkpoint", required=True, help="an official .pth, an official "
                   ".safetensors (read without --trust-pickle: it holds only tensors), or a "
                   "transformers / timm folder (config.json + model.safetensors)")
    f.add_argument("--config", required=True, help="config file[:arg] describing the model")
    f.add_argument("--workdir", required=True, help="a new workdir (no checkpoints yet) for the "
                   "imported step 0")
    f.add_argument("--trust-pickle", action="store_true",
                   help="allow .pth / .bin files that pickle more than tensors (the released "
                   "official checkpoints pickle `args`); only for files from a trusted source. "
                   ".safetensors never needs it")
    f.add_argument("--allow-ape-mismatch", action="store_true",
                   help="accept a file whose fixed position table is not the sin-cos table "
                   "(e.g. a 384 finetune file with a resized table); mixmae-jax uses sin-cos")
    for sp in (t, f):
        _add_debug(sp)
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown or (overrides and args.command != "from-torch"):
        p.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _expand_paths(args, "workdir", "out", "checkpoint", "config")
    body = (functools.partial(_to_torch, args) if args.command == "to-torch" else
            functools.partial(_from_torch, args, overrides))
    _exit(console.run(f"mixmae-convert {args.command}", body, debug=args.debug))


# ---------------------------------------------------------------------------------------------
# mixmae-visualize
# ---------------------------------------------------------------------------------------------


def visualize_main(argv=None):
    p = console.ArgumentParser(prog="mixmae-visualize", formatter_class=HELP, description=(
        "Run a pretraining checkpoint on images and write its reconstructions as a grid picture "
        "(one row per image, the method's panels as labelled columns, the loss in the title)."))
    p.add_argument("--workdir", required=True, help="a mixmae-pretrain workdir (read only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--images", nargs="+", required=True, help="image files, one row each "
                   "(short side resized, centre-cropped to the model's size)")
    p.add_argument("--out", required=True, help="the picture to write: .png or .jpg (never one "
                   "of the inputs or a run's own files)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--mask", default=None, help="the mask in the official code's convention "
                   "of the run's method (.npy, or .npz for several arrays; see the README); "
                   "default: drawn from --seed")
    p.add_argument("--seed", type=int, default=0, help="draws the mask when --mask is not given")
    _add_debug(p)
    args = p.parse_args(argv)
    _expand_paths(args, "workdir", "images", "out", "mask")
    _exit(console.run("mixmae-visualize", functools.partial(_visualize, args), debug=args.debug))


def _visualize(args) -> None:
    import jax

    from mixmae_jax import imaging, visualize
    from mixmae_jax.methods import get_method
    from mixmae_jax.tasks import restore_params
    from mixmae_jax.train import step as step_lib

    args.out = outputs.check_out(args.out, inputs=[*args.images, args.mask],
                                 overwrite=args.overwrite)
    outputs.image_format(args.out)
    config, params, step = restore_params(args.workdir, args.step, pretraining_only=True)
    method = get_method(config)
    visualize.check_count(config, len(args.images))
    graphdef, _ = step_lib.graphdef_and_abstract_params(method)
    images = visualize.load_images(args.images, config.model.img_size)
    if args.mask:
        mask = visualize.load_mask(args.mask, method.mask_arrays, method.mask_help)
        plan = method.mask_from_file(mask, len(images), args.mask)
    else:  # one device group: the whole batch, as on one GPU
        plan = method.make_plan(jax.random.PRNGKey(args.seed), len(images), 1)
    names = []

    def panels(p, x, plan):
        loss, aux, columns = method.panels(step_lib.bind(graphdef, p), x, plan)
        names[:] = columns  # the method's display order (jit would return the dict sorted)
        return loss, aux, tuple(columns.values())

    loss, aux, columns = jax.jit(panels)(params, imaging.normalize(images), plan)
    columns = dict(zip(names, columns, strict=True))
    visualize.save_grid({k: imaging.denormalize(v) for k, v in columns.items()}, args.out,
                        title=f"{method.name}, step {step}, loss {float(loss):.4f}")
    rows = f"{len(images)} row{'' if len(images) == 1 else 's'}"
    print(f"Wrote {args.out}: {rows} ({' | '.join(columns)}), {method.name}, step {step}")
    if aux:
        print("  ".join(f"{k}: {float(v):.6f}" for k, v in aux.items()))
    print(f"loss: {float(loss):.6f}")


# ---------------------------------------------------------------------------------------------
# mixmae-eval
# ---------------------------------------------------------------------------------------------


def _add_feature_args(p) -> None:
    """What every `mixmae-eval` subcommand reads: the run and the labelled data."""
    p.add_argument("--workdir", required=True, help="a mixmae-pretrain workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--data", default="digits", help="'digits' (the embedded handwritten "
                   "digits) or a TFDS dataset name with image and label features")
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    p.add_argument("--train-split", default="train", help="the labelled training features")
    p.add_argument("--test-split", default="test", help="the features evaluated")
    p.add_argument("--batch", type=console.positive(int), default=128,
                   help="images per feature batch")
    p.add_argument("--crop-pct", type=console.positive(float), default=0.875,
                   help="resize the short side to size / crop_pct, then centre-crop")


def eval_main(argv=None):
    p = console.ArgumentParser(
        prog="mixmae-eval", description="Evaluate the frozen encoder of a pretraining workdir "
        "on a labelled dataset.", formatter_class=HELP,
        epilog="mixmae-eval knn --workdir DIR [--data digits] [--k 20] [--temperature 0.07];  "
        "mixmae-eval linprobe --workdir DIR [--epochs 90] [--base-lr LR]")
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("knn", help="weighted k-NN accuracy of the frozen features (cosine)",
                       formatter_class=HELP)
    _add_feature_args(k)
    k.add_argument("--k", type=console.positive(int), default=20, help="neighbours that vote")
    k.add_argument("--temperature", type=console.positive(float), default=0.07,
                   help="vote weight exp(sim / T)")
    lp = sub.add_parser("linprobe", help="linear probe of the frozen features (MAE's BatchNorm "
                        "+ linear head, LARS, warmup + cosine)", formatter_class=HELP)
    _add_feature_args(lp)
    lp.add_argument("--epochs", type=console.positive(int), default=90,
                    help="probe training epochs")
    lp.add_argument("--warmup-epochs", type=console.at_least_zero, default=10,
                    help="linear warmup epochs")
    lp.add_argument("--probe-batch", type=console.positive(int), default=256,
                    help="probe training batch")
    lp.add_argument("--base-lr", type=console.positive(float), default=None,
                    help="lr = base_lr x batch / 256; default: the official 0.1 scaled by "
                    "1,281,167 (ImageNet-1k) / the training images, the same lr x steps as the "
                    "official probe (107 for the 1,200 digits)")
    lp.add_argument("--seed", type=int, default=0, help="the probe's init and batch order")
    for sp in (k, lp):
        _add_debug(sp)
    args = p.parse_args(argv)
    _expand_paths(args, "workdir", "data_dir")
    _exit(console.run(f"mixmae-eval {args.command}", functools.partial(_eval, args),
                      debug=args.debug))


def _eval(args) -> None:
    import json

    import ml_collections

    from mixmae_jax.data import eval_pipeline
    from mixmae_jax.eval import knn
    from mixmae_jax.methods import get_method
    from mixmae_jax.tasks import restore_params
    from mixmae_jax.train import step as step_lib

    config, params, step = restore_params(args.workdir, args.step, pretraining_only=True)
    method = get_method(config)
    graphdef, _ = step_lib.graphdef_and_abstract_params(method)
    source = "digits" if args.data == "digits" else "tfds"
    data = eval_pipeline.labelled_data(ml_collections.ConfigDict(dict(
        source=source, name=args.data, data_dir=args.data_dir, manual_dir=None)))
    features = knn.FrozenFeatures(method, graphdef)
    (xf, xl), (qf, ql) = (
        features(params, data, split, batch_size=args.batch, image_size=config.model.img_size,
                 crop_pct=args.crop_pct) for split in (args.train_split, args.test_split))
    num_classes = data.num_classes
    where = (f"{method.name}, step {step}, {data.name} {args.train_split} -> "
             f"{args.test_split}")
    if args.command == "knn":
        acc = knn.knn_accuracy(xf, xl, qf, ql, k=args.k, temperature=args.temperature,
                               num_classes=num_classes)
        settings = {"k": args.k, "temperature": args.temperature}
    else:
        from mixmae_jax.eval.linear_probe import default_base_lr, linear_probe

        base_lr = args.base_lr if args.base_lr is not None else default_base_lr(len(xl))
        acc = linear_probe(xf, xl, qf, ql, num_classes=num_classes, epochs=args.epochs,
                           warmup_epochs=args.warmup_epochs, batch_size=args.probe_batch,
                           base_lr=base_lr, seed=args.seed)
        settings = {"epochs": args.epochs, "base_lr": round(base_lr, 6)}
    print(f"{args.command} ({where}, {settings}): top-1 {acc['top1']:.4f}  top-5 "
          f"{acc['top5']:.4f}  ({len(ql)} test, {len(xl)} train, features {xf.shape[1]})")
    print(json.dumps({"eval": args.command, "method": method.name, "step": step,
                      "dataset": data.name, **settings, **acc}))


# ---------------------------------------------------------------------------------------------
# mixmae-bench
# ---------------------------------------------------------------------------------------------


def bench_main(argv=None):
    if argv is None:
        _use_hugepage_malloc()
    from mixmae_jax import bench

    sys.exit(bench.main(argv))
