r"""MixMIM-L (Swin-L/W14) pretraining: the B recipe at L width, FSDP over the `fsdp` mesh axis.

  mixmae-pretrain --config configs/mixmim_l.py --workdir gs://BUCKET/mixmim_l \
      --config.mesh.fsdp=8 --config.compute_dtype=bfloat16

Sized for 32 x H100 or a TPU v4-64 (global batch 2048); 600 epochs (the official README says L was
pretrained for 600 epochs; L/H recipes beyond that are not published in the official code).
About 2x the cost of B per image. Finetuned top-1 (official): 85.9 at 224.

Variants: `:tiny` (CPU smoke run), `:res=384`.
"""

from configs import mixmim_b  # the recipe; this file changes the width


def get_config(arg=None):
    return mixmim_b.get_config(arg, variant="L")
