"""Fine-tuning a pretrained encoder end to end: the official recipes, in the pretraining loop.

    mixmae-finetune --config configs/finetune_<...>.py --workdir DIR --init PRETRAIN_WORKDIR|F.pth

A fine-tuning run is a task of the one trainer: the loop, sharding, checkpoints (every N steps,
the last K kept, SIGTERM), metrics and exact resume are pretraining's. What differs:

* the model is the method's official fine-tuning classifier (`Method.build_classifier`), with
  drop path; it starts from the pretrained encoder loaded by the official rules (below) and a
  fresh head (trunc-normal std 2e-5);
* the input carries labels and, after the crop and flip, timm's RandAugment in tf.data
  (`data/randaugment.py`); the step applies RandomErasing, Mixup/CutMix and label smoothing on
  device (`tasks/mixup.py`) and minimises the soft-target cross entropy;
* AdamW with the recipe's layer-wise lr decay (`tasks/layer_decay.py`, MixMIM's quirk included);
* its evaluator (`config.evals.eval`, `eval/classification.py`), every epoch and at the end:
  top-1 / top-5 / loss on the labelled eval split, logged beside the training metrics; the
  params of the best top-1 of the evaluator `config.keep_best` names are kept in `DIR/best/`
  (the last state in `DIR/checkpoints/`, as in pretraining).

Loading the pretrained encoder (`main_finetune.py` of each official repository): a mixmae-jax
pretraining workdir loads natively through the model's `load` (`models/loading.py`, no torch):
the decoder and mask tokens dropped, relative-position tables bicubically resized to a new window,
a learned position table starting from the pretraining's fixed one (resized to a new grid), index
buffers and fixed tables computed by the classifier itself, head and fc_norm fresh. An official
`.pth` (pretraining or fine-tuning layout) goes through the PyTorch interop (`interop/`), which
drops its head when its class count differs.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mixmae_jax import config as config_lib
from mixmae_jax.interop import layout_for
from mixmae_jax.tasks import mixup
from mixmae_jax.tasks.pretrain import Task
from mixmae_jax.train import checkpoint as ckpt_lib
from mixmae_jax.train import optim
from mixmae_jax.train import step as step_lib


class ClassifierObjective:
    """The train step's objective: augment on device, logits, soft-target cross entropy."""

    def __init__(self, config):
        self.config = config

    def make_plan(self, rng, batch_size: int, num_groups: int) -> dict:
        return {"augment": rng}

    def loss(self, model, batch, plan, num_groups: int, rng=None):
        images, targets, lam = mixup.augment_batch(
            plan["augment"], batch["image"], batch["label"], num_classes=self.config.num_classes,
            num_groups=num_groups, aug_cfg=self.config.augment)
        logits = model(images, rng)
        return mixup.soft_cross_entropy(logits, targets), {"mix_lam": jnp.mean(lam)}


# ---------------------------------------------------------------------------------------------
# The pretrained encoder
# ---------------------------------------------------------------------------------------------


def _summarise(error: Exception, init: str, config, src_model=None, limit: int = 4) -> ValueError:
    """A load error's first few problems, naming --init, the config's model and, for a workdir,
    the model settings in which the two differ (what the user changes)."""
    lines = [ln.strip() for ln in str(error).splitlines()[1:] if ln.strip()] or [str(error)]
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    differ = ""
    if src_model is not None:
        mine = ckpt_lib.config_to_dict(config.model)
        keys = [k for k, v in ckpt_lib.config_to_dict(src_model).items()
                if k in mine and mine[k] != v and k not in _RESIZED][:limit]
        differ = "".join(f"; model.{k}: {src_model[k]} there, {config.model[k]} here"
                         for k in keys)
    return ValueError(f"--init {init}: its encoder does not fit this config's "
                      f"{config.method.name} {config.model.name} classifier{differ}; "
                      f"{len(lines)} tensor(s) differ: {'; '.join(lines[:limit])}{more}")


# Model settings in which a fine-tuning may differ from its pretraining (the loader resizes the
# tables, the decoder is dropped, the rest computes the same tensors): not the cause of a misfit.
_RESIZED = ("img_size", "window_sizes", "ape_grid", "shift_windows", "drop_path_rate", "remat",
            "scan_blocks", "decoder_dim", "decoder_depth", "decoder_num_heads")


def _zeros(abstract):
    """Read-only zero arrays of an abstract tree's shapes, allocating nothing (a dry run)."""
    return jax.tree.map(lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), abstract)


