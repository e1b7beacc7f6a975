"""UM-MAE (implus/UM-MAE): uniform sampling + secondary masking, so that MAE's token dropping
works on pyramid encoders (UM-MAE's Swin and PVT) and, as the paper's control, on a ViT.

* Uniform sampling: the unit grid (16x16 units of 16 px at 256; 14x14 for ViT-B at 224) is cut
  into 2x2 blocks and each block keeps one random unit (`slot`), so exactly 25% is kept and the
  kept units pack into a half-resolution 2-D grid (`compact_kept_units`), on which the
  pyramid encoder runs unchanged; every token keeps its true coordinates (Swin's position bias)
  or its position embedding (PVT, ViT). The official code draws the slots in the data loader from
  a balanced pool of rows; here an independent uniform slot per block is drawn on device (the
  reference's design note: the difference does not matter).
* Secondary masking: int(K * (1 - vis_mask_ratio)) of the K kept units stay visible (48 of 64,
  36 of 49, as the official code counts) and the others (`sm`) are replaced by a learned token
  inside the encoder: Swin's goes through the stem LayerNorm, PVT's is raw and gets the
  position embedding added, ViT's is the token plus its position embedding. No loss on them.
* Decoder (Swin, PVT): `models.decoder.UnitDecoder`; ViT: MAE's decoder. Loss: norm-pix MSE on
  the removed units only, a plain mean (every image has the same number of them).

`method.decoder_pos_order`: the official Swin and PVT decoders add to the kept latents, which
come in compact-grid order, the position embeddings of the kept units in row-major order, so
most latents get another unit's position ("official", for reproducing published numbers);
"true" (default) gives each latent its own unit's position. The two agree exactly when every
block keeps the same slot. The official ViT path is correct; for ViT both values mean the same.

The plan: `slot` (B, g, g) int32 and `sm` (B, g, g) float32 on the compact grid (1 = kept unit
replaced by the secondary-mask token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixmae_jax.methods import base
from mixmae_jax.methods.mae import MAEModel
from mixmae_jax.methods.masks import random_subset
from mixmae_jax.methods.targets import patch_targets, pixels_of
from mixmae_jax.models import layers as L
from mixmae_jax.models import pvt, ummae_swin
from mixmae_jax.models.decoder import UnitDecoder
from mixmae_jax.models.ummae_swin import token_coords

POS_ORDERS = ("true", "official")

# ---------------------------------------------------------------------------------------------
# Uniform sampling (UM-MAE): one kept mask unit per 2x2 block of units.
# ---------------------------------------------------------------------------------------------
# slot (B, g, g) int in {0, 1, 2, 3} names the kept unit of each block: row di = slot // 2,
# column dj = slot % 2, i.e. unit (2a + di, 2b + dj) of the (2g, 2g) unit grid.


def compact_kept_units(x, slot, unit: int):
    """The kept units of a (B, 2g*unit, 2g*unit, ...) map packed into (B, g*unit, g*unit, ...).

    unit: tokens per unit side. Compact unit (a, b) is unit (2a + di, 2b + dj) of the input: the
    same values the official dilated all-ones convolution sums out of otherwise zeroed blocks,
    here a selection (exact, and its gradient is zero on removed units). x may have a batch of 1
    (a constant such as the coordinate grid), broadcast against slot.
    """
    b, g = slot.shape[0], slot.shape[1]
    rest = x.shape[3:]
    x = x.reshape(x.shape[0], g, 2, unit, g, 2, unit, *rest)
    tail = (1,) * len(rest)
    di = (slot // 2).reshape(b, g, 1, g, 1, 1, *tail)
    dj = (slot % 2).reshape(b, g, 1, g, 1, *tail)
    x = jnp.where(di == 0, x[:, :, 0], x[:, :, 1])  # (B, g, unit, g, 2, unit, ...)
    x = jnp.where(dj == 0, x[:, :, :, :, 0], x[:, :, :, :, 1])  # (B, g, unit, g, unit, ...)
    return x.reshape(b, g * unit, g * unit, *rest)


def removed_units(slot):
    """(B, 2g, 2g) float32 unit mask, 1 = removed (three of every 2x2 block)."""
    b, g = slot.shape[0], slot.shape[1]
    kept = jax.nn.one_hot(slot, 4, dtype=jnp.float32).reshape(b, g, g, 2, 2)
    return 1.0 - kept.transpose(0, 1, 3, 2, 4).reshape(b, 2 * g, 2 * g)


def kept_unit_ids(slot):
    """(B, g*g) row-major ids on the (2g, 2g) unit grid of the kept units, in compact order."""
    b, g = slot.shape[0], slot.shape[1]
    a = jnp.arange(g)
    rows = 2 * a[None, :, None] + slot // 2
    cols = 2 * a[None, None, :] + slot % 2
    return (rows * 2 * g + cols).reshape(b, g * g)


def ids_where(mask, count: int):
    """(B, count) ascending positions of the first `count` ones of a (B, L) 0/1 mask (the
    row-major order of boolean indexing, with a static count)."""
    return jnp.argsort(1.0 - mask, axis=1, stable=True)[:, :count].astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------------------


class PyramidUMModel(nnx.Module):
    """Pretraining model of a pyramid encoder: `encoder` (runs on the compact grid) + `decoder`
    over the unit grid."""

    def __init__(self, encoder, cfg, *, decoder_mlp_ratio: float, dtype=None, rngs: nnx.Rngs):
        self.encoder = encoder
        self.tokens_per_unit = cfg.unit_size // cfg.patch_size
        self.decoder = UnitDecoder(encoder.out_dim, cfg.decoder_dim, cfg.decoder_depth,
                                   cfg.decoder_num_heads, cfg.img_size // cfg.unit_size,
                                   cfg.unit_size**2 * cfg.in_chans, mlp_ratio=decoder_mlp_ratio,
                                   eps=cfg.ln_eps, scan=encoder.scan, dtype=dtype, rngs=rngs)

    def compact_tokens(self, images, plan):
        """Stage-1 tokens of the kept units on the compact grid, secondary-masked ones replaced
        by the encoder's token."""
        u = self.tokens_per_unit
        tokens = compact_kept_units(self.encoder.embed(images), plan["slot"], u)
        if not hasattr(self.encoder, "vis_mask_token"):
            return tokens
        sm = L.upsample_grid(plan["sm"], u)[..., None] > 0
        return jnp.where(sm, self.encoder.secondary_token(), tokens)

    def encode(self, images, plan, rng=None):
        raise NotImplementedError

    def __call__(self, images, plan, pos_ids, masked_ids, rng=None):
        """Predictions (B, M, unit*unit*3) of the removed units `masked_ids`."""
        return self.decoder(self.encode(images, plan, rng), pos_ids, masked_ids)


