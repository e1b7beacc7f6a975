r"""SimMIM Swin-L (192 px, window 12) pretraining: the Swin-B recipe at L width and window 12.

  mixmae-pretrain --config configs/simmim_swin_l.py --workdir gs://BUCKET/simmim_swin_l \
      --config.data.manual_dir=/path/to/imagenet --config.compute_dtype=bfloat16 \
      --config.mesh.fsdp=8

Sized for 32 x H100 or a TPU v4-64 (global batch 2048); 800 epochs of ImageNet-1k (about 500k
steps). About 2.3x the FLOPs of Swin-B per image (158 GFLOP forward and backward, XLA's count),
so about 2,200 img/s per H100 at 35% MFU in bf16, ~4.5 h on 32 H100s (estimate, not measured).
Finetuned top-1 (official README, 224 px, window 14): 85.4.

Window 12 on the 192-px maps (48, 24, 12, 6 tokens): stages 0-1 shift, stages 2-3 are one window
(the official block clamps the window to the map and does not shift).
Variants: `:tiny` (the same CPU smoke model as simmim_swin_b.py:tiny).
Values: microsoft/SimMIM @ d3e29bc, configs/swin_large__800ep/simmim_pretrain__swin_large__img192_
window12__800ep.yaml: identical to the Swin-B yaml but EMBED_DIM 192, NUM_HEADS 6/12/24/48,
WINDOW_SIZE 12.
"""

from configs import simmim_swin_b  # the recipe; this file changes the size


def get_config(arg=None):
    return simmim_swin_b.get_config(arg, variant="L")
