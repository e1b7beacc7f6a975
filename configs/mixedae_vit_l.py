r"""MixedAE ViT-L/16 pretraining: configs/mixedae_vit_b.py's recipe on MAE's ViT-L/16 (FSDP rules
for the `fsdp` mesh axis, as mae_vit_l.py).

  mixmae-pretrain --config configs/mixedae_vit_l.py --workdir gs://BUCKET/mixedae_vit_l \
      --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny`, `:naive` (as mixedae_vit_b.py).
"""

from configs import mixedae_vit_b


def get_config(arg=None):
    return mixedae_vit_b.get_config(arg, variant="L")