class UMSwinModel(PyramidUMModel):
    def __init__(self, cfg, *, secondary: bool, dtype=None, rngs: nnx.Rngs):
        enc = ummae_swin.encoder(cfg, compact=True, vis_mask_token=secondary, dtype=dtype,
                                 rngs=rngs)
        # The official Swin decoder's blocks take the encoder's mlp_ratio.
        super().__init__(enc, cfg, decoder_mlp_ratio=cfg.mlp_ratio, dtype=dtype, rngs=rngs)

    def encode(self, images, plan, rng=None):
        enc = self.encoder
        coords = compact_kept_units(jnp.asarray(token_coords(enc.grid, enc.grid)),
                                      plan["slot"], self.tokens_per_unit)
        return enc.encode(self.compact_tokens(images, plan), coords, rng)


class UMPVTModel(PyramidUMModel):
    def __init__(self, cfg, *, secondary: bool, dtype=None, rngs: nnx.Rngs):
        enc = pvt.encoder(cfg, vis_mask_token=secondary, dtype=dtype, rngs=rngs)
        super().__init__(enc, cfg, decoder_mlp_ratio=cfg.decoder_mlp_ratio, dtype=dtype,
                         rngs=rngs)

    def encode(self, images, plan, rng=None):
        """Secondary-masked units carry their true position: the sin-cos table is compacted
        with the primary mask and added after the replacement (official)."""
        pos = compact_kept_units(self.encoder.position_map(), plan["slot"],
                                   self.tokens_per_unit)
        return self.encoder.encode(self.compact_tokens(images, plan) + pos, rng)


