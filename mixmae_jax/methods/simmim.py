"""SimMIM (microsoft/SimMIM, `models/simmim.py`): a Swin encodes the whole image with random
32-px squares replaced by a learned mask token; one 1x1 convolution and a pixel shuffle predict
the pixels back; the loss is the L1 error over the masked pixels.

The mask is drawn per sample on the mask-patch grid (6x6 at 192 px), exactly ceil(36 * 0.6) = 22
squares, as the official `MaskGenerator` does on the host (`np.random.permutation`); here it is
drawn on device from the step's key (argsort of uniform noise, the same distribution). It is
upsampled to the token grid (x8: the mask token replaces the patch embeddings there) and to the
pixel grid (x32: the loss).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixmae_jax.methods import base
from mixmae_jax.methods.masks import random_subset
from mixmae_jax.models import get_model_module, swin
from mixmae_jax.models import layers as L

LOSS_EPS = 1e-5  # official: sum(|x - x_rec| * m) / (sum(m) + 1e-5) / in_chans


def swin_init_pass(module: nnx.Module, rngs: nnx.Rngs) -> None:
    """The official Swin init pass (`SwinTransformer._init_weights`): trunc-normal(.02) on every
    Linear weight (timm bounds +-2), zero biases; LayerNorms are already 1 / 0, the conv stem
    keeps torch's default init, the bias tables and the mask token their trunc-normal(.02)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Linear):
            node.kernel[...] = L.table_init(rngs.params(), node.kernel[...].shape, jnp.float32)
            if node.bias is not None:
                node.bias[...] = jnp.zeros_like(node.bias[...])


def masked_tokens(encoder, tokens, token_mask):
    """Patch embeddings where token_mask (B, G, G) is 1 replaced by the encoder's mask token
    (the official `x * (1 - w) + mask_token * w`)."""
    return L.blend(tokens.astype(jnp.float32), encoder.mask_token[...].reshape(-1), token_mask)


class SimMIMModel(nnx.Module):
    """Pretraining model: `encoder` (official `encoder.*`, with `mask_token`) and `decoder`
    (official `decoder.0`: Conv2d(C_last, stride**2 * 3, 1), then PixelShuffle(stride))."""

    def __init__(self, cfg, *, dtype=None, rngs: nnx.Rngs):
        self.encoder = swin.encoder(cfg, mask_token=True, dtype=dtype, rngs=rngs)
        swin_init_pass(self.encoder, rngs)
        enc = self.encoder
        self.decoder = nnx.Conv(enc.out_dim, enc.stride**2 * cfg.in_chans, (1, 1),
                                padding="VALID", dtype=dtype, param_dtype=jnp.float32,
                                kernel_init=L.conv_kernel_init,
                                bias_init=L.conv_bias_init(enc.out_dim), rngs=rngs)

    def encode_masked(self, images, token_mask, rng=None):
        """(B, L_final, C_last) after the final norm, from `masked_tokens`."""
        enc = self.encoder
        return enc.encode(masked_tokens(enc, enc.embed(images), token_mask), rng=rng)

    def decode(self, z):
        """(B, L_final, C_last) -> x_rec (B, H, W, 3): 1x1 conv, pixel shuffle by the stride."""
        b, n, c = z.shape
        side = int(round(n**0.5))
        y = self.decoder(z.reshape(b, side, side, c)).astype(jnp.float32)
        return L.pixel_shuffle(y, self.encoder.stride)

    def __call__(self, images, token_mask, rng=None):
        return self.decode(self.encode_masked(images, token_mask, rng))


