r"""SimMIM Swin-B (192 px, window 6) pretraining, the official 800-epoch recipe.

  mixmae-pretrain --config configs/simmim_swin_b.py --workdir gs://BUCKET/simmim_swin_b \
      --config.data.manual_dir=/path/to/imagenet --config.compute_dtype=bfloat16

Sized for 16 x A100/H100 (global batch 2048 = 16 x 128, the official DGX-2 run) or a TPU v4-32;
800 epochs of ImageNet-1k (about 500k steps). Swin-B at 192 px costs 69 GFLOP per image for
forward and backward (XLA's count), so expect about 5,000 img/s per H100 in bf16 at 35% MFU, i.e.
~7 h on 8 H100s (estimate from the FLOP count, not measured). Finetuned top-1 (official README,
224 px, window 7): 84.0.

Variants: `:tiny` (a CPU smoke run of a few steps on the embedded data at 64 px, 3 stages, 16-px
mask squares, same code path).
Values: microsoft/SimMIM @ d3e29bc, configs/swin_base__800ep/simmim_pretrain__swin_base__img192_
window6__800ep.yaml ("yaml") over the config.py defaults ("config.py"); main_simmim.py,
optimizer.py, lr_scheduler.py, data/data_simmim.py, models/simmim.py.
"""

from configs import common
from mixmae_jax.config import defaults, parse_arg
from mixmae_jax.models import swin

WINDOW = {"B": 6, "L": 12}  # yaml MODEL.SWIN.WINDOW_SIZE (swin_base 6, swin_large 12)


def get_config(arg=None, variant="B"):
    opts = parse_arg(arg, tiny=False)
    c = defaults()
    # Swin (yaml EMBED_DIM/DEPTHS/NUM_HEADS = swin.VARIANTS), 4x4 patches (config.py PATCH_SIZE),
    # one window for all stages, shifted odd blocks, no APE (config.py APE False), patch norm.
    c.model = swin.model_config(variant, 192, window_sizes=(WINDOW[variant],) * 4, ape="none",
                                shift_windows=True)
    c.model.drop_path_rate = 0.0  # yaml DROP_PATH_RATE
    c.method.update(dict(
        name="simmim",
        mask_patch_size=32,  # yaml DATA.MASK_PATCH_SIZE: a 6x6 grid of squares at 192 px
        mask_ratio=0.6,  # yaml DATA.MASK_RATIO: ceil(36 * 0.6) = 22 squares masked per image
    ))
    # yaml DATA.IMG_SIZE 192; data_simmim.py RandomResizedCrop(192, scale=(0.67, 1.),
    # ratio=(3/4, 4/3)) + RandomHorizontalFlip. The official crop resizes BILINEAR (torchvision's
    # default; config.py DATA.INTERPOLATION is not used there); this pipeline resizes bicubic.
    c.data.update(image_size=192, crop_scale=(0.67, 1.0))
    c.batch_size = 2048  # README: 16 GPUs x --batch-size 128
    common.schedule(c, epochs=800, warmup=10)  # yaml TRAIN.EPOCHS, WARMUP_EPOCHS
    c.optim.update(dict(
        base_lr=1e-4,  # yaml BASE_LR; peak lr = 1e-4 * 2048 / 512 = 4e-4 (main_simmim.py)
        lr_batch_divisor=512,  # main_simmim.py: lr * DATA.BATCH_SIZE * world_size / 512
        # main_simmim.py scales WARMUP_LR and MIN_LR by batch / 512 too; optim scales base_lr
        # only, so these are already scaled for batch 2048 (x4): change them with the batch.
        warmup_lr=5e-7 * 2048 / 512,  # yaml WARMUP_LR 5e-7 -> 2e-6
        min_lr=5e-6 * 2048 / 512,  # config.py MIN_LR 5e-6 -> 2e-5 (unused by multistep)
        # lr_scheduler.py MultiStepLRScheduler(milestones=[700 epochs], gamma=0.1), per step.
        # The official lr lags ours by one update (timm step_update(t) runs after update t and
        # sets the lr of update t + 1); ignored: one step of a 6,250-step warmup.
        schedule="multistep",  # yaml LR_SCHEDULER.NAME
        decay_epochs=(700,),  # yaml LR_SCHEDULER.MULTISTEPS
        decay_rate=0.1,  # yaml LR_SCHEDULER.GAMMA
        weight_decay=0.05,  # yaml WEIGHT_DECAY
        # optimizer.py: no decay on 1-D params, `.bias` (all 1-D here) and no_weight_decay():
        # encoder.mask_token (encoder.absolute_pos_embed does not exist). Its keyword
        # "encoder.relative_position_bias_table" never matches a parameter name, so the bias
        # tables ARE decayed.
        no_decay=(r"(^|/)encoder/mask_token$",),
        b1=0.9, b2=0.999, eps=1e-8,  # config.py OPTIMIZER.BETAS (0.9, 0.999), EPS 1e-8
        clip_grad_norm=5.0,  # config.py TRAIN.CLIP_GRAD
    ))
    c.sharding_rules = common.sharding_rules(c.model.variant)
    return common.tiny(c) if opts["tiny"] else c
