r"""SimMIM Swin-B fine-tuning on ImageNet-1k, the official 800-epoch recipe (microsoft/SimMIM,
configs/swin_base__800ep/simmim_finetune__swin_base__img224_window7__800ep.yaml over config.py):
224 px with window 7 (pretrained at 192 px, window 6: the bias tables are resized on import),
layer decay 0.8 with SimMIM's Swin rule (a downsample layer takes its own stage's last block, the
head and final norm train at the full lr), drop path 0.1, 100 epochs with 20 of warmup, batch
2048, timm's cosine schedule, gradient clipping 5.0. Official top-1: 84.0.

  mixmae-finetune --config configs/finetune_simmim_swin_b.py --workdir gs://BUCKET/simmim_ft \
      --init gs://BUCKET/simmim_swin_b --config.data.manual_dir=/path/to/imagenet

Deviation, small: timm's scheduler runs one schedule per layer group, from the same warmup_lr to
the group's scaled peak and down to the same min_lr; here the layer scale multiplies the whole
schedule, so a group's start and end lr are scaled too (a difference of at most
(1 - scale) * 1e-6, against a peak of 5e-3).

Variants: `:tiny`. The recipe is the one MixMIM, MAE and UM-MAE share (configs/common.py
`finetune`) with SimMIM's own values below.
"""

from configs import common, simmim_swin_b
from mixmae_jax.config import parse_arg


def get_config(arg=None):
    opts = parse_arg(arg, tiny=False)
    # optimizer.py: no decay on 1-D tensors and on the classifier's no_weight_decay():
    # absolute_pos_embed (absent: no APE) and the keyword relative_position_bias_table.
    c = common.finetune(simmim_swin_b.get_config(), layer_decay=0.8, crop_pct=0.875,
                        no_decay=(r"absolute_pos_embed", r"relative_position_bias_table"))
    c.model.update(img_size=224, window_sizes=(7,) * 4)  # yaml IMG_SIZE, WINDOW_SIZE
    c.data.image_size = 224
    c.batch_size = 2048  # README: 16 GPUs x --batch-size 128
    common.schedule(c, epochs=100, warmup=20)  # yaml TRAIN.EPOCHS, WARMUP_EPOCHS
    # main_finetune.py scales BASE_LR, WARMUP_LR and MIN_LR by batch / 512; optim scales base_lr
    # only, so warmup_lr and min_lr are already scaled for batch 2048 (x4).
    c.optim.update(dict(
        base_lr=1.25e-3,  # yaml; peak lr = 1.25e-3 * 2048 / 512 = 5e-3
        lr_batch_divisor=512,
        warmup_lr=2.5e-7 * 2048 / 512,  # yaml WARMUP_LR
        min_lr=2.5e-7 * 2048 / 512,  # yaml MIN_LR
        schedule="timm_cosine",  # lr_scheduler.py CosineLRScheduler(t_initial=all steps)
        clip_grad_norm=5.0,  # config.py TRAIN.CLIP_GRAD
    ))
    return common.tiny(c) if opts["tiny"] else c
