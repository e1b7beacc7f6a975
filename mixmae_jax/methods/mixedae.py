"""MixedAE (Chen et al., CVPR 2023, arXiv 2303.17152): MAE with image mixing and homologous
recognition. There is no official code; what comes from the paper and what is this project's
choice is listed in the README (and in `shared/reference/ummae_mixedae.md` §2).

* Mixing: the batch is cut into groups of S = `method.num_sources` consecutive images (inside a
  device's batch); each group becomes one mixed sample whose N patch positions are assigned to
  the S sources by a balanced random assignment (exactly N/S positions each, a random
  permutation cut into S chunks), each source's patches at their true positions. The sample
  also carries one cls token per source. So the encoder spends N/S + 1 tokens per image: MAE's
  cost at mask ratio 1 - 1/S.
* Homologous attention, per encoder layer (`method.attention`, one mode or a comma-separated
  list, one per layer): "topk" (each query keeps its k
  largest logits per head, k = `method.topk` or N/S; the rest get -inf before the softmax),
  "full" (plain attention: the naive-mixing baseline) or "oracle" (attention restricted to the
  query's own source, MixMIM's mask, as an ablation). No parameters: finetuning runs plain
  attention on the same weights.
* Homologous contrastive loss on the encoder's patch tokens of each mixed sample (optionally all
  samples of the device batch): supervised-contrastive, positives = tokens of the same source,
  temperature `contrast_temperature`, optional MLP projection head, weight `contrast_weight`.
* Segment embeddings (`segment_embedding`): "none", "decoder" (a learned embedding per source
  slot added to the decoder's mask tokens) or "encoder" (added to the encoder input by source:
  it tells the encoder the answer, a leakage ablation).
* Reconstruction: unmix the latents per source (its cls and its N/S tokens), MAE's decoder with
  mask tokens at the other positions, norm-pix MSE on each image's hidden patches.

Metrics: `rec_loss`, `contrast_loss`, and per encoder layer `recognition_<l>`: the share of each
patch query's top-N/S keys (by logit, averaged over heads) that come from its own source (its
source's cls token included); chance is about 1/S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixmae_jax.methods import base
from mixmae_jax.methods.mae import MAEModel
from mixmae_jax.methods.masks import random_ranks
from mixmae_jax.methods.targets import patch_targets, pixels_of
from mixmae_jax.models import layers as L

ATTENTION_MODES = ("topk", "full", "oracle")
SEGMENT_MODES = ("none", "decoder", "encoder")


def kth_largest(x, k: int, iters: int = 32):
    """The k-th largest value along the last axis, (..., 1), exactly (ties count).

    A bisection on counts: XLA:CPU's TopK (a sort) took 71 ms on the logits of one ViT-B layer
    at batch 8 where 32 rounds of compare-and-count take 3 ms. Invariant: at least k values are
    >= lo and fewer than k are >= hi; after 32 halvings no float lies strictly inside the
    bracket, so the smallest value >= lo is the k-th largest."""
    lo = jnp.min(x, axis=-1, keepdims=True)
    hi = jnp.max(x, axis=-1, keepdims=True)

    def halve(_, bracket):
        lo, hi = bracket
        mid = lo + (hi - lo) / 2
        enough = jnp.sum(x >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iters, halve, (lo, hi))
    return jnp.min(jnp.where(x >= lo, x, jnp.inf), axis=-1, keepdims=True)


def homologous(labels, mode: str, k: int, num_cls: int):
    """MixedAE's rule on one layer's attention logits (`layers.attention`'s `restrict`).

    labels (M, T): the source of each token (the S = num_cls cls tokens first). The rule takes the
    scaled logits (M, heads, T, T) and returns them restricted by `mode` ("topk": each query
    keeps its k largest per head, the rest NEG_INF; "oracle": only its own source's keys; "full":
    all), with the recognition accuracy: over patch queries and heads, the share of each query's
    top N/S keys (by logit, among all T keys) that share its source."""

    def rule(logits):
        t = logits.shape[-1]
        same = labels[:, None, :, None] == labels[:, None, None, :]
        fixed = jax.lax.stop_gradient(logits)
        k_rec = (t - num_cls) // num_cls
        top = fixed >= kth_largest(fixed, k_rec)
        hits = jnp.sum(top & same, axis=-1) / jnp.sum(top, axis=-1)
        recognition = jnp.mean(hits[:, :, num_cls:].astype(jnp.float32))
        if mode == "oracle":
            logits = logits + (~same).astype(jnp.float32) * L.NEG_INF
        elif mode == "topk" and k < t:
            keep = top if k == k_rec else fixed >= kth_largest(fixed, k)
            logits = jnp.where(keep, logits, L.NEG_INF)
        return logits, recognition

    return rule


class MixedAEModel(MAEModel):
    """MAE's model (official `models_mae` names: encoder and decoder) plus the optional
    `segment_embed` (S, C) (encoder input or decoder mask tokens) and `contrast_head`."""

    def __init__(self, cfg, method_cfg, *, dtype=None, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        s = method_cfg.num_sources
        if method_cfg.segment_embedding == "encoder":
            self.segment_embed = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (s, cfg.embed_dim)))
        elif method_cfg.segment_embedding == "decoder":
            self.segment_embed = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (s, cfg.decoder_dim)))
        if method_cfg.contrast_projector:
            dim, out = cfg.embed_dim, method_cfg.contrast_projector
            self.contrast_head = nnx.List([L.dense(dim, dim, dtype=dtype, rngs=rngs),
                                           L.dense(dim, out, dtype=dtype, rngs=rngs)])


class Method(base.Method):
    """MixedAE on a ViT (`config.model.name = "vit"`)."""

    name = "mixedae"
    models = ("vit",)
    mask_help = ("MixedAE: .npy (G, h, w) or (h, w) of source ids 0..S-1 on the patch grid (14x14 "
                 "for ViT-B/16), one map per mixed sample (G = batch / S; one map: every sample), "
                 "each id exactly h*w/S times; image s of each group of S consecutive images "
                 "supplies the patches marked s")

    def __init__(self, config):
        super().__init__(config)
        self.min_images_per_group = int(config.method.num_sources)

    # -- geometry and config --------------------------------------------------------------------

    def num_patches(self) -> int:
        return (self.model_cfg.img_size // self.model_cfg.patch_size) ** 2

    def layer_modes(self) -> tuple[str, ...]:
        """The attention mode of every encoder layer."""
        modes = tuple(m.strip() for m in str(self.cfg.attention).split(","))
        return modes * self.model_cfg.depth if len(modes) == 1 else modes

    def topk(self) -> int:
        return int(self.cfg.topk) or self.num_patches() // self.cfg.num_sources

    def check_config(self, config, num_devices, check):
        m, meth = config.model, config.method
        s, n = meth.num_sources, self.num_patches()
        check(s >= 2 and n % s == 0, "method.num_sources",
              f"{s}: at least 2, and it must divide the {n} patches (a balanced assignment)")
        modes = self.layer_modes()
        check(len(modes) == m.depth and all(a in ATTENTION_MODES for a in modes),
              "method.attention", f"{meth.attention!r}: one of {', '.join(ATTENTION_MODES)}, or "
              f"a comma-separated list of them, one per encoder layer ({m.depth})")
        check(0 <= meth.topk <= n + s, "method.topk",
              f"{meth.topk}: 0 (N/S = {n // s}) or a number of keys up to {n + s}")
        check(meth.segment_embedding in SEGMENT_MODES, "method.segment_embedding",
              f"{meth.segment_embedding!r} (one of {', '.join(SEGMENT_MODES)})")
        check(meth.contrast_weight >= 0, "method.contrast_weight", f"{meth.contrast_weight} < 0")
        check(meth.contrast_temperature > 0, "method.contrast_temperature",
              f"{meth.contrast_temperature} must be positive")
        check(m.drop_path_rate == 0.0, "model.drop_path_rate",
              f"{m.drop_path_rate}: MixedAE pretraining runs without stochastic depth (as MAE's)")
        check(m.decoder_dim % 4 == 0 and m.decoder_dim % m.decoder_num_heads == 0,
              "model.decoder_dim", f"{m.decoder_dim} must be divisible by 4 and by "
              f"model.decoder_num_heads={m.decoder_num_heads}")
        accum = config.optim.grad_accum_steps
        micro = config.batch_size // max(1, num_devices * accum)
        check(micro % s == 0, "batch_size",
              f"{config.batch_size}: each device's micro-batch ({micro} images) must be a "
              f"multiple of method.num_sources={s} (one mixed sample per {s} images)")

    def build_model(self, rngs: nnx.Rngs) -> MixedAEModel:
        return MixedAEModel(self.model_cfg, self.cfg, dtype=self.compute_dtype, rngs=rngs)

    # -- the plan -------------------------------------------------------------------------------

    def make_plan(self, rng, batch_size: int, num_groups: int):
        """One balanced assignment per mixed sample: `source` (B/S, N) int32, exactly N/S
        positions per source (a random permutation cut into S chunks). Mixed samples never span
        device groups: each is S consecutive images of one device's batch."""
        s, n = self.cfg.num_sources, self.num_patches()
        rank = random_ranks(rng, (batch_size // s, n))
        return {"source": (rank // (n // s)).astype(jnp.int32)}

    def unmix_ids(self, source):
        """(ids_keep (B, N/S): each image's own positions, ascending; ids_restore (B, N);
        hidden (B, N) 1 = the image's patch is hidden)."""
        s, n = self.cfg.num_sources, self.num_patches()
        own = source[:, None, :] == jnp.arange(s)[None, :, None]  # (G, S, N)
        own = own.reshape(-1, n)
        order = jnp.argsort(~own, axis=1, stable=True)
        ids_restore = jnp.argsort(order, axis=1)
        return order[:, :n // s], ids_restore, (~own).astype(jnp.float32)

    # -- the model run --------------------------------------------------------------------------

    def encode(self, model: MixedAEModel, images, source):
        """Mixed samples through the encoder: (latents (G, S + N, C) with the S cls tokens
        first, recognition per layer (depth,))."""
        enc, s = model.encoder, self.cfg.num_sources
        tokens = enc.embed(images)  # (B, N, C), position embedding added
        b, n, c = tokens.shape
        g = b // s
        mixed = jnp.take_along_axis(tokens.reshape(g, s, n, c), source[:, None, :, None],
                                    axis=1)[:, 0]
        cls = jnp.broadcast_to(enc.cls_token[...] + enc.position_table()[:1], (g, s, c))
        if self.cfg.segment_embedding == "encoder":
            seg = model.segment_embed[...]
            mixed = mixed + jnp.take(seg, source, axis=0)
            cls = cls + seg[None]
        x = jnp.concatenate([cls, mixed], axis=1)
        labels = jnp.concatenate([jnp.broadcast_to(jnp.arange(s), (g, s)), source], axis=1)
        modes, k = self.layer_modes(), self.topk()
        # The encoder's own blocks, the homologous rule as their context (no stochastic depth in
        # MixedAE pretraining). One mode for every layer: the blocks run as one scan.
        if len(set(modes)) == 1:
            groups = [(enc.blocks, modes[0])]
        else:
            groups = [([block], mode) for block, mode in zip(enc.blocks, modes)]
        recognition = []
        for blocks, mode in groups:
            x, r = L.apply_blocks(blocks, x, homologous(labels, mode, k, s), remat=enc.remat,
                                  scan=enc.scan, with_aux=True)
            recognition.append(r)
        return enc.norm(x), jnp.concatenate(recognition)

    def reconstruct(self, model: MixedAEModel, latent, source):
        """Each image's predictions (B, N, p*p*3) from its own cls and tokens."""
        s = self.cfg.num_sources
        g, t, c = latent.shape
        ids_keep, ids_restore, _ = self.unmix_ids(source)
        cls = latent[:, :s].reshape(g * s, 1, c)
        patches = jnp.repeat(latent[:, s:], s, axis=0)  # row i: its mixed sample's tokens
        own = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
        fill = None
        if self.cfg.segment_embedding == "decoder":
            fill = jnp.tile(model.segment_embed[...], (g, 1))[:, None, :]
        return model.decoder(jnp.concatenate([cls, own], axis=1), ids_restore, fill)

    def contrastive_loss(self, model: MixedAEModel, latent, source, num_groups: int):
        """Supervised-contrastive loss of the patch tokens: for each anchor, the mean over its
        homologous tokens of -log softmax over all other tokens (of its mixed sample, or of all
        mixed samples of its device batch with `contrast_across_samples`)."""
        s = self.cfg.num_sources
        z = latent[:, s:].astype(jnp.float32)
        if hasattr(model, "contrast_head"):
            first, second = model.contrast_head
            z = second(jax.nn.gelu(first(z), approximate=False)).astype(jnp.float32)
        z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)
        g, n, d = z.shape
        labels = source
        if self.cfg.contrast_across_samples:
            per = g // num_groups
            labels = (source + s * jnp.arange(g)[:, None]).reshape(num_groups, per * n)
            z = z.reshape(num_groups, per * n, d)
        sim = jnp.einsum("gid,gjd->gij", z, z) / self.cfg.contrast_temperature
        t = sim.shape[-1]
        eye = jnp.eye(t, dtype=bool)[None]
        logp = jax.nn.log_softmax(jnp.where(eye, L.NEG_INF, sim), axis=-1)
        pos = (labels[:, :, None] == labels[:, None, :]) & ~eye
        per_anchor = -jnp.sum(jnp.where(pos, logp, 0.0), axis=-1) / jnp.sum(pos, axis=-1)
        return jnp.mean(per_anchor)

    def losses(self, model: MixedAEModel, images, source, num_groups: int):
        latent, recognition = self.encode(model, images, source)
        pred = self.reconstruct(model, latent, source)
        hidden = self.unmix_ids(source)[2]
        target = patch_targets(images, self.model_cfg.patch_size, self.cfg.norm_pix_loss)
        per_patch = jnp.mean((pred - target) ** 2, axis=-1)
        rec = jnp.sum(per_patch * hidden) / jnp.sum(hidden)
        contrast = jnp.float32(0.0)
        if self.cfg.contrast_weight > 0:
            contrast = self.contrastive_loss(model, latent, source, num_groups)
        return rec, contrast, recognition, pred

    def loss(self, model: MixedAEModel, batch, plan, num_groups: int, rng=None):
        rec, contrast, recognition, _ = self.losses(model, batch["image"], plan["source"],
                                                    num_groups)
        metrics = {"rec_loss": rec, "contrast_loss": contrast}
        metrics.update({f"recognition_{i:02d}": r for i, r in enumerate(recognition)})
        return rec + self.cfg.contrast_weight * contrast, metrics

    # -- mixmae-visualize -----------------------------------------------------------------------

    def mask_from_file(self, mask, batch_size, path):
        s, n = self.cfg.num_sources, self.num_patches()
        grid = int(round(n**0.5))
        g = batch_size // s
        mask = self.one_array(mask, path)
        if batch_size % s:
            raise ValueError(f"--mask {path}: {batch_size} images do not form mixed samples of "
                             f"{s} (method.num_sources)")
        if mask.shape == (grid, grid):
            mask = np.broadcast_to(mask, (g, grid, grid))
        if mask.shape != (g, grid, grid):
            raise ValueError(f"--mask {path}: expected ({g}, {grid}, {grid}) or ({grid}, {grid}) "
                             f"source ids on the patch grid, got shape {mask.shape}")
        counts = np.stack([(mask.reshape(g, n) == i).sum(axis=1) for i in range(s)], axis=1)
        if (counts != n // s).any():
            raise ValueError(f"--mask {path}: every id 0..{s - 1} must appear exactly {n // s} "
                             f"times per map; got counts {counts.tolist()}")
        return {"source": jnp.asarray(mask.reshape(g, n), jnp.int32)}

    def panels(self, model: MixedAEModel, images, plan):
        """original | the mixed sample it belongs to | its visible patches + predictions."""
        p, size = self.model_cfg.patch_size, images.shape[1]
        s = self.cfg.num_sources
        rec, contrast, recognition, pred = self.losses(model, images, plan["source"], 1)
        patches = L.patchify(images, p)
        b, n, d = patches.shape
        mixed = jnp.take_along_axis(patches.reshape(b // s, s, n, d),
                                    plan["source"][:, None, :, None], axis=1)[:, 0]
        mixed = jnp.repeat(mixed, s, axis=0)
        hidden = self.unmix_ids(plan["source"])[2][..., None]
        filled = patches * (1 - hidden) + pixels_of(pred, patches, self.cfg.norm_pix_loss) * hidden
        columns = {"original": images,
                   "mixed": L.unpatchify(mixed, p, size, size),
                   "reconstruction": L.unpatchify(filled, p, size, size)}
        metrics = {"contrast_loss": contrast, "recognition_last": recognition[-1]}
        return rec + self.cfg.contrast_weight * contrast, metrics, columns
