r"""UM-MAE pretraining of ViT-B/16 (the paper's control: uniform sampling costs a ViT nothing), the
official recipe of ummae_swin_t.py at 224 px: a 14x14 unit grid (one kept of every 2x2 block, 49
kept, 13 of them secondary-masked) and a 2-block decoder. Official finetuned top-1: 82.88.

  mixmae-pretrain --config configs/ummae_vit_b.py --workdir gs://BUCKET/ummae_vit_b \
      --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny` (a CPU smoke run). The recipe is shared: see configs/ummae_swin_t.py.
"""

from configs import ummae_swin_t


def get_config(arg=None):
    return ummae_swin_t.get_config(arg, backbone="vit_b")
