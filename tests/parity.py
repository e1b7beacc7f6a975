"""Parity machinery shared by the methods' parity tests: random params, loading an export into a
torch reference, and the rule comparing the JAX fp32 result with the float64 reference.

Tolerances come from the numerics (mixmae_jax/numerics.py, which the accelerator check imports
too), not from one run: the torch reference also runs in float64 (the exact answer, for these
purposes), and the JAX float32 result must be no further from it than RATIO x the torch float32
result is (floor: a few fp32 roundings). Both fp32 results move with the CPU's kernels (AVX2 vs
AVX-512), so the bound moves with them; a real bug (a constant, an eps, a loss weighting) moves
only the JAX side. Errors are relative Frobenius errors ||a - b|| / ||b||, printed per quantity
(`pytest -s`).
"""

import jax
import numpy as np
import torch
from flax import nnx

from mixmae_jax.interop import keymap as K
from mixmae_jax.models.layers import InitKeys
from mixmae_jax.numerics import parity_limit, rel_err

# Tiny graphs compile ~3x faster at LLVM -O0; the HLO and the fp semantics (no fast-math) are
# unchanged. The whole suite already compiles at -O0 (conftest.py's XLA_FLAGS); this keeps the
# tiny parity graphs there when TEST_XLA_DEFAULTS=1 gives the rest XLA's defaults.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def abstract_model(build):
    """(graphdef, abstract params) without allocating."""
    graphdef, state = nnx.split(nnx.eval_shape(build), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def random_params(abstract, seed):
    """Random params with init-like scales, non-trivial norms and biases (numpy, float32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in K.flatten(abstract).items():
        shape = tuple(leaf.shape)
        noise = rng.standard_normal(shape, dtype=np.float32)
        if path.endswith(".scale"):
            v = 1.0 + 0.2 * noise
        elif path.endswith(".bias"):
            v = 0.1 * noise
        elif path.endswith(".kernel"):
            fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
            v = noise * np.float32(np.sqrt(2.0 / (fan_in + fan_out)))
        else:  # relative_position_bias_table, mask_token
            v = 0.5 * noise
        out[path] = v.astype(np.float32)
    return K.unflatten(out)


def nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def load_with_own_constants(model, state_dict, layout):
    """Strict load of every exported tensor except the constants: the reference keeps the
    indices and tables it computed itself, so a wrong exported constant cannot hide a wrong one
    in the JAX model (`test_exported_constants_equal_the_references_own` compares them)."""
    own = model.state_dict()
    assert list(state_dict) == list(own), sorted(set(state_dict) ^ set(own))
    model.load_state_dict({k: own[k] if layout.is_constant_key(k) else v
                           for k, v in state_dict.items()}, strict=True)
    return model


def check_against_exact(title, jax_values, torch32, torch64, limit):
    """Each JAX fp32 quantity vs the float64 reference, bounded by the torch fp32 error."""
    rows, failures = [], []
    for k, a in jax_values.items():
        e_jax, e_t32 = rel_err(a, torch64[k]), rel_err(torch32[k], torch64[k])
        tol = parity_limit(e_t32, limit)
        rows.append((k, e_jax, e_t32, tol))
        if e_jax > tol:
            failures.append(f"{k}: {e_jax:.3g} > {tol:.3g} (torch fp32: {e_t32:.3g})")
    worst = max(rows, key=lambda r: r[1] / r[3])
    print(f"\n[{title}] rel. error to float64; worst {worst[0]} = {worst[1]:.3g} "
          f"(tol {worst[3]:.3g})\n    {'quantity':56s} {'jax fp32':>9s} {'torch fp32':>10s}")
    for k, e_jax, e_t32, _ in rows:
        print(f"    {k:56s} {e_jax:9.3g} {e_t32:10.3g}")
    assert not failures, f"{title}: " + "; ".join(failures)


def random_torch_state_dict(model, seed):
    """The reference's state_dict with every trainable parameter randomised (norms, biases too);
    buffers (index tables, attention masks) and frozen tables are left as the model made them."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for k, p in model.named_parameters():
        if p.requires_grad:
            sd[k] = torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if k.endswith("norm.weight")
                                                                 else 0.0)
    return sd


def assert_exports_back_exactly(params, state_dict, layout, fmt, num_classes):
    """Exporting imported params gives back the file: the same keys in the same order, dtypes
    and values bit for bit; returns the export."""
    from mixmae_jax.interop import to_torch

    back = to_torch.params_to_state_dict(params, layout, format=fmt, num_classes=num_classes)
    assert list(back) == list(state_dict)
    for k, v in state_dict.items():
        assert back[k].dtype == v.dtype, k
        assert torch.equal(back[k], v), k
    return back


def mixmim_encode_case(cfg) -> dict:
    """A random MixMIM model of `cfg`, its jitted mixed encoder (one group), 4 random 64-px
    images and one final-grid mask (4 x 4 cells, 8 from the partner) tiled over the batch: the
    exact-invariant tests' case."""
    from mixmae_jax.methods.mixmim import MixMIMModel
    from mixmae_jax.train.step import bind

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=InitKeys(0))),
                                   nnx.Param)
    params = random_params(nnx.to_pure_dict(abstract), seed=0)

    def encode(params, images, mask):
        return bind(graphdef, params).encode_mixed(images, mask, 1)

    encode = jax.jit(encode, compiler_options=FAST_COMPILE)
    images = np.random.default_rng(1).standard_normal((4, 64, 64, 3), dtype=np.float32)
    cells = np.zeros(16, np.float32)
    cells[np.random.default_rng(2).permutation(16)[:8]] = 1.0
    return dict(cfg=cfg, params=params, encode=encode, images=images, cells=cells.reshape(4, 4),
                mask=np.tile(cells, (4, 1)))
