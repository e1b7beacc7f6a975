r"""The SimMIM baseline of the UM-MAE paper on UM-MAE's PVT-S (models_simmim_pvt.py): the whole
256-px image at full resolution (sr ratios 8,4,2,1, as finetuning), a random 75% of the 16-px
units replaced by the mask token, Linear + PixelShuffle(2) decoder, L1 on their raw pixels; the
UM-MAE recipe otherwise. Official finetuned top-1: 79.28.

  mixmae-pretrain --config configs/simmim_ummae_pvt_s.py --workdir gs://BUCKET/simmim_ummae_pvt_s \
      --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny` (a CPU smoke run). The recipe is shared: see configs/ummae_swin_t.py.
"""

from configs import ummae_swin_t


def get_config(arg=None):
    return ummae_swin_t.get_config(arg, backbone="pvt_s", method="simmim")