class UMViTModel(MAEModel):
    """MAE's ViT model plus `vis_mask_token` (UM-MAE `models_mae.py`)."""

    def __init__(self, cfg, *, secondary: bool, dtype=None, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        if secondary:
            self.vis_mask_token = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (1, 1, cfg.embed_dim)))

    def __call__(self, images, plan, rng=None):
        """(B, L, p*p*3) predictions for every patch; the kept patches in compact order."""
        enc = self.encoder
        ids_keep = plan["ids_keep"]
        kept = jnp.take_along_axis(enc.embed(images), ids_keep[..., None], axis=1)
        if hasattr(self, "vis_mask_token"):
            token = self.vis_mask_token[...] + jnp.take(enc.position_table()[1:], ids_keep,
                                                        axis=0)
            kept = jnp.where(plan["sm"].reshape(kept.shape[:2])[..., None] > 0, token, kept)
        return self.decoder(enc.encode(kept, rng), plan["ids_restore"])


class Method(base.Method):
    """UM-MAE on UM-MAE's Swin (`ummae_swin`), PVT (`pvt`) or a ViT (`vit`)."""

    name = "ummae"
    models = ("ummae_swin", "pvt", "vit")
    mask_arrays = ("mask", "vis_mask")
    mask_help = ("UM-MAE: .npz with `mask` (B, G, G) on the unit grid (16x16 at 256 px, 14x14 "
                 "for ViT-B at 224), 1 = unit removed by uniform sampling, exactly one 0 per 2x2 "
                 "block; and `vis_mask` (B, G, G), 1 = kept unit replaced by secondary masking, "
                 "only where mask is 0, exactly K - int(K * (1 - vis_mask_ratio)) per image (16 "
                 "of 64 kept units at 256, 13 of 49 for ViT-B)")

    # -- geometry -------------------------------------------------------------------------------

    def unit_size(self) -> int:
        m = self.model_cfg
        return m.patch_size if m.name == "vit" else m.unit_size

    def unit_grid(self) -> int:
        """Units per side (the official `token_size`)."""
        return self.model_cfg.img_size // self.unit_size()

    def num_kept(self) -> int:
        return (self.unit_grid() // 2) ** 2

    def num_visible(self) -> int:
        """Kept units that stay visible: official int(K * (1 - vis_mask_ratio))."""
        return int(self.num_kept() * (1.0 - self.cfg.vis_mask_ratio))

    def check_config(self, config, num_devices, check):
        m, meth = config.model, config.method
        check(meth.mask_ratio == 0.75, "method.mask_ratio",
              f"{meth.mask_ratio}: uniform sampling keeps one unit of every 2x2 block, so the "
              "ratio is 0.75 (as the official --mask_regular asserts)")
        check(0.0 <= meth.vis_mask_ratio < 1.0, "method.vis_mask_ratio",
              f"{meth.vis_mask_ratio} must lie in [0, 1)")
        check(meth.decoder_pos_order in POS_ORDERS, "method.decoder_pos_order",
              f"{meth.decoder_pos_order!r} (one of {', '.join(POS_ORDERS)})")
        unit = self.unit_size()
        check(m.img_size % unit == 0 and (m.img_size // unit) % 2 == 0, "model.img_size",
              f"{m.img_size} must be an even number of {unit}-px mask units per side (uniform "
              "sampling cuts the unit grid into 2x2 blocks)")
        check(m.decoder_dim % 4 == 0 and m.decoder_dim % m.decoder_num_heads == 0,
              "model.decoder_dim", f"{m.decoder_dim} must be divisible by 4 and by "
              f"model.decoder_num_heads={m.decoder_num_heads}")
        if m.name == "vit":
            return
        check(unit % m.patch_size == 0, "model.unit_size",
              f"{unit} is not a multiple of model.patch_size={m.patch_size}")
        stride = m.patch_size * 2 ** (len(m.depths) - 1)
        check(stride == 2 * unit, "model.unit_size",
              f"{unit}: the decoder's PixelShuffle(2) turns each final-stage token ({stride} px) "
              f"into 2x2 kept units, so the unit must be {stride // 2} px")
        from mixmae_jax.models import get_model_module

        grid = m.img_size // m.patch_size // 2
        get_model_module(m.name).check_grid(m, grid, "the compact grid of uniform sampling",
                                            check)

    def build_model(self, rngs: nnx.Rngs):
        m, secondary = self.model_cfg, self.cfg.vis_mask_ratio > 0
        cls = {"ummae_swin": UMSwinModel, "pvt": UMPVTModel, "vit": UMViTModel}[m.name]
        return cls(m, secondary=secondary, dtype=self.compute_dtype, rngs=rngs)

    # -- the plan -------------------------------------------------------------------------------

    def make_plan(self, rng, batch_size: int, num_groups: int):
        """Per sample (num_groups plays no part): a uniform slot per 2x2 block, and a uniformly
        random subset of the kept units for secondary masking (argsort of uniform noise)."""
        g = self.unit_grid() // 2
        k_slot, k_sm = jax.random.split(rng)
        slot = jax.random.randint(k_slot, (batch_size, g, g), 0, 4, dtype=jnp.int32)
        visible = random_subset(k_sm, (batch_size, g * g), self.num_visible())
        sm = (~visible).astype(jnp.float32).reshape(batch_size, g, g)
        return {"slot": slot, "sm": sm}

    def unit_ids(self, slot):
        """(removed-unit mask (B, G*G), masked ids (B, M), kept ids in compact order (B, K))."""
        b, n = slot.shape[0], self.unit_grid() ** 2
        mask = removed_units(slot).reshape(b, n)
        return mask, ids_where(mask, n - self.num_kept()), kept_unit_ids(slot)

    def predict(self, model, images, plan, rng=None):
        """(predictions of the removed units (B, M, P), their ids (B, M), unit mask (B, G*G))."""
        mask, masked_ids, kept_ids = self.unit_ids(plan["slot"])
        if self.model_cfg.name == "vit":
            order = jnp.concatenate([kept_ids, masked_ids], axis=1)
            vit_plan = {"ids_keep": kept_ids, "ids_restore": jnp.argsort(order, axis=1),
                        "sm": plan["sm"]}
            pred = model(images, vit_plan, rng)
            pred = jnp.take_along_axis(pred, masked_ids[..., None], axis=1)
        else:
            pos_ids = kept_ids
            if self.cfg.decoder_pos_order == "official":  # kept units in row-major order
                pos_ids = ids_where(1.0 - mask, self.num_kept())
            pred = model(images, plan, pos_ids, masked_ids, rng)
        return pred, masked_ids, mask

    def loss(self, model, batch, plan, num_groups: int, rng=None):
        images = batch["image"]
        pred, masked_ids, _ = self.predict(model, images, plan, rng)
        target = patch_targets(images, self.unit_size(), self.cfg.norm_pix_loss)
        target = jnp.take_along_axis(target, masked_ids[..., None], axis=1)
        return jnp.mean((pred - target) ** 2), {}

    # -- mixmae-visualize -----------------------------------------------------------------------

    def mask_from_file(self, mask, batch_size, path):
        grid, g = self.unit_grid(), self.unit_grid() // 2
        if not isinstance(mask, dict) or set(mask) != {"mask", "vis_mask"}:
            got = sorted(mask) if isinstance(mask, dict) else "one .npy array"
            raise ValueError(f"--mask {path}: expected an .npz with arrays `mask` and `vis_mask`, "
                             f"got {got}")
        arrays = {}
        for key in ("mask", "vis_mask"):
            a = np.asarray(mask[key])
            if a.shape == (grid, grid):
                a = np.broadcast_to(a, (batch_size, grid, grid))
            if a.shape != (batch_size, grid, grid):
                raise ValueError(f"--mask {path}: `{key}` must have shape ({batch_size}, {grid}, "
                                 f"{grid}) or ({grid}, {grid}) on the unit grid, got {a.shape}")
            if not np.isin(a, (0, 1)).all():
                raise ValueError(f"--mask {path}: `{key}` values must be 0 or 1")
            arrays[key] = a.astype(np.int64)
        blocks = arrays["mask"].reshape(batch_size, g, 2, g, 2).transpose(0, 1, 3, 2, 4)
        blocks = blocks.reshape(batch_size, g, g, 4)
        kept = (blocks == 0).sum(axis=-1)
        if (kept != 1).any():
            i, a, b = np.argwhere(kept != 1)[0]
            raise ValueError(f"--mask {path}: `mask` must keep exactly one unit (one 0) per 2x2 "
                             f"block; image {i}, block ({a}, {b}) keeps {kept[i, a, b]}")
        vis = arrays["vis_mask"]
        if (vis * arrays["mask"]).any():
            raise ValueError(f"--mask {path}: `vis_mask` may be 1 only where `mask` is 0 (it "
                             "marks kept units)")
        want = self.num_kept() - self.num_visible()
        counts = vis.reshape(batch_size, -1).sum(axis=1)
        if (counts != want).any():
            raise ValueError(f"--mask {path}: each image must have exactly {want} secondary-masked "
                             f"units in `vis_mask` (vis_mask_ratio {self.cfg.vis_mask_ratio}); got "
                             f"{counts.tolist()}")
        slot = np.argmin(blocks, axis=-1).astype(np.int32)  # the one 0 of each block
        sm = compact_kept_units(jnp.asarray(vis, jnp.float32)[..., None], jnp.asarray(slot), 1)
        return {"slot": jnp.asarray(slot), "sm": sm[..., 0]}

    def panels(self, model, images, plan):
        """original | what the encoder sees (removed units grey, secondary-masked ones dark) |
        the visible units + the predictions of the removed ones."""
        unit, size = self.unit_size(), images.shape[1]
        pred, masked_ids, mask = self.predict(model, images, plan)
        patches = L.patchify(images, unit)
        target = patch_targets(images, unit, self.cfg.norm_pix_loss)
        loss = jnp.mean((pred - jnp.take_along_axis(target, masked_ids[..., None], axis=1)) ** 2)
        full = jnp.zeros_like(patches).at[jnp.arange(patches.shape[0])[:, None], masked_ids].set(
            pred)
        sm_units = self.secondary_units(plan)
        m = mask[..., None]
        seen = patches * (1 - m) * (1 - sm_units[..., None]) - 2.0 * sm_units[..., None]
        filled = patches * (1 - m) + pixels_of(full, patches, self.cfg.norm_pix_loss) * m
        columns = {"original": images,
                   "masked": L.unpatchify(seen, unit, size, size),
                   "reconstruction": L.unpatchify(filled, unit, size, size)}
        return loss, {}, columns

    def secondary_units(self, plan):
        """(B, G*G) 1 on the units replaced by secondary masking (scattered from compact ids)."""
        b = plan["slot"].shape[0]
        kept_ids = kept_unit_ids(plan["slot"])
        sm = plan["sm"].reshape(b, -1)
        return jnp.zeros((b, self.unit_grid() ** 2)).at[jnp.arange(b)[:, None], kept_ids].set(sm)

    # -- evaluation ---------------------------------------------------------------------------

    def features(self, model, images):
        """Whole images on the full grid with the official finetuning geometry (Swin: twice the
        pretraining window, covering the same image area; PVT: `model.full_sr_ratios`): the same
        weights in an encoder built for that grid."""
        if self.model_cfg.name == "vit":
            return model.encoder.features(images)
        return nnx.merge(self.full_grid_graph(), nnx.state(model.encoder)).features(images)

    def full_grid_graph(self):
        m = self.model_cfg.copy_and_resolve_references()
        if m.name == "ummae_swin":
            m.window_size = 2 * m.window_size
        else:
            m.sr_ratios = tuple(m.full_sr_ratios)
        module = {"ummae_swin": ummae_swin, "pvt": pvt}[m.name]
        secondary = self.cfg.vis_mask_ratio > 0
        return nnx.split(nnx.eval_shape(
            lambda: module.encoder(m, vis_mask_token=secondary, rngs=L.InitKeys(0))))[0]
