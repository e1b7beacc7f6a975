"""What the recipes share, written once.

* `finetune(c, ...)`: a pretraining recipe -> the fine-tuning recipe MixMIM, MAE and UM-MAE share
  (their official scripts give the same values); each finetune_*.py passes and spells out what
  differs from it.
* `shrink(c, size)`: the one way to make a recipe small. Every small model is written once, in
  SIZES: "tiny" (the `:tiny` variants), "demo" (configs/demo.py), "digits" and "toy"
  (configs/digits.py); the geometry that follows from a size (UM-MAE's compact grid, SimMIM's
  mask squares) is derived here. `tiny(c)` is the `:tiny` variant of any recipe: shrink(c,
  "tiny") and a 4-step smoke run.
* `sharding_rules(variant)`: FSDP for the L and H models.
* `schedule(c, epochs= | steps=, warmup=)`: a run's length and warmup, in epochs or in steps.
"""

from mixmae_jax import config as config_lib
from mixmae_jax.config import ConfigError

# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------


def schedule(c, *, epochs: float | None = None, steps: int | None = None, warmup: float = 0):
    """The run's length and its warmup, both in epochs (the recipes: the official scripts count
    epochs) or both in steps (the CPU runs); the other unit's keys are set to off, so the config
    says one thing. `--config.total_steps=N` still shortens an epoch recipe (train/optim.py)."""
    if (epochs is None) == (steps is None):
        raise ConfigError("schedule: the run's length in epochs or in steps (one of them)")
    if epochs is not None:
        c.epochs, c.total_steps = epochs, -1
        c.optim.update(warmup_epochs=warmup, warmup_steps=-1)
    else:
        c.epochs, c.total_steps = 0, steps
        c.optim.update(warmup_epochs=0, warmup_steps=warmup)
    return c


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------


def finetune(c, *, layer_decay: float, no_decay=(), crop_pct: float = 0.875):
    """Pretraining recipe `c` -> the ImageNet-1k fine-tuning recipe of MixMIM, MAE and UM-MAE.

    Their official scripts give the same values: MixMIM exp/base_600ep/finetune.sh over
    main_finetune.py (shared/reference/mixmim.md §5.2), MAE FINETUNE.md, UM-MAE Makefile
    L127-L221 (ummae_mixedae.md §1.9). What differs is the caller's: its layer decay (the rule is
    the method's), the names its model's no_weight_decay() lists (besides every 1-D tensor) and
    its evaluation crop."""
    config_lib.finetune_defaults(c)
    c.model.drop_path_rate = 0.1  # linear over the blocks (UM-MAE Swin-L: 0.2, not shipped)
    c.num_classes = 1000
    c.data.update(source="tfds", name="imagenet2012", split="train",
                  crop_scale=(0.08, 1.0))  # timm create_transform: RandomResizedCrop(0.08, 1)
    # every epoch on the validation split: resize size / crop_pct, centre crop, bicubic
    c.evals.eval.update(split="validation", batch_size=1024, crop_pct=crop_pct)
    c.augment.update(randaug="rand-m9-mstd0.5-inc1",  # timm: 2 ops, m ~ N(9, 0.5), increasing
                     reprob=0.25, mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5,
                     smoothing=0.1)
    c.batch_size = 1024  # MixMIM: 8 GPUs x 128; UM-MAE: 8 x 64 x 2 accumulation steps
    schedule(c, epochs=100, warmup=5)
    c.optim.update(dict(
        base_lr=5e-4,  # blr; peak lr = 5e-4 * 1024 / 256 = 2e-3
        lr_batch_divisor=256,
        warmup_lr=0.0,
        min_lr=1e-6,
        schedule="cosine",
        weight_decay=0.05,  # every >= 2-D tensor but the `no_decay` names
        no_decay=no_decay,
        b1=0.9, b2=0.999, eps=1e-8,  # torch AdamW defaults
        clip_grad_norm=0.0,
        layer_decay=layer_decay,
    ))
    c.checkpoint_every = 5000
    return c


# ---------------------------------------------------------------------------------------------
# Small sizes
# ---------------------------------------------------------------------------------------------

