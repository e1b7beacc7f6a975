"""Run configs: the infrastructure defaults, loading, validation.

Config files (`configs/<name>.py`) define `get_config(arg)` on top of `defaults()` and spell out
their whole recipe: the model (`models/<name>.py`'s `model_config`), the method's values, data
augmentation, batch, schedule and optimizer; what recipes share (the fine-tuning recipe, the
small sizes, the FSDP rules, the schedule) is `configs/common.py`. A config is validated before
anything compiles; every error names the key at fault.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import ml_collections
from ml_collections.config_dict import placeholder


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the key."""


def parse_arg(arg: str | None, **options) -> dict:
    """A config file's variant string -> its options: 'tiny,res=384' -> dict(tiny=True, res=384).

    Each option's default gives its type (a bare name sets a bool option); a tuple default lists
    the allowed values, the first being the default (`res=(224, 384)`). A variant the file does
    not know is a ConfigError that lists the ones it does."""
    allowed = {k: v for k, v in options.items() if isinstance(v, tuple)}
    out = {k: v[0] if k in allowed else v for k, v in options.items()}
    for token in filter(None, (arg or "").split(",")):
        key, eq, text = token.partition("=")
        if key not in out:
            raise ConfigError(f"unknown variant {token!r} (known: {_known_variants(options)})")
        kind = type(out[key])
        if kind is bool:
            value = not eq or text.lower() in ("1", "true", "yes")
        elif not eq:
            raise ConfigError(f"variant {key!r} takes a value: {key}={_value_hint(options[key])}")
        else:
            try:
                value = kind(text)
            except ValueError:
                raise ConfigError(f"variant {token!r}: {key} is {_value_hint(out[key])}") from None
        if key in allowed and value not in allowed[key]:
            raise ConfigError(f"variant {token!r}: {key} is one of "
                              f"{'|'.join(map(str, allowed[key]))}")
        out[key] = value
    return out


def _value_hint(default) -> str:
    """'224|384' for a choice, '<int>' for an int."""
    if isinstance(default, tuple):
        return "|".join(map(str, default))
    return f"<{type(default).__name__}>"


def _known_variants(options) -> str:
    return ", ".join(k if isinstance(v, bool) else f"{k}={_value_hint(v)}"
                     for k, v in options.items())


def _config_module(path: str):
    """The module of the config file at `path`.

    A file inside a package (a folder with `__init__.py`, as `configs/` is) is imported as that
    package's module, with the folder above the package put first on sys.path: recipes import
    each other (`from configs import mixmim_b`) from this copy of the package, whichever way the
    path is written and from any working directory. Any other file is run on its own."""
    if os.path.isdir(path):
        raise ConfigError(f"--config: {path!r} is a directory; name a config file in it "
                          f"(e.g. {os.path.join(path, 'demo.py')})")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    if not path.endswith(".py"):
        raise ConfigError(f"--config: {path!r} is not a config file (a Python file defining "
                          "get_config, e.g. configs/demo.py)")
    folder, name = os.path.split(os.path.realpath(path)[:-3])
    parts = [name]
    while os.path.isfile(os.path.join(folder, "__init__.py")):
        folder, package = os.path.split(folder)
        parts.insert(0, package)
    try:
        if len(parts) == 1 or not all(p.isidentifier() for p in parts):
            spec = importlib.util.spec_from_file_location("_mixmae_config", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        if parts[0] not in sys.modules and folder not in sys.path:
            sys.path.insert(0, folder)
        module = importlib.import_module(".".join(parts))
    except SyntaxError as e:
        raise ConfigError(f"--config: {e.filename}:{e.lineno}: {e.msg}") from e
    except Exception as e:  # a broken config file: the user fixes it
        raise ConfigError(f"--config: {path}: {type(e).__name__}: {e}") from e
    if os.path.realpath(module.__file__) != os.path.realpath(path):
        raise ConfigError(f"--config: {path}: `import {'.'.join(parts)}` finds "
                          f"{module.__file__}: another {parts[0]!r} package is already imported "
                          "or comes first on sys.path (load the configs of one checkout per "
                          "process)")
    return module


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """'configs/demo.py[:arg]' -> the file's get_config(arg), with `--config.KEY=VALUE` overrides
    parsed exactly as mixmae-pretrain parses them (ml_collections config flags)."""
    from absl import flags
    from ml_collections import config_flags

    path, colon, arg = spec.partition(":")
    module = _config_module(path)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"--config: {path} defines no get_config(arg)")
    try:
        config = module.get_config(arg) if colon else module.get_config()
    except ConfigError as e:  # a variant the file does not know, or a recipe it refuses
        raise ConfigError(f"--config: {spec}: {e}") from e
    except Exception as e:  # a broken config file: the user fixes it
        raise ConfigError(f"--config: {spec}: get_config raised {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: {path}: get_config returned {type(config).__name__}, "
                          "not a ConfigDict")
    values = flags.FlagValues()
    argv = ["mixmae", *overrides]
    try:
        config_flags.DEFINE_config_dict("config", config, "config", flag_values=values,
                                        lock_config=True, sys_argv=argv)
        values(argv)
        config = values.config
    except (flags.Error, KeyError, AttributeError) as e:
        if overrides:
            _check_override_keys(spec, overrides)
        raise ConfigError(f"--config: {e}") from e
    config.unlock()
    _expand_user(config)
    return config


