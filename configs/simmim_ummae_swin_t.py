r"""The SimMIM baseline of the UM-MAE paper on UM-MAE's Swin-T (models_simmim_swin.py): the whole
256-px image at full resolution (window 16, as finetuning), a random 75% of the 16-px units
replaced by the mask token, Linear + PixelShuffle(2) decoder, L1 on their raw pixels; the
UM-MAE recipe otherwise (official: per-GPU batch 64 x 8 accumulation steps for memory).
Official finetuned top-1: 82.20.

  mixmae-pretrain --config configs/simmim_ummae_swin_t.py \
      --workdir gs://BUCKET/simmim_ummae_swin_t \
      --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny` (a CPU smoke run). The recipe is shared: see configs/ummae_swin_t.py.
"""

from configs import ummae_swin_t


def get_config(arg=None):
    return ummae_swin_t.get_config(arg, backbone="swin_t", method="simmim")
