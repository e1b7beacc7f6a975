r"""MixedAE ViT-B/16 pretraining (Chen et al., CVPR 2023; no official code): MAE's recipe with
image mixing and homologous recognition.

  mixmae-pretrain --config configs/mixedae_vit_b.py --workdir gs://BUCKET/mixedae_vit_b \
      --config.data.manual_dir=/path/to/imagenet

MAE's ViT-B recipe (configs/mae_vit_b.py: batch 4096, AdamW (0.9, 0.95), blr 1.5e-4, wd 0.05,
40 warmup epochs, norm-pix loss, 8-block decoder) for 800 epochs; groups of 4 images become one
mixed sample (49 patches of each at their true positions, the encoder's cost per image equals
MAE's at mask ratio 0.75). What is the paper's and what is this project's choice (top-k in every
layer, k = 49, contrastive temperature and weight, no projection head, no segment embeddings) is
listed in the README; each is a `--config.method.*` value.

Variants: `:tiny` (a CPU smoke run), `:naive` (the paper's naive-mixing baseline: full attention
and no contrastive loss).
"""

import ml_collections

from configs import common, mae_vit_b
from mixmae_jax.config import ConfigError, parse_arg


def get_config(arg=None, variant="B"):
    opts = parse_arg(arg, tiny=False, naive=False)
    if variant not in ("B", "L"):
        raise ConfigError(f"MixedAE variant {variant!r} (B or L)")
    c = mae_vit_b.get_config(variant=variant)
    c.method = ml_collections.ConfigDict(dict(
        name="mixedae",
        num_sources=4,  # images per mixed sample: 1/4 of the patches of each
        attention="topk",  # topk | full | oracle, or a comma-separated list, one per layer
        topk=0,  # keys each query keeps; 0: N / num_sources (49 for ViT-B/16 at 224)
        contrast_weight=0.1,  # lambda of the homologous contrastive loss (paper's value unknown)
        contrast_temperature=0.2,  # tau (paper's value unknown)
        contrast_projector=0,  # width of an MLP projection head; 0: none
        contrast_across_samples=False,  # negatives from the other mixed samples too
        segment_embedding="none",  # none | decoder (mask tokens) | encoder (leakage ablation)
        norm_pix_loss=True,
    ))
    if opts["naive"]:
        c.method.update(attention="full", contrast_weight=0.0)
    return common.tiny(c) if opts["tiny"] else c
