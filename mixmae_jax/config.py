"""Run configs: the schema (every field with its default), loading, validation.

Config files (`configs/<name>.py`) define `get_config(arg)` on top of `base_config()` and change
what differs. A config is validated before anything compiles; every error names the key at fault.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections.config_dict import placeholder


class ConfigError(ValueError):
    """A config value is invalid; the message starts with the key."""


def parse_arg(arg: str | None, **defaults):
    """'tiny,res=384' -> dict(tiny=True, res=384) over `defaults` (types follow the defaults)."""
    out = dict(defaults)
    for token in filter(None, (arg or "").split(",")):
        key, _, value = token.partition("=")
        if key not in out:
            raise ConfigError(f"config arg: unknown option {key!r} (known: {sorted(out)})")
        if not value:
            out[key] = True
        elif isinstance(defaults[key], bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(defaults[key])(value)
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """'configs/demo.py[:arg]' -> the file's get_config(arg) (outside absl flags: tools, tests)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_mixmae_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None) if arg else module.get_config()


def _check(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"{key}: {message}")


def stage_resolutions(model) -> list[int]:
    grid = model.img_size // model.patch_size
    return [grid // 2**s for s in range(len(model.depths))]


def validate(config, *, num_devices: int = 1, process_count: int = 1) -> None:
    """Checks the model geometry, the mask grid and the batch layout. Raises ConfigError."""
    m = config.model
    n = len(m.depths)
    _check(n >= 1 and len(m.num_heads) == n and len(m.window_sizes) == n, "model.depths",
           f"depths {tuple(m.depths)}, num_heads {tuple(m.num_heads)} and window_sizes "
           f"{tuple(m.window_sizes)} must have one entry per stage")
    _check(m.img_size % m.patch_size == 0, "model.img_size",
           f"{m.img_size} is not a multiple of model.patch_size={m.patch_size}")
    grid = m.img_size // m.patch_size
    _check(grid % 2 ** (n - 1) == 0, "model.img_size",
           f"the {grid}x{grid} token grid cannot be halved {n - 1} times by patch merging")
    _check(m.embed_dim % 4 == 0, "model.embed_dim", f"{m.embed_dim} must be divisible by 4 "
           "(2-D sin-cos position embedding)")
    for s, res in enumerate(stage_resolutions(m)):
        dim, heads, window = m.embed_dim * 2**s, m.num_heads[s], m.window_sizes[s]
        _check(dim % heads == 0, "model.num_heads",
               f"stage {s} width {dim} is not divisible by {heads} heads")
        win = min(window, res)
        _check(window > 0 and res % win == 0, "model.window_sizes",
               f"stage {s}: window {window} does not tile the {res}x{res} token map")
        if m.get("shift_windows", False) and win < res:
            _check(win % 2 == 0, "model.window_sizes",
                   f"stage {s}: shifted windows need an even window, got {window}")
    _check(m.decoder_dim % 4 == 0 and m.decoder_dim % m.decoder_num_heads == 0,
           "model.decoder_dim", f"{m.decoder_dim} must be divisible by 4 and by "
           f"model.decoder_num_heads={m.decoder_num_heads}")

    meth = config.method
    final = grid // 2 ** (n - 1)
    cells = final * final
    if meth.name in ("mixmim",):
        lo, hi = meth.mask_ratio, meth.mask_ratio + meth.range_mask_ratio
        _check(0.0 < lo and hi < 1.0, "method.mask_ratio",
               f"mask ratio range [{lo}, {hi}] must lie inside (0, 1)")
        _check(int(cells * lo) >= 1, "method.mask_ratio",
               f"int({cells} * {lo}) = 0 cells of the {final}x{final} mask grid would be mixed")

    d = config.data
    _check(d.image_size == m.img_size, "data.image_size",
           f"{d.image_size} differs from model.img_size={m.img_size}")
    _check(d.source in ("tfds", "folder", "embedded"), "data.source",
           f"unknown source {d.source!r} (tfds, folder or embedded)")
    if d.source == "folder":
        _check(bool(d.folder), "data.folder", "data.source='folder' needs data.folder")

    b = config.batch_size
    _check(b > 0 and b % num_devices == 0, "batch_size",
           f"global batch {b} is not divisible by the {num_devices} devices")
    _check(b % process_count == 0, "batch_size",
           f"global batch {b} is not divisible by the {process_count} processes")
    accum = config.optim.grad_accum_steps
    per_device = b // num_devices
    _check(accum >= 1 and per_device % accum == 0, "optim.grad_accum_steps",
           f"{accum} does not divide the per-device batch {per_device}")
    _check(per_device // accum >= 2, "batch_size",
           f"each device's micro-batch must hold at least 2 images to pair (got "
           f"{per_device // accum}: batch_size {b} over {num_devices} devices, "
           f"optim.grad_accum_steps {accum})")
    _check(config.compute_dtype in ("float32", "bfloat16"), "compute_dtype",
           f"{config.compute_dtype!r} (float32 or bfloat16)")
    _check(config.epochs > 0 or config.total_steps > 0, "epochs",
           "set epochs > 0 or total_steps > 0")
    _check(config.log_every > 0 and config.checkpoint_every > 0, "log_every",
           "log_every and checkpoint_every must be positive")


# ---------------------------------------------------------------------------------------------
# Schema and model variants.
# ---------------------------------------------------------------------------------------------

# MixMIM encoder variants (official `models_mixmim.py` / `models_mixmim_ft.py` factories).
# Windows 14/14/14/7 at 224; the *_384 finetune models use 16/16/24/12.
VARIANTS = {
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "H": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
}
WINDOWS = {224: (14, 14, 14, 7), 384: (16, 16, 24, 12)}


def model_config(variant: str = "B", img_size: int = 224) -> ml_collections.ConfigDict:
    v = VARIANTS[variant]
    return ml_collections.ConfigDict(
        dict(
            name="mixmim",
            img_size=img_size,
            patch_size=4,
            in_chans=3,
            embed_dim=v["embed_dim"],
            depths=v["depths"],
            num_heads=v["num_heads"],
            window_sizes=WINDOWS[img_size],
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=0.0,
            shift_windows=False,  # Swin baselines only; MixMIM never shifts.
            decoder_dim=512,
            decoder_depth=8,
            decoder_num_heads=16,
            remat=False,  # jax.checkpoint each encoder block (memory for compute).
            scan_blocks=True,  # run each stage's identical blocks as a lax.scan (see layers.py)
        )
    )


def base_config() -> ml_collections.ConfigDict:
    """The official MixMIM-B pretraining recipe; config files change what differs."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config("B", 224)

    c.method = ml_collections.ConfigDict(
        dict(
            name="mixmim",
            mask_ratio=0.5,  # int(L * r) cells of the final-stage grid come from the partner.
            range_mask_ratio=0.0,  # official constructor default: r = mask_ratio + U(0, range).
            mask_per_sample=False,  # official: one mask shared by each device-local batch.
            norm_pix_loss=True,
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            source="tfds",  # "tfds" | "folder" | "embedded"
            name="imagenet2012",  # tfds dataset name (source="tfds")
            split="train",
            # Optional strings are typed placeholders so `--config.data.folder=...` works.
            data_dir=placeholder(str),  # tfds data dir (None: tfds default / TFDS_DATA_DIR)
            manual_dir=placeholder(str),  # tfds manual download dir (imagenet2012 needs one)
            folder=placeholder(str),  # image folder (source="folder"): class sub-folders or flat
            image_size=224,
            crop_scale=(0.2, 1.0),  # RandomResizedCrop area range, bicubic
            hflip=True,
            shuffle_buffer=10_000,
            prefetch=2,  # batches prefetched to the device
            skip_corrupt=False,  # False: stop naming the file; True: skip it and count it
            cache=False,
        )
    )

    c.batch_size = 2048  # global batch over all devices and hosts
    c.epochs = 600
    c.total_steps = -1  # > 0 overrides epochs (smoke runs)

    c.optim = ml_collections.ConfigDict(
        dict(
            base_lr=1.5e-4,  # lr = base_lr * batch_size / 256
            min_lr=0.0,
            warmup_epochs=40,
            weight_decay=0.05,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_grad_norm=0.0,  # 0: off (official)
            grad_accum_steps=1,
        )
    )

    c.compute_dtype = "float32"  # "bfloat16": bf16 matmuls, fp32 master weights/LN/softmax/loss
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
    # (regex over "/"-joined parameter paths, mesh axis or None); first match wins.
    c.sharding_rules = ()

    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.visualize_every = 0  # 0: off
    return c


def tiny_overrides(c: ml_collections.ConfigDict) -> None:
    """Shrink a run to a CPU smoke test: 64 px, 4 narrow stages, a few steps on the demo data."""
    c.model.update(img_size=64, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                   window_sizes=(8, 8, 4, 2), decoder_dim=64, decoder_depth=1,
                   decoder_num_heads=2)
    c.data.update(source="embedded", image_size=64, shuffle_buffer=512)
    c.batch_size = 8
    c.total_steps = 4
    c.optim.warmup_epochs = 0
    c.log_every = 1
    c.checkpoint_every = 2


def sized_config(variant: str, arg: str | None) -> ml_collections.ConfigDict:
    """Config for MixMIM-<variant> with options 'tiny' (CPU smoke) and 'res=384' (finetune size)."""
    opts = parse_arg(arg, tiny=False, res=224)
    c = base_config()
    c.model = model_config(variant, opts["res"])
    c.data.image_size = opts["res"]
    if variant in ("L", "H"):  # shard big kernels and their Adam moments over `fsdp`
        c.sharding_rules = (("FSDP_DEFAULT", "fsdp"),)
    if opts["tiny"]:
        tiny_overrides(c)
    return c
