r"""MixMIM-B (Swin-B/W14) pretraining, the official recipe.

  mixmae-pretrain --config configs/mixmim_b.py --workdir gs://BUCKET/mixmim_b \
      --config.data.manual_dir=/path/to/imagenet

Sized for 16 x A100/H100 (global batch 2048 = 16 x 128, as the paper) or a TPU v4-32; 600 epochs
of ImageNet-1k (about 375k steps). Expect about 3,000 img/s per H100 in bf16 at 35% MFU, i.e.
~9 h on 8 H100s (estimate, see README). Finetuned top-1 after 600 epochs (official): 85.1.

Variants: `:tiny` (a CPU smoke run of a few steps on the embedded data, same code path),
`:res=384` (the 384 finetune geometry, windows 16/16/24/12, for conversion).
"""

from mixmae_jax.config import sized_config


def get_config(arg=None):
    return sized_config("B", arg)