class UnitSimMIMModel(nnx.Module):
    """The UM-MAE paper's SimMIM baselines (`models_simmim_swin.py`, `models_simmim_pvt.py`):
    UM-MAE's Swin or PVT on the full grid with `mask_token` (not normalised), `decoder_pred`
    Linear(C_last, 4 * unit**2 * 3) then PixelShuffle(2): each final-stage token predicts the
    2x2 units it covers, unit*unit*3 pixels each."""

    def __init__(self, cfg, *, dtype=None, rngs: nnx.Rngs):
        self.encoder = get_model_module(cfg.name).encoder(cfg, mask_token=True, dtype=dtype,
                                                          rngs=rngs)
        self.unit = cfg.unit_size
        self.decoder_pred = L.dense(self.encoder.out_dim, 4 * self.unit**2 * cfg.in_chans,
                                    dtype=dtype, rngs=rngs)

    def __call__(self, images, token_mask, rng=None):
        enc = self.encoder
        z = enc.encode_full(masked_tokens(enc, enc.embed(images), token_mask), rng)
        b, n2, _ = z.shape
        n = int(round(n2**0.5))
        y = self.decoder_pred(z).astype(jnp.float32).reshape(b, n, n, -1)
        units = L.pixel_shuffle(y, 2).reshape(b, 4 * n2, -1)
        return L.unpatchify(units, self.unit, images.shape[1], images.shape[2])


def masked_l1_loss(images, x_rec, pixel_mask):
    """Official loss: sum(|x - x_rec| * m) / (sum(m) + 1e-5) / in_chans, m (B, H, W) the
    one-channel pixel mask (so the denominator counts pixels, not pixel-channels)."""
    m = pixel_mask.astype(jnp.float32)
    err = jnp.abs(images.astype(jnp.float32) - x_rec) * m[..., None]
    return jnp.sum(err) / (jnp.sum(m) + LOSS_EPS) / images.shape[-1]