# Keys holding local paths, at any depth (data.folder, evals.knn.data_dir, init, ...).
PATH_KEYS = ("data_dir", "manual_dir", "folder", "init", "compilation_cache_dir")


def _expand_user(config) -> None:
    """`~` in path keys, as a shell would (it does not in `--config.data.folder=~/x`)."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            _expand_user(value)
        elif key in PATH_KEYS and isinstance(value, str) and value.startswith("~"):
            config[key] = os.path.expanduser(value)


def _check_override_keys(spec: str, overrides) -> None:
    """ConfigError naming the first override whose key the config lacks, with the closest keys."""
    import difflib

    from flax import traverse_util

    paths = traverse_util.flatten_dict(load_config(spec).to_dict())
    keys = {".".join(p[:i]) for p in paths for i in range(1, len(p) + 1)}
    for item in overrides:
        key = item.split("=", 1)[0].removeprefix("--config.")
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"--config.{key}: no such config key in {spec}{hint}")


def _check(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(config, *, num_devices: int = 1, process_count: int = 1,
             method_checks: bool = True) -> None:
    """Checks the recipe is complete, the model and method fit each other, the model geometry
    (its module's `check_config`), the method's own values (unless `method_checks` is False:
    fine-tuning runs no pretraining method) and the batch layout.
    Raises ConfigError naming the key; runs before anything compiles."""
    from mixmae_jax.methods import get_method
    from mixmae_jax.models import get_model_module
    from mixmae_jax.models.layers import remat_mode

    missing = [k for k in REQUIRED if _get(config, k) is None]
    _check(not missing, missing[0] if missing else "", "a config file must set it (the recipe "
           f"lives in configs/*.py); also unset: {', '.join(missing[1:]) or 'nothing else'}")
    module = get_model_module(config.model.name)
    method = get_method(config)
    _check(config.model.name in method.models, "method.name",
           f"method {method.name!r} cannot run model.name={config.model.name!r} (it runs "
           f"{', '.join(repr(m) for m in method.models)})")
    module.check_config(config.model, _check)
    try:
        remat_mode(config.model.remat)  # the models' own reading of model.remat
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if method_checks:
        method.check_config(config, num_devices, _check)

    d = config.data
    _check(d.image_size == config.model.img_size, "data.image_size",
           f"{d.image_size} differs from model.img_size={config.model.img_size}")
    _check(d.source in ("tfds", "folder", "embedded", "digits"), "data.source",
           f"unknown source {d.source!r} (tfds, folder, embedded or digits)")
    if d.source == "folder":
        _check(bool(d.folder), "data.folder", "data.source='folder' needs data.folder")
    lo, hi = tuple(d.crop_scale)
    _check(0.0 < lo <= hi <= 1.0, "data.crop_scale", f"({lo}, {hi}): need 0 < lo <= hi <= 1")

    b = config.batch_size
    _check(b > 0, "batch_size", f"{b}: the global batch must be a positive number of images")
    _check(b % num_devices == 0, "batch_size",
           f"global batch {b} is not divisible by the {num_devices} devices")
    _check(b % process_count == 0, "batch_size",
           f"global batch {b} is not divisible by the {process_count} processes")
    accum = config.optim.grad_accum_steps
    per_device = b // num_devices
    _check(accum >= 1 and per_device % accum == 0, "optim.grad_accum_steps",
           f"{accum} does not divide the per-device batch {per_device}")
    need = method.min_images_per_group if method_checks else 1
    _check(per_device // accum >= need, "batch_size",
           f"{method.name} needs at least {need} images in each device's micro-batch (got "
           f"{per_device // accum}: batch_size {b} over {num_devices} devices, "
           f"optim.grad_accum_steps {accum})")
    _check(config.compute_dtype in ("float32", "bfloat16"), "compute_dtype",
           f"{config.compute_dtype!r} (float32 or bfloat16)")
    _check(config.epochs > 0 or config.total_steps > 0, "total_steps",
           f"{config.total_steps} with epochs {config.epochs}: the run's length is total_steps "
           "(> 0, in steps) or, with total_steps -1, epochs (> 0)")
    _check(config.optim.warmup_steps >= -1, "optim.warmup_steps",
           f"{config.optim.warmup_steps}: -1 (the warmup is optim.warmup_epochs) or >= 0")
    _check(config.log_every > 0 and config.checkpoint_every > 0, "log_every",
           "log_every and checkpoint_every must be positive")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    return node


# ---------------------------------------------------------------------------------------------
# Defaults: infrastructure only. The recipe (model, method, batch, schedule, optimizer values,
# augmentation) is spelled out by each file in configs/.
# ---------------------------------------------------------------------------------------------

# Keys a config file must set (`validate` names the first one missing).
REQUIRED = ("model.name", "method.name", "batch_size", "optim.base_lr", "optim.lr_batch_divisor",
            "optim.warmup_epochs", "optim.min_lr", "optim.weight_decay", "optim.b1", "optim.b2",
            "optim.eps", "data.crop_scale")


def defaults() -> ml_collections.ConfigDict:
    """What every run shares: logging, checkpointing, mesh, input plumbing. Recipe fields are
    typed placeholders (None) that a config file fills in."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(name=placeholder(str)))  # a models/<name>.py config
    c.method = ml_collections.ConfigDict(dict(name=placeholder(str)))  # a methods/<name>.py
    c.data = ml_collections.ConfigDict(
        dict(
            source="tfds",  # "tfds" | "folder" | "embedded" (photo crops) | "digits" (labelled)
            name="imagenet2012",  # tfds dataset name (source="tfds")
            split="train",
            # Optional strings are typed placeholders so `--config.data.folder=...` works.
            data_dir=placeholder(str),  # tfds data dir (None: tfds default / TFDS_DATA_DIR)
            manual_dir=placeholder(str),  # tfds manual download dir (imagenet2012 needs one)
            folder=placeholder(str),  # image folder (source="folder"): class sub-folders or flat
            image_size=224,
            crop_scale=placeholder(tuple),  # RandomResizedCrop area range (recipe)
            hflip=True,
            shuffle_buffer=10_000,
            prefetch=2,  # batches prefetched to the device
            skip_corrupt=False,  # False: stop naming the file; True: skip it and count it
            cache=False,
        )
    )
    c.batch_size = placeholder(int)  # global batch over all devices and hosts
    # The run's length and warmup, in epochs or in steps (configs/common.py `schedule` sets one
    # of each). A step count wins over epochs, so `--config.total_steps=N` shortens any recipe
    # (an epoch warmup then keeps its fraction of the run, train/optim.py).
    c.epochs = 0.0
    c.total_steps = -1  # > 0: the run's length in steps
    c.optim = ml_collections.ConfigDict(
        dict(
            base_lr=placeholder(float),  # peak lr = base_lr * batch_size / lr_batch_divisor
            lr_batch_divisor=placeholder(int),
            warmup_epochs=placeholder(float),
            warmup_steps=-1,  # >= 0: the warmup in steps
            warmup_lr=0.0,  # lr at step 0, rising linearly to the peak over the warmup
            min_lr=placeholder(float),
            schedule="cosine",  # after warmup: "cosine" (half-cosine to min_lr), "multistep" or
            # "timm_cosine" (SimMIM fine-tuning: the half-cosine's phase counts from step 0)
            decay_epochs=(),  # "multistep": epochs at which the lr is multiplied by decay_rate
            decay_rate=0.1,
            weight_decay=placeholder(float),
            # Params without weight decay, besides every 1-D tensor (regexes over "/"-joined
            # paths).
            no_decay=(),
            b1=placeholder(float),
            b2=placeholder(float),
            eps=placeholder(float),
            clip_grad_norm=0.0,  # 0: off
            grad_accum_steps=1,
        )
    )
    # A directory for XLA's persistent compilation cache ("": off): a repeated run (a resume, a
    # second fine-tuning, the bench) loads its compiled step instead of compiling it again.
    # Compiled CPU code targets this machine's CPU: do not share one between CPU kinds.
    c.compilation_cache_dir = ""
    c.compute_dtype = "float32"  # "bfloat16": bf16 matmuls, fp32 master weights/LN/softmax/loss
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
    # (regex over "/"-joined parameter paths, mesh axis or None); first match wins.
    c.sharding_rules = ()
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    # Evaluators, by name (mixmae_jax/eval/__init__.py): each runs every `every_epochs` epochs
    # (> 0), else every `every_steps` steps (> 0; -1: only at the end; 0: off), and at the end,
    # logging `<name>_<metric>`. The k-NN monitor is declared for every run, off until
    # `--config.evals.knn.every_steps=N`: k-NN top-1/top-5 of the frozen features from a
    # labelled train split to a test split.
    c.evals = ml_collections.ConfigDict(dict(knn=dict(
        type="knn",
        every_steps=0,
        every_epochs=0.0,
        source="digits",  # "digits" (embedded) or "tfds" (by name, prepared, with labels)
        name="mixmae_digits",  # tfds dataset (source="tfds")
        data_dir=placeholder(str),
        manual_dir=placeholder(str),
        train_split="train",
        test_split="test",
        k=20,
        temperature=0.07,
        batch_size=200,  # global
        crop_pct=1.0,  # shorter side to image_size / crop_pct, centre crop
    )))
    return c


def finetune_defaults(c: ml_collections.ConfigDict) -> None:
    """Turns a pretraining recipe's config (its model and method) into a fine-tuning config;
    the fine-tuning file then spells out its recipe's values."""
    c.task = "finetune"  # tasks.for_config: the classifier, labels, evaluation, best params
    c.init = ""  # --init: a pretraining workdir or an official .pth ("": random init)
    c.init_trust_pickle = False  # allow a .pth that pickles more than tensors (official files)
    c.num_classes = placeholder(int)
    c.augment = ml_collections.ConfigDict(dict(
        randaug="",  # timm RandAugment policy, e.g. "rand-m9-mstd0.5-inc1" ("": off)
        reprob=0.0,  # RandomErasing probability (mode "pixel")
        mixup=0.0,  # Mixup alpha (0: off)
        cutmix=0.0,  # CutMix alpha (0: off)
        mix_prob=1.0,  # probability a batch is mixed at all
        switch_prob=0.5,  # CutMix instead of Mixup when both are on
        smoothing=0.0,  # label smoothing
    ))
    c.optim.layer_decay = 1.0  # layer-wise lr decay (1: none); the rule is the method's
    # Top-1 / top-5 / loss on a labelled split of the run's data (eval/classification.py).
    c.evals.eval = ml_collections.ConfigDict(dict(
        type="classification",
        every_steps=0,
        every_epochs=1.0,
        split="validation",
        batch_size=placeholder(int),  # global
        crop_pct=0.875,  # shorter side to size / crop_pct, bicubic, centre crop
    ))
    c.keep_best = "eval"  # the evaluator whose best top-1's params are kept in DIR/best