def load_pretrained(init: str, config, template: dict, print_fn=print, *,
                    torch_cache: dict | None = None, dry_run: bool = False) -> dict:
    """The classifier's starting params: `template` (freshly initialised, host arrays) with every
    tensor the pretrained checkpoint provides, by the official loading rules.

    A mixmae-jax pretraining workdir (its newest intact step) loads natively, through the model's
    `load` (`models/loading.py`). An official `.pth` goes through the PyTorch interop, the only
    path that imports torch (its tensors kept in `torch_cache` for the load after a dry run).
    dry_run: check that it fits with zero arrays of the right shapes (a workdir's files are not
    read), before anything is written or compiled; raises ValueError naming --init."""
    from mixmae_jax.models import get_model_module, loading
    from mixmae_jax.tasks import restore_params

    if os.path.isdir(init):
        src = ckpt_lib.load_config_snapshot(init)
        if src.get("task", "pretrain") == "finetune":
            raise ValueError(f"--init {init}: a fine-tuning workdir; --init takes a pretraining "
                             "workdir or a .pth (convert this one with mixmae-convert to-torch "
                             "--format finetune first)")
        if src.model.name != config.model.name:
            raise ValueError(
                f"--init {init}: a {src.method.name} run of model.name={src.model.name!r}, but "
                f"this config fine-tunes model.name={config.model.name!r} ({config.method.name}"
                "); use a matching fine-tuning config")
        if dry_run:
            from mixmae_jax.methods import get_method

            source = _zeros(step_lib.graphdef_and_abstract_params(get_method(src))[1])
            src_model, where = src.model, init
            peek = ckpt_lib.Checkpointer(init, save_every=0, keep=0, read_only=True)
            latest = peek.latest_step()
            peek.close()
            if latest is None:
                raise FileNotFoundError(f"--init {init}: no checkpoint in that workdir")
        else:
            src_config, source, step = restore_params(init)
            src_model = src_config.model
            where = f"{src.method.name} pretraining step {step} of {init}"
        load = get_model_module(config.model.name).load
        try:
            params, report = load(source, src_model, template, config.model)
        except loading.LoadError as e:
            raise _summarise(e, init, config, src_model) from e
        lines = list(report)
    elif os.path.isfile(init):
        from mixmae_jax.interop import from_torch

        where = init
        cache = torch_cache if torch_cache is not None else {}
        if init not in cache:
            try:
                cache[init] = from_torch.load_torch_checkpoint(
                    init, trust_pickle=config.init_trust_pickle)
            except from_torch.ConversionError as e:  # its advice names convert's flag
                raise ValueError("--init " + str(e).replace(
                    "--trust-pickle (trust_pickle=True)", "--config.init_trust_pickle=True")
                ) from e
        try:
            params, report = from_torch.classifier_params(
                cache[init], layout_for(config), template, config.num_classes)
        except from_torch.ConversionError as e:
            raise _summarise(e, init, config) from e
        lines = [f"{report.loaded} tensors loaded, fresh: {', '.join(report.kept_fresh) or 'none'}"]
    else:
        raise FileNotFoundError(f"--init {init}: no such workdir or file")
    if dry_run:
        return params
    print_fn(f"Initialised from {where}: {lines[0]}")
    for line in lines[1:]:
        print_fn(f"  {line}")
    return params


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


def validate(config, *, num_devices: int = 1, process_count: int = 1) -> None:
    """The fine-tuning config's own checks (after the shared ones), each naming its key."""
    check = config_lib._check
    config_lib.validate(config, num_devices=num_devices, process_count=process_count,
                        method_checks=False)
    from mixmae_jax.methods import get_method

    get_method(config)  # an unknown method.name is refused here, naming the key
    check(config.num_classes > 0, "num_classes", f"{config.num_classes}: must be positive")
    check(config.data.source in ("tfds", "digits", "folder"), "data.source",
          f"{config.data.source!r}: fine-tuning reads labelled data: a TFDS dataset ('tfds', "
          "with 'image' and 'label' features and an eval split), class folders ('folder': "
          "data.folder/<split>/<class>/<image>) or the embedded 'digits'")
    d = config.optim.layer_decay
    check(0.0 < d <= 1.0, "optim.layer_decay", f"{d}: must lie in (0, 1] (1: no decay)")
    a = config.augment
    if a.randaug:
        from mixmae_jax.data.randaugment import parse_policy

        try:
            parse_policy(a.randaug)
        except ValueError as e:
            raise config_lib.ConfigError(str(e)) from None
    check(0.0 <= a.reprob <= 1.0, "augment.reprob", f"{a.reprob}: a probability")
    check(0.0 <= a.smoothing < 1.0, "augment.smoothing", f"{a.smoothing}: must lie in [0, 1)")
    check(a.mixup >= 0 and a.cutmix >= 0, "augment.mixup", "alphas must be >= 0")
    check(0.0 <= a.mix_prob <= 1.0 and 0.0 <= a.switch_prob <= 1.0, "augment.mix_prob",
          "mix_prob and switch_prob are probabilities")
    per_device = config.batch_size // num_devices // config.optim.grad_accum_steps
    check(per_device % 2 == 0 or (a.mixup <= 0 and a.cutmix <= 0), "batch_size",
          f"Mixup/CutMix pair image i with n-1-i of each device's batch: {per_device} images "
          "per device is odd")
    check(config.model.img_size == config.data.image_size, "model.img_size",
          "must equal data.image_size")
    best = config.get("keep_best", "")
    check(not best or best in config.get("evals", {}), "keep_best",
          f"{best!r} names no evaluator of config.evals ({', '.join(config.evals)})")