class Method(base.Method):
    """SimMIM on the official Swin (`config.model.name = "swin"`, shifted windows, no APE), or on
    UM-MAE's Swin / PVT (the UM-MAE paper's baselines, `UnitSimMIMModel`)."""

    name = "simmim"
    # The official Swin; UM-MAE's Swin and PVT for the UM-MAE paper's baselines.
    models = ("swin", "ummae_swin", "pvt")
    mask_help = ("SimMIM: .npy (B, g, g) or (g, g) 0/1 on the mask-patch grid (g = img_size / "
                 "method.mask_patch_size: 6x6 at 192 px with 32-px squares), 1 = masked, exactly "
                 "ceil(g*g * mask_ratio) ones per image (22 of 36 at 0.6), as the official "
                 "MaskGenerator draws")

    def check_config(self, config, num_devices, check):
        m, meth = config.model, config.method
        if m.name == "swin":
            check(m.shift_windows, "model.shift_windows",
                  "SimMIM's Swin shifts the windows of every odd block (official)")
            check(m.ape == "none", "model.ape", f"{m.ape!r}: the official SimMIM Swin has no "
                  "absolute position embedding ('none')")
        else:
            stride = m.patch_size * 2 ** (len(m.depths) - 1)
            check(stride == 2 * m.unit_size, "model.unit_size",
                  f"{m.unit_size}: the decoder's PixelShuffle(2) turns each final-stage token "
                  f"({stride} px) into 2x2 units, so the unit must be {stride // 2} px")
            get_model_module(m.name).check_grid(m, m.img_size // m.patch_size, "the token grid",
                                                check)
        check(m.in_chans == 3, "model.in_chans",
              f"{m.in_chans}: the official decoder predicts 3 channels")
        mp, p = meth.mask_patch_size, m.patch_size
        check(mp > 0 and mp % p == 0, "method.mask_patch_size",
              f"{mp} is not a multiple of model.patch_size={p} (the mask covers whole tokens)")
        check(m.img_size % mp == 0, "method.mask_patch_size",
              f"{mp}-px squares do not tile model.img_size={m.img_size}")
        r = meth.mask_ratio
        check(0.0 < r < 1.0, "method.mask_ratio", f"{r} must lie inside (0, 1)")
        stride = p * 2 ** (len(m.depths) - 1)
        check(m.img_size % stride == 0, "model.img_size",
              f"{m.img_size} is not a multiple of the encoder stride {stride}, the decoder's "
              "pixel-shuffle factor")

    @property
    def layer_decay_rule(self):
        """SimMIM's Swin fine-tunes with its own rule (microsoft/SimMIM `get_swin_layer`); UM-MAE's
        baselines fine-tune with UM-MAE's script ("blocks")."""
        return "simmim" if self.model_cfg.name == "swin" else "blocks"

    def build_classifier(self, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
        """The official Swin classifier runs its init pass over every Linear, the head included
        (trunc-normal .02, never re-drawn after loading, unlike MixMIM's and MAE's 2e-5)."""
        classifier = super().build_classifier(num_classes, rngs)
        if self.model_cfg.name == "swin":
            swin_init_pass(classifier, rngs)
        return classifier

    def build_model(self, rngs: nnx.Rngs):
        cls = SimMIMModel if self.model_cfg.name == "swin" else UnitSimMIMModel
        return cls(self.model_cfg, dtype=self.compute_dtype, rngs=rngs)

    # -- the mask -------------------------------------------------------------------------------

    def mask_grid(self) -> int:
        """Side of the mask-patch grid (official `rand_size`)."""
        return self.model_cfg.img_size // self.cfg.mask_patch_size

    def num_masked(self) -> int:
        """Official `int(np.ceil(token_count * mask_ratio))` (the same float arithmetic)."""
        return int(np.ceil(self.mask_grid() ** 2 * self.cfg.mask_ratio))

    def make_plan(self, rng, batch_size: int, num_groups: int):
        """Per-sample masks (num_groups plays no part): (B, g, g) float32, exactly
        `num_masked()` ones per sample, a uniformly random subset (argsort of uniform noise)."""
        g = self.mask_grid()
        mask = random_subset(rng, (batch_size, g * g), self.num_masked()).astype(jnp.float32)
        return {"mask": mask.reshape(batch_size, g, g)}

    def upsampled(self, mask, model: SimMIMModel):
        """(token mask (B, G, G), pixel mask (B, H, W)) from the mask-patch grid mask."""
        mp = self.cfg.mask_patch_size
        return (L.upsample_grid(mask, mp // model.encoder.patch_size),
                L.upsample_grid(mask, mp))

    def loss(self, model: SimMIMModel, batch, plan, num_groups: int, rng=None):
        """batch["image"]: normalised float (B, H, W, 3). Returns (loss, {})."""
        images = batch["image"]
        token_mask, pixel_mask = self.upsampled(plan["mask"], model)
        return masked_l1_loss(images, model(images, token_mask, rng), pixel_mask), {}

    # -- mixmae-visualize -----------------------------------------------------------------------

    def mask_from_file(self, mask, batch_size, path):
        g, count = self.mask_grid(), self.num_masked()
        mask = self.one_array(mask, path)
        if mask.shape == (g, g):
            mask = np.broadcast_to(mask, (batch_size, g, g))
        if mask.shape != (batch_size, g, g):
            raise ValueError(f"--mask {path}: expected ({batch_size}, {g}, {g}) or ({g}, {g}) on "
                             f"the {self.cfg.mask_patch_size}-px mask-patch grid, got shape "
                             f"{mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"--mask {path}: values must be 0 or 1")
        counts = mask.reshape(batch_size, g * g).sum(axis=1)
        if (counts != count).any():
            raise ValueError(f"--mask {path}: each image must have exactly {count} masked "
                             f"squares (1s), ceil({g * g} * {self.cfg.mask_ratio}) as the "
                             f"official MaskGenerator draws; got {counts.tolist()}")
        return {"mask": jnp.asarray(mask, jnp.float32)}

    def panels(self, model: SimMIMModel, images, plan):
        """original | masked input (masked squares grey: 0 is the mean colour) | the prediction
        pasted into the masked squares."""
        token_mask, pixel_mask = self.upsampled(plan["mask"], model)
        x_rec = model(images, token_mask)
        loss = masked_l1_loss(images, x_rec, pixel_mask)
        m = pixel_mask[..., None]
        columns = {"original": images,
                   "masked": images * (1 - m),
                   "reconstruction": images * (1 - m) + x_rec * m}
        return loss, {}, columns
