r"""MixMIM-B fine-tuning on ImageNet-1k, the official recipe (Sense-X/MixMIM, exp/base_600ep).

  mixmae-finetune --config configs/finetune_mixmim_b.py --workdir gs://BUCKET/mixmim_b_ft \
      --init gs://BUCKET/mixmim_b --config.data.manual_dir=/path/to/imagenet

Global batch 1024 (8 GPUs x 128), 100 epochs with 5 of warmup (about 125k steps), layer-wise
lr decay 0.7 with MixMIM's rule (the head shares the last block's factor), drop path 0.1.
Official top-1 after 600 pretraining epochs: 85.1.

This file holds the recipe the fine-tuning configs share (finetune_mae_vit_b, finetune_ummae_*
call `get_config` with their pretraining recipe and values).
Variants: `:tiny` (a CPU smoke run on the embedded digits, same code path), `:res=384` (the
384 fine-tuning of a 224 pretraining: windows 16/16/24/12, the resized APE, eval crop 1.0).
Values: shared/reference/mixmim.md §5.2-5.3; ummae_mixedae.md §1.9, §1.11; MAE FINETUNE.md.
"""

from mixmae_jax.config import ConfigError, finetune_defaults, parse_arg, sibling


def get_config(arg=None, pretrain="mixmim_b.py", layer_decay=0.7, drop_path=0.1,
               crop_pct=0.875, no_decay=()):
    opts = parse_arg(arg, tiny=False, res=224)
    if opts["res"] != 224 and (pretrain != "mixmim_b.py" or opts["res"] != 384):
        raise ConfigError(f"config arg: res={opts['res']} (MixMIM fine-tunes at 224 or 384)")
    if opts["tiny"]:
        c = sibling(__file__, pretrain).get_config("tiny")
    elif opts["res"] == 384:
        # models_mixmim_ft mixmim_base_384: windows 16/16/24/12; the APE is the 224 checkpoint's
        # 56x56 sin-cos table bicubic-resized to 96x96 (main_finetune.py interpolate_pos_embed)
        c = sibling(__file__, pretrain).get_config("res=384")
        c.model.ape_grid = 224 // c.model.patch_size
        crop_pct = 1.0  # evaluation at 384: resize 384, centre crop (reference §5.2)
    else:
        c = sibling(__file__, pretrain).get_config()
    finetune_defaults(c)
    c.model.drop_path_rate = drop_path  # linear over the blocks
    c.num_classes = 1000
    c.data.update(source="tfds", name="imagenet2012", split="train", eval_split="validation",
                  crop_scale=(0.08, 1.0),  # timm create_transform: RandomResizedCrop(0.08, 1)
                  crop_pct=crop_pct)  # eval: resize size / crop_pct, centre crop, bicubic
    c.augment.update(randaug="rand-m9-mstd0.5-inc1",  # timm: 2 ops, m ~ N(9, 0.5), increasing
                     reprob=0.25, mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5,
                     smoothing=0.1)
    c.batch_size = 1024  # 8 GPUs x 128
    c.eval_batch_size = 1024
    c.epochs = 100
    c.optim.update(dict(
        base_lr=5e-4,  # blr; peak lr = 5e-4 * 1024 / 256 = 2e-3
        lr_batch_divisor=256,
        warmup_epochs=5,
        warmup_lr=0.0,
        min_lr=1e-6,
        schedule="cosine",
        weight_decay=0.05,  # every >= 2-D tensor (no_weight_decay() is empty for MixMIM)
        no_decay=no_decay,
        b1=0.9, b2=0.999, eps=1e-8,  # torch AdamW defaults
        clip_grad_norm=0.0,
        layer_decay=layer_decay,
    ))
    c.checkpoint_every = 5000
    if opts["tiny"]:
        c.model.drop_path_rate = 0.1
        c.num_classes = 10
        c.data.update(source="digits", split="train", eval_split="test", shuffle_buffer=512,
                      crop_pct=1.0)
        c.batch_size = 8
        c.eval_batch_size = 200
        c.total_steps = 4
        c.optim.warmup_epochs = 0
        c.eval_every_epochs = 0
        c.log_every = 1
        c.checkpoint_every = 2
    return c