class FinetuneTask(Task):
    kind = "fine-tuning"
    batch_keys = ("image", "label")

    def __init__(self, config):
        super().__init__(config)
        self._objective = ClassifierObjective(config)
        self._best = None  # checkpointer of the best params
        self._torch_cache = {}  # an --init .pth read by check_init, for initial_params

    def check_config(self, num_devices: int, process_count: int) -> None:
        validate(self.config, num_devices=num_devices, process_count=process_count)
        from mixmae_jax import eval as eval_lib

        eval_lib.check_config(self.config, num_devices=num_devices,
                              process_count=process_count)

    def check_data(self) -> None:
        from mixmae_jax.data import eval_pipeline

        data = eval_pipeline.labelled_data(self.config.data)  # before compiling
        config_lib._check(data.num_classes == self.config.num_classes, "num_classes",
                          f"{self.config.num_classes}, but {data} has {data.num_classes} "
                          f"class{'' if data.num_classes == 1 else 'es'}; set "
                          f"--config.num_classes={data.num_classes}")
        splits = {"data.split": self.config.data.split}
        splits.update({f"evals.{name}.split": cfg.split for name, cfg in
                       self.config.evals.items() if cfg.type == "classification"})
        for key, split in splits.items():
            config_lib._check(split.split("[")[0] in data.splits, key,
                              f"{data} has no split {split!r} (it has {data.splits})")

    def input_options(self) -> dict:
        return {"with_labels": True, "randaug": self.config.augment.randaug}

    def build_model(self, rngs):
        return self.method.build_classifier(self.config.num_classes, rngs)

    @property
    def objective(self):
        return self._objective

    def make_optimizer(self, abstract_params, steps_per_epoch: int):
        from mixmae_jax.tasks.layer_decay import lr_scales

        o = self.config.optim
        scales = None
        if o.layer_decay != 1.0:
            scales = lr_scales(abstract_params, layout_for(self.config),
                               self.method.layer_decay_rule, o.layer_decay)
        return optim.make_optimizer(self.config, steps_per_epoch, scales)

    def extra_state(self) -> dict:
        return {"best_top1": lambda: jnp.full((), -1.0, jnp.float32),
                "best_step": lambda: jnp.full((), -1, jnp.int32)}

    def check_init(self) -> None:
        """A dry run of the load of `--init`: refused here, naming it, before the run writes or
        compiles anything (`initial_params` then loads it for real)."""
        if self.config.init:
            template = _zeros(jax.eval_shape(lambda: step_lib.init_params(
                self.method, jax.random.PRNGKey(0), self.build_model)))
            load_pretrained(self.config.init, self.config, template, dry_run=True,
                            torch_cache=self._torch_cache)

    def initial_params(self, abstract_params, run):
        init = self.config.init
        if not init:
            run.print_fn("Fine-tuning from random initialisation (no --init)")
            return None
        template = jax.device_get(jax.jit(lambda: step_lib.init_params(
            self.method, jax.random.PRNGKey(self.config.seed), self.build_model))())
        params = load_pretrained(init, self.config, template, print_fn=run.print_fn,
                                 torch_cache=self._torch_cache)
        self._torch_cache.clear()
        return params

    # -- the best params ----------------------------------------------------------------------

    def after_eval(self, exp, step: int, state, name: str, results: dict, run):
        """Keeps the params of the best top-1 of the evaluator `config.keep_best` names."""
        if name != self.config.get("keep_best", "") or results["top1"] <= float(
                jax.device_get(state["best_top1"])):
            return state, ""
        if self._best is None:
            self._best = ckpt_lib.Checkpointer(run.workdir, save_every=0, keep=1,
                                               subdir=ckpt_lib.BEST_DIR)
        if self._best.save(step, {"params": state["params"]}, force=True):
            self._best.wait()
        if jax.process_index() == 0:
            ckpt_lib.write_atomic(epath.Path(run.workdir) / ckpt_lib.BEST_DIR / "best.json",
                                  json.dumps({"step": step, **results}, indent=2) + "\n")
        replicated = state["best_top1"].sharding
        state = dict(state, best_top1=jax.device_put(jnp.float32(results["top1"]), replicated),
                     best_step=jax.device_put(jnp.int32(step), replicated))
        return state, "  (best so far)"

    def finish(self, exp, state, evaluators, last_results: dict, run) -> dict:
        """Best and final top-1 of the kept evaluator (a run resumed after its end evaluates its
        final state now)."""
        name = self.config.get("keep_best", "")
        if self._best is not None:
            self._best.close()
        if not name:
            return {}
        if name not in last_results:
            evaluator = next((e for e in evaluators if e.name == name), None)
            if evaluator is not None:
                last_results[name] = evaluator(state["params"])
        best = float(jax.device_get(state["best_top1"]))
        best_step = int(jax.device_get(state["best_step"]))
        if best >= 0:
            run.print_fn(f"Best {name} top-1 {best:.4f} at step {best_step} (params in "
                         f"{os.path.join(run.workdir, ckpt_lib.BEST_DIR)})")
        return {"best_top1": best, "best_step": best_step,
                **{f"final_{k}": v for k, v in last_results.get(name, {}).items()}}
