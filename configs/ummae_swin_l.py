r"""UM-MAE pretraining of UM-MAE's Swin-L (embed 192, depths 2,2,18,2, bias MLP 64 wide, an 8-block
decoder), the official recipe: 800 epochs with 40 of warmup, otherwise as ummae_swin_t.py.
Official finetuned top-1: 85.2.

  mixmae-pretrain --config configs/ummae_swin_l.py --workdir gs://BUCKET/ummae_swin_l \
      --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny` (a CPU smoke run). The recipe is shared: see configs/ummae_swin_t.py.
"""

from configs import ummae_swin_t


def get_config(arg=None):
    return ummae_swin_t.get_config(arg, backbone="swin_l")
