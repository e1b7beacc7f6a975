"""Fine-tuning a pretrained encoder end to end: the official recipes, in the pretraining loop.

    mixmae-finetune --config configs/finetune_<...>.py --workdir DIR --init PRETRAIN_WORKDIR|F.pth

A fine-tuning run is a `trainer.Task`: the loop, sharding, checkpoints (every N steps, the last K
kept, SIGTERM), metrics and exact resume are pretraining's. What differs:

* the model is the method's official fine-tuning classifier (`Method.build_classifier`), with
  drop path; it starts from the pretrained encoder loaded by the official rules (below) and a
  fresh head (trunc-normal std 2e-5);
* the input carries labels and, after the crop and flip, timm's RandAugment in tf.data
  (`data/randaugment.py`); the step applies RandomErasing, Mixup/CutMix and label smoothing on
  device (`eval/mixup.py`) and minimises the soft-target cross entropy;
* AdamW with the recipe's layer-wise lr decay (`eval/layer_decay.py`, MixMIM's quirk included);
* every `eval_every_epochs` and at the end: top-1 / top-5 / loss on the labelled eval split
  (every example exactly once, padding masked, `data/eval_pipeline.py`), logged beside the
  training metrics; the best top-1's params are kept in `DIR/best/` (the last state in
  `DIR/checkpoints/`, as in pretraining).

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
import optax
from etils import epath

from mixmae_jax import config as config_lib
from mixmae_jax import imaging
from mixmae_jax.eval import mixup
from mixmae_jax.train import checkpoint as ckpt_lib
from mixmae_jax.train import optim, sharding
from mixmae_jax.train import step as step_lib
from mixmae_jax.train.trainer import Task

BEST_DIR = "best"


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


def make_eval_step(graphdef, num_classes: int):
    """(params, batch) -> sums over the valid rows: count, top-1 / top-5 hits, loss."""

    def eval_step(params, batch):
        logits = step_lib.bind(graphdef, params)(imaging.normalize(batch["image"]))
        labels, valid = batch["label"], batch["valid"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
        hit1 = jnp.argmax(logits, axis=-1) == labels
        hit5 = jnp.any(top5 == labels[:, None], axis=-1)
        return {"count": jnp.sum(valid), "top1": jnp.sum(hit1 & valid),
                "top5": jnp.sum(hit5 & valid), "loss": jnp.sum(jnp.where(valid, loss, 0.0))}

    return eval_step


def evaluate(eval_step, params, iterator, batch_sharding) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean cross entropy over one pass of an `EvalIterator`."""
    totals = None
    for local in iterator:
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, local[k])
                 for k in ("image", "label", "valid")}
        out = eval_step(params, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = max(int(totals["count"]), 1)
    return {"top1": float(totals["top1"]) / n, "top5": float(totals["top5"]) / n,
            "loss": float(totals["loss"]) / n, "count": int(totals["count"])}


# ---------------------------------------------------------------------------------------------
# The pretrained encoder
# ---------------------------------------------------------------------------------------------


def _summarise(error: Exception, init: str, config, limit: int = 4) -> ValueError:
    """A load error's first few problems, naming --init and the config's model."""
    lines = [ln.strip() for ln in str(error).splitlines()[1:] if ln.strip()] or [str(error)]
    more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
    return ValueError(f"--init {init}: {len(lines)} tensor(s) do not fit this config's "
                      f"{config.method.name} {config.model.name} classifier: "
                      f"{'; '.join(lines[:limit])}{more}")


def load_pretrained(init: str, config, template: dict, print_fn=print) -> dict:
    """The classifier's starting params: `template` (freshly initialised, host arrays) with every
    tensor the pretrained checkpoint provides, by the official loading rules.

    A mixmae-jax pretraining workdir (its newest intact step) loads natively, through the model's
    `load` (`models/loading.py`). An official `.pth` goes through the PyTorch interop, the only
    path that imports torch."""
    from mixmae_jax.models import get_model_module, loading
    from mixmae_jax.train.trainer import load_config_snapshot, restore_params

    if os.path.isdir(init):
        src = load_config_snapshot(init)
        if src.get("task", "pretrain") == "finetune":
            raise ValueError(f"--init {init}: a fine-tuning workdir; --init takes a pretraining "
                             "workdir or a .pth (convert this one with mixmae-convert to-torch "
                             "--format finetune first)")
        if src.model.name != config.model.name:
            raise ValueError(
                f"--init {init}: a {src.method.name} run of model.name={src.model.name!r}, but "
                f"this config fine-tunes model.name={config.model.name!r} ({config.method.name}"
                "); use a matching fine-tuning config")
        src_config, source, step = restore_params(init)
        where = f"{src.method.name} pretraining step {step} of {init}"
        load = get_model_module(config.model.name).load
        try:
            params, report = load(source, src_config.model, template, config.model)
        except loading.LoadError as e:
            raise _summarise(e, init, config) from e
        lines = list(report)
    elif os.path.isfile(init):
        from mixmae_jax.interop import from_torch
        from mixmae_jax.methods import get_method

        where = init
        state_dict = from_torch.load_torch_checkpoint(init, trust_pickle=config.init_trust_pickle)
        try:
            params, report = from_torch.classifier_params(
                state_dict, get_method(config).torch_layout(), template, config.num_classes)
        except from_torch.ConversionError as e:
            raise _summarise(e, init, config) from e
        lines = [f"{report.loaded} tensors loaded, fresh: {', '.join(report.kept_fresh) or 'none'}"]
    else:
        raise FileNotFoundError(f"--init {init}: no such workdir or file")
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
    e = config.eval_batch_size
    check(e > 0 and e % num_devices == 0 and e % process_count == 0, "eval_batch_size",
          f"{e}: must be a positive multiple of the {num_devices} devices")
    check(config.eval_every_epochs >= 0, "eval_every_epochs", "must be >= 0 (0: at the end)")
    check(config.model.img_size == config.data.image_size, "model.img_size",
          "must equal data.image_size")


class FinetuneTask(Task):
    kind = "fine-tuning"
    batch_keys = ("image", "label")

    def __init__(self, config):
        super().__init__(config)
        self._objective = ClassifierObjective(config)
        self._eval = None  # (eval step, iterator, batch sharding), built on first use
        self._best = None  # checkpointer of the best params
        self.last_eval = None  # the latest evaluation's results

    def check_config(self, num_devices: int, process_count: int) -> None:
        validate(self.config, num_devices=num_devices, process_count=process_count)

    def check_data(self) -> None:
        from mixmae_jax.data import eval_pipeline

        data = eval_pipeline.labelled_data(self.config.data)  # before compiling
        config_lib._check(data.num_classes == self.config.num_classes, "num_classes",
                          f"{self.config.num_classes}, but {data} has {data.num_classes} "
                          f"classes; set --config.num_classes={data.num_classes}")
        for key in ("split", "eval_split"):
            split = self.config.data[key]
            config_lib._check(split.split("[")[0] in data.splits, f"data.{key}",
                              f"{data} has no split {split!r} (it has {data.splits})")

    def input_options(self) -> dict:
        return {"with_labels": True, "randaug": self.config.augment.randaug}

    def build_model(self, rngs):
        return self.method.build_classifier(self.config.num_classes, rngs)

    @property
    def objective(self):
        return self._objective

    def make_optimizer(self, abstract_params, steps_per_epoch: int):
        from mixmae_jax.eval.layer_decay import lr_scales

        o = self.config.optim
        scales = None
        if o.layer_decay != 1.0:
            scales = lr_scales(abstract_params, self.method.torch_layout(),
                               self.method.layer_decay_rule, o.layer_decay)
        return optim.make_optimizer(self.config, steps_per_epoch, scales)

    def extra_state(self) -> dict:
        return {"best_top1": lambda: jnp.full((), -1.0, jnp.float32),
                "best_step": lambda: jnp.full((), -1, jnp.int32)}

    def initial_params(self, abstract_params):
        init = self.config.init
        if not init:
            self.print_fn("Fine-tuning from random initialisation (no --init)")
            return None
        template = jax.device_get(jax.jit(lambda: step_lib.init_params(
            self.method, jax.random.PRNGKey(self.config.seed), self.build_model))())
        return load_pretrained(init, self.config, template, print_fn=self.print_fn)

    # -- evaluation -------------------------------------------------------------------------

    def _eval_parts(self, exp):
        if self._eval is None:
            from mixmae_jax.data import eval_pipeline

            c = self.config
            batch_sh = exp.batch_sharding
            step = jax.jit(make_eval_step(exp.graphdef, c.num_classes),
                           in_shardings=(exp.state_shardings["params"],
                                         {k: batch_sh for k in ("image", "label", "valid")}),
                           out_shardings=sharding.replicated(exp.mesh))
            iterator = eval_pipeline.EvalIterator(
                eval_pipeline.labelled_data(c.data), c.data.eval_split,
                global_batch_size=c.eval_batch_size, image_size=c.data.image_size,
                crop_pct=c.data.crop_pct, process_index=jax.process_index(),
                process_count=jax.process_count())
            self._eval = (step, iterator, batch_sh)
        return self._eval

    def evaluate(self, exp, state) -> dict[str, float]:
        step, iterator, batch_sh = self._eval_parts(exp)
        return evaluate(step, state["params"], iterator, batch_sh)

    def after_step(self, exp, step: int, state, *, total_steps: int, writer):
        every = round(self.config.eval_every_epochs * exp.steps_per_epoch)
        if step != total_steps and (every <= 0 or step % every):
            return state
        result = self.last_eval = self.evaluate(exp, state)
        best = float(jax.device_get(state["best_top1"]))
        writer.write_scalars(step, {f"eval_{k}": v for k, v in result.items() if k != "count"})
        line = (f"eval step {step}: top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  "
                f"loss {result['loss']:.4f}  ({result['count']} images)")
        if result["top1"] > best:
            self._save_best(step, state["params"], result)
            replicated = state["best_top1"].sharding
            state = dict(state,
                         best_top1=jax.device_put(jnp.float32(result["top1"]), replicated),
                         best_step=jax.device_put(jnp.int32(step), replicated))
            line += "  (best so far)"
        self.print_fn(line)
        return state

    def _save_best(self, step: int, params, result) -> None:
        if self._best is None:
            self._best = ckpt_lib.Checkpointer(self.workdir, save_every=0, keep=1,
                                               subdir=BEST_DIR)
        if self._best.save(step, {"params": params}, force=True):
            self._best.wait()
        if jax.process_index() == 0:
            ckpt_lib.write_atomic(epath.Path(self.workdir) / BEST_DIR / "best.json",
                                  json.dumps({"step": step, **result}, indent=2) + "\n")

    def finish(self, exp, state) -> dict:
        """Best and final top-1 (a run resumed after its end evaluates its final state)."""
        if self.last_eval is None:
            self.last_eval = self.evaluate(exp, state)
        if self._best is not None:
            self._best.close()
        best = float(jax.device_get(state["best_top1"]))
        best_step = int(jax.device_get(state["best_step"]))
        if best >= 0:
            self.print_fn(f"Best eval top-1 {best:.4f} at step {best_step} (params in "
                     f"{os.path.join(self.workdir, BEST_DIR)})")
        return {"best_top1": best, "best_step": best_step,
                **{f"final_{k}": v for k, v in self.last_eval.items()}}


