r"""MAE ViT-H/14 pretraining: the ViT-B recipe at H size (PRETRAIN.md uses the same values for
ViT-L and ViT-H), FSDP over the `fsdp` mesh axis.

  mixmae-pretrain --config configs/mae_vit_h.py --workdir gs://BUCKET/mae_vit_h \
      --config.mesh.fsdp=8 --config.compute_dtype=bfloat16

Sized for 64 GPUs or a TPU v4-128 (global batch 4096; on its 4x4x4 torus mesh.fsdp=16: 8 spans
no whole torus axes); 800 epochs. Finetuned top-1 after 1600
epochs (official): 86.9 (87.8 at 448).

Variants: `:tiny` (CPU smoke run).
"""

from configs import mae_vit_b  # the recipe; this file changes the size


def get_config(arg=None):
    return mae_vit_b.get_config(arg, variant="H")
