"""Layer-wise learning-rate decay of the official fine-tuning recipes, on the official names.

Each parameter gets a layer id from its name in the method's official fine-tuning state_dict
(the layout's rename table), then lr scale = decay ** (num_layers - id). Two rules exist:

* "blocks" (MAE `util/lr_decay.py`, which UM-MAE and MixedAE reuse): `cls_token`, `pos_embed`,
  `patch_embed.*` -> 0; `blocks.i.*` -> i + 1; everything else (`fc_norm`, `head`, a final
  `norm`) -> num_layers = len(blocks) + 1, so the head trains at the full lr. UM-MAE's Swin and
  PVT keep their patch merging inside the first block of each stage, so it takes that id.
* "mixmim" (MixMIM `util/lr_decay.py`, a quirk kept on purpose): num_layers = sum(depths) + 1;
  `patch_embed.*`, `absolute_pos_embed` -> 0; `layers.s.blocks.j.*` -> sum(depths[:s]) + j + 1;
  `layers.s.downsample.*` -> the id of the first block of stage s + 1; everything else (`norm`,
  `head`) -> num_layers - 1, the last block's id: no parameter gets scale 1.0.
* "simmim" (SimMIM `optimizer.py::get_swin_layer`): num_layers = sum(depths) + 1; `mask_token`,
  `patch_embed.*` -> 0; `layers.s.blocks.j.*` -> sum(depths[:s]) + j + 1;
  `layers.s.downsample.*` -> sum(depths[:s + 1]), the id of the last block of its own stage;
  everything else (`absolute_pos_embed` included, `norm`, `head`) -> num_layers, scale 1.0.

PyTorch applies AdamW's weight decay as lr_group * wd, so the scale multiplies the whole update
(`optim.make_optimizer`).
"""

from __future__ import annotations

import re

import jax

from mixmae_jax.interop import keymap as K
from mixmae_jax.models.paths import path_name

RULES = ("blocks", "mixmim", "simmim")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_STAGE_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_STEM = ("patch_embed.", "pos_embed", "cls_token", "absolute_pos_embed")


def layer_ids(names, rule: str) -> tuple[dict[str, int], int]:
    """({official name: layer id}, num_layers) for the names of one fine-tuning state_dict."""
    if rule == "blocks":
        depth = 1 + max((int(m.group(1)) for n in names if (m := _BLOCK.match(n))), default=-1)
        num_layers = depth + 1

        def layer(name):
            if name.startswith(_STEM):
                return 0
            m = _BLOCK.match(name)
            return int(m.group(1)) + 1 if m else num_layers
    elif rule in ("mixmim", "simmim"):
        depths: dict[int, int] = {}
        for n in names:
            if m := _STAGE_BLOCK.match(n):
                s, j = int(m.group(1)), int(m.group(2))
                depths[s] = max(depths.get(s, 0), j + 1)
        before = [sum(depths.get(t, 0) for t in range(s)) for s in range(len(depths) + 1)]
        num_layers = sum(depths.values()) + 1
        simmim = rule == "simmim"

        def layer(name):
            if name.startswith(("mask_token", "patch_embed.") if simmim else _STEM):
                return 0
            if m := _STAGE_BLOCK.match(name):
                return before[int(m.group(1))] + int(m.group(2)) + 1
            if m := _DOWNSAMPLE.match(name):  # SimMIM: its own stage's end; MixMIM: the next's
                return before[int(m.group(1)) + 1] + (0 if simmim else 1)
            return num_layers if simmim else num_layers - 1
    else:
        raise ValueError(f"optim.layer_decay_rule: unknown rule {rule!r} ({', '.join(RULES)})")
    return {n: layer(n) for n in names}, num_layers


def lr_scales(params, layout: K.Layout, rule: str, decay: float):
    """A tree like `params` of python floats: decay ** (num_layers - layer id) per parameter,
    found through its official fine-tuning name."""
    flat = K.flatten(params)
    names = {path: layout.torch_name(path, "finetune") for path in flat}
    ids, num_layers = layer_ids(list(names.values()), rule)
    scales = {path: float(decay) ** (num_layers - ids[name]) for path, name in names.items()}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: scales[path_name(path)], params)