# size -> model family -> the model keys that size sets. A family is `model.name`, and for the
# Swin the method whose Swin it is (MixMIM's windows tile its mask grid; SimMIM's shift). UM-MAE
# sizes are written on the full grid (`_compact_grid` halves them for UM-MAE's pretraining).
SIZES = {
    # `:tiny`: the same code path in seconds per step on a CPU.
    "tiny": {
        "swin/mixmim": dict(img_size=64, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                            window_sizes=(8, 8, 4, 2), decoder_dim=64, decoder_depth=1,
                            decoder_num_heads=2),
        # 3 stages (16x16 -> 8x8 -> 4x4 tokens), each shifting; a 4th stage would double the
        # compile time of the smoke run.
        "swin/simmim": dict(img_size=64, embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4),
                            window_sizes=(4, 4, 2)),
        "vit": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                    decoder_dim=32, decoder_depth=1, decoder_num_heads=2),
        "ummae_swin": dict(img_size=64, unit_size=8, embed_dim=32, depths=(2, 2, 2),
                           num_heads=(1, 2, 4), posmlp_dim=8, window_size=8, decoder_dim=32,
                           decoder_depth=1, decoder_num_heads=2),
        "pvt": dict(img_size=64, unit_size=8, embed_dims=(32, 64, 128), depths=(2, 2, 2),
                    num_heads=(1, 2, 4), mlp_ratios=(4.0, 4.0, 4.0), full_sr_ratios=(4, 2, 1),
                    decoder_dim=32, decoder_depth=1, decoder_num_heads=2),
    },
    # configs/demo.py: 64 px, 3 stages or 4 ViT blocks, a 2-block decoder; minutes on 2 cores.
    "demo": {
        "swin/mixmim": dict(img_size=64, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8),
                            window_sizes=(8, 8, 4), decoder_dim=128, decoder_depth=2,
                            decoder_num_heads=4),
        "swin/simmim": dict(img_size=64, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8),
                            window_sizes=(4, 4, 4)),
        "vit": dict(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                    decoder_dim=128, decoder_depth=2, decoder_num_heads=4),
        "ummae_swin": dict(img_size=64, unit_size=8, embed_dim=64, depths=(2, 2, 2),
                           num_heads=(2, 4, 8), posmlp_dim=16, window_size=8, decoder_dim=128,
                           decoder_depth=2, decoder_num_heads=4),
    },
    # configs/digits.py: 4-px patches on the 32-px digits (an 8x8 token grid); the Swins are
    # 2 stages (8x8 -> 4x4 tokens) of one width.
    "digits": {
        "swin/mixmim": dict(img_size=32, patch_size=4, embed_dim=64, depths=(2, 4),
                            num_heads=(2, 4), window_sizes=(8, 4), decoder_dim=128,
                            decoder_depth=2, decoder_num_heads=4),
        "swin/simmim": dict(img_size=32, embed_dim=64, depths=(2, 4), num_heads=(2, 4),
                            window_sizes=(4, 4)),
        "vit": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                    decoder_dim=128, decoder_depth=2, decoder_num_heads=4),
        "ummae_swin": dict(img_size=32, unit_size=4, embed_dim=64, depths=(2, 4),
                           num_heads=(2, 4), posmlp_dim=16, window_size=8, decoder_dim=128,
                           decoder_depth=2, decoder_num_heads=4),
    },
    # configs/digits.py:toy, the suite's pretrained-vs-random encoder (1 block per stage).
    "toy": {
        "swin/mixmim": dict(img_size=32, patch_size=4, embed_dim=32, depths=(1, 1),
                            num_heads=(2, 4), window_sizes=(8, 4), decoder_dim=32,
                            decoder_depth=1, decoder_num_heads=2),
    },
}


def family(c) -> str:
    """The SIZES key of a config's model."""
    return f"swin/{c.method.name}" if c.model.name == "swin" else c.model.name


def _compact_grid(c) -> bool:
    """UM-MAE pretrains its Swin and PVT on the compact grid of uniform sampling (one kept unit of
    every 2x2 block: half the tokens a side, so half the window, half the sr ratios); its
    fine-tuning and the paper's SimMIM baseline run the full grid."""
    return c.method.name == "ummae" and c.get("task") != "finetune"


def shrink(c, size: str):
    """The recipe `c` at a small `size` (a SIZES key): its model, image size and the method's
    geometry. Everything else (batch, schedule, data) is the caller's."""
    if size not in SIZES:
        raise ConfigError(f"shrink: unknown size {size!r} ({', '.join(SIZES)})")
    sizes = SIZES[size]
    if family(c) not in sizes:
        raise ConfigError(f"shrink: no {size} size of a {family(c)} model "
                          f"({size} sizes: {', '.join(sizes)})")
    m = c.model
    keys = sizes[family(c)]
    unknown = [k for k in keys if k not in m]
    if unknown:
        raise ConfigError(f"model.{unknown[0]}: the {size} {family(c)} size sets a key "
                          f"model {m.name!r} lacks")
    m.update(keys)
    if m.name == "ummae_swin" and _compact_grid(c):
        m.window_size = m.window_size // 2  # the recipe: 16 -> 8
    if m.name == "pvt":  # the recipe: (8, 4, 2, 1) -> (4, 2, 1, 1)
        full = tuple(m.full_sr_ratios)
        m.sr_ratios = tuple(max(r // 2, 1) for r in full) if _compact_grid(c) else full
    if c.method.name == "simmim":
        # SimMIM masks squares of the encoder's final stride (the recipe: 32 = 4 px x 2^3); the
        # UM-MAE paper's baseline masks its units.
        c.method.mask_patch_size = (m.unit_size if "unit_size" in m
                                    else m.patch_size * 2 ** (len(m.depths) - 1))
    if c.method.name == "mixedae" and size == "tiny":
        c.method.num_sources = 2  # the tiny ViT has 16 patches: 8 of each source
    c.data.image_size = m.img_size
    return c


def tiny(c):
    """The `:tiny` variant of any recipe: its model shrunk (`shrink(c, "tiny")`) and 4 steps of
    batch 8 on the embedded photo crops (fine-tuning: on the labelled digits)."""
    shrink(c, "tiny")
    c.batch_size = 8
    schedule(c, steps=4, warmup=0)
    c.log_every = 1
    c.checkpoint_every = 2
    if c.get("task") == "finetune":
        c.num_classes = 10
        c.data.update(source="digits", split="train", shuffle_buffer=512)
        c.evals.eval.update(split="test", batch_size=200, crop_pct=1.0, every_steps=-1,
                            every_epochs=0.0)  # at the end only
    else:
        c.data.update(source="embedded", shuffle_buffer=512)
    return c


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------

# The L and H models shard their big kernels and Adam moments over the `fsdp` mesh axis
# (train/sharding.py's FSDP_RULES, by name; run with --config.mesh.fsdp=N); smaller models fit
# replicated.
FSDP_RULES = (("FSDP_DEFAULT", "fsdp"),)


def sharding_rules(variant: str) -> tuple:
    return FSDP_RULES if variant in ("L", "H") else ()
