"""Shared building blocks for config files: the model variant table and the default run config.

Every field of a run config is created here, so `--config.key=value` overrides and validation see
one schema. Config files (`configs/<name>.py`) call `base_config()` and change what differs.
"""

import ml_collections

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
            data_dir=None,  # tfds data dir (None: tfds default / TFDS_DATA_DIR)
            manual_dir=None,  # tfds manual download dir (imagenet2012 needs one)
            folder=None,  # image folder (source="folder"): class sub-folders or flat
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
