r"""UM-MAE pretraining of UM-MAE's PVT-S (dims 64,128,320,512, depths 3,4,6,3, sr ratios
4,2,1,1 on the compact grid), the official recipe of ummae_swin_t.py. Official finetuned
top-1: 79.31.

  mixmae-pretrain --config configs/ummae_pvt_s.py --workdir gs://BUCKET/ummae_pvt_s \
      --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny` (a CPU smoke run). The recipe is shared: see configs/ummae_swin_t.py.
"""

from configs import ummae_swin_t


def get_config(arg=None):
    return ummae_swin_t.get_config(arg, backbone="pvt_s")
