r"""MixMIM-H pretraining (684.7 M parameters with the decoder): FSDP and rematerialised blocks.

  mixmae-pretrain --config configs/mixmim_h.py --workdir gs://BUCKET/mixmim_h \
      --config.mesh.fsdp=16 --config.compute_dtype=bfloat16 --config.model.remat=full

Sized for 64 x H100 or a TPU v4-128 (global batch 2048). About 6x the cost of B per image; the
official repository publishes no H recipe or checkpoint, so the B recipe is used.
Compiled ahead of time with fsdp=16 in bf16 (README, Where each recipe runs): 6.7 GiB per chip
on a v4-128 with remat=full, 6.6 GiB on a v5p-128 with the recipe's remat=dots: either fits.

Variants: `:tiny` (CPU smoke run).
"""

from configs import mixmim_b  # the recipe; this file changes the width


def get_config(arg=None):
    return mixmim_b.get_config(arg, variant="H")
