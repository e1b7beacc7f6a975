"""RandAugment's TF ops against the PIL operations timm applies (`timm/data/auto_augment.py`),
op by op at fixed magnitudes, and the policy's own invariants."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from mixmae_jax.data import randaugment as ra
from mixmae_jax.data.tf_setup import tf

FILL = ra.FILL


def images(n=4, size=40, seed=0):
    """Smooth random colour images (upscaled noise), so resampling differences stay small."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        big = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        arr = np.asarray(big).copy()
        arr[..., 2] = arr[..., 2] // 2 + 40  # channels with different ranges
        out.append(arr)
    return out


def tf_op(fn, image, *args):
    return np.asarray(fn(tf.constant(image), *args))


# Exact: the lookup-table ops. (tf function, PIL function)
EXACT = {
    "auto_contrast": (ra.auto_contrast, ImageOps.autocontrast),
    "equalize": (ra.equalize, ImageOps.equalize),
    "posterize_2": (lambda im: ra.posterize(im, 2), lambda im: ImageOps.posterize(im, 2)),
    # magnitude 10 keeps 0 bits: black (PIL < 9 did that; newer PIL refuses 0 bits)
    "posterize_0": (lambda im: ra.posterize(im, 0),
                    lambda im: Image.fromarray(np.zeros_like(np.asarray(im)))),
    "solarize_100": (lambda im: ra.solarize(im, 100), lambda im: ImageOps.solarize(im, 100)),
    # timm solarize_add: lut i -> min(255, i + add) below thresh 128
    "solarize_add_66": (lambda im: ra.solarize_add(im, 66),
                        lambda im: im.point([min(255, i + 66) if i < 128 else i
                                             for i in range(256)] * 3)),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_lookup_table_ops_equal_pil(name):
    ours, pil = EXACT[name]
    for img in images():
        want = np.asarray(pil(Image.fromarray(img)))
        np.testing.assert_array_equal(tf_op(ours, img), want, err_msg=name)


@pytest.mark.parametrize("name, factor", [("color", 1.81), ("color", 0.19),
                                          ("contrast", 1.81), ("contrast", 0.19),
                                          ("brightness", 1.81), ("brightness", 0.19),
                                          ("sharpness", 1.81), ("sharpness", 0.19)])
def test_enhance_ops_match_pil_to_one_level(name, factor):
    """ImageEnhance blends (float32, truncated): equal up to one grey level where float
    rounding of the blend differs."""
    enhancer = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                "brightness": ImageEnhance.Brightness,
                "sharpness": ImageEnhance.Sharpness}[name]
    ours = getattr(ra, name)
    for img in images():
        want = np.asarray(enhancer(Image.fromarray(img)).enhance(factor)).astype(int)
        got = tf_op(ours, img, factor).astype(int)
        diff = np.abs(got - want)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02, (name, factor, diff.max())


@pytest.mark.parametrize("name, value", [("rotate", 27.0), ("rotate", -27.0),
                                         ("shear_x", 0.27), ("shear_y", -0.27),
                                         ("translate_x", 0.405), ("translate_y", -0.405)])
def test_geometric_ops_match_pil_bilinear(name, value):
    """The same map as PIL's rotate / affine transform (bilinear, filled with the mean);
    timm asks PIL for bicubic, TF has bilinear only (a documented deviation)."""
    size = 40

    def pil(im):
        kw = dict(resample=Image.BILINEAR, fillcolor=FILL)
        if name == "rotate":
            return im.rotate(value, **kw)
        matrix = {"shear_x": (1, value, 0, 0, 1, 0), "shear_y": (1, 0, 0, value, 1, 0),
                  "translate_x": (1, 0, value * size, 0, 1, 0),
                  "translate_y": (1, 0, 0, 0, 1, value * size)}[name]
        return im.transform(im.size, Image.AFFINE, matrix, **kw)

    ours = getattr(ra, name)
    for img in images(size=size):
        want = np.asarray(pil(Image.fromarray(img))).astype(int)
        got = tf_op(ours, img, value).astype(int)
        diff = np.abs(got - want)
        # Interior pixels agree to rounding; a 1-px band at the fill border blends differently.
        assert np.median(diff) <= 1 and (diff > 2).mean() < 0.08, (name, np.mean(diff))


# timm auto_augment.py's argument of each op at magnitude m (its _LEVEL_DENOM = 10) with the
# random sign s, the "increasing" variants of rand-m9-mstd0.5-inc1, written out from timm.
TIMM_ARGUMENT = {
    "AutoContrast": None, "Equalize": None, "Invert": None,
    "Rotate": lambda m, s: s * m / 10 * 30.0,  # _rotate_level_to_arg
    "Posterize": lambda m, s: 4 - int(m / 10 * 4),  # _posterize_increasing_level_to_arg
    "Solarize": lambda m, s: 256 - int(m / 10 * 256),  # _solarize_increasing_level_to_arg
    "SolarizeAdd": lambda m, s: int(m / 10 * 110),  # _solarize_add_level_to_arg
    **{name: (lambda m, s: 1.0 + s * m / 10 * 0.9)  # _enhance_increasing_level_to_arg
       for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    "ShearX": lambda m, s: s * m / 10 * 0.3, "ShearY": lambda m, s: s * m / 10 * 0.3,
    "TranslateXRel": lambda m, s: s * m / 10 * 0.45,  # _translate_rel_level_to_arg
    "TranslateYRel": lambda m, s: s * m / 10 * 0.45,
}
OP_FN = {"AutoContrast": ra.auto_contrast, "Equalize": ra.equalize,
         "Invert": lambda image: 255 - image, "Rotate": ra.rotate, "Posterize": ra.posterize,
         "Solarize": ra.solarize, "SolarizeAdd": ra.solarize_add, "Color": ra.color,
         "Contrast": ra.contrast, "Brightness": ra.brightness, "Sharpness": ra.sharpness,
         "ShearX": ra.shear_x, "ShearY": ra.shear_y, "TranslateXRel": ra.translate_x,
         "TranslateYRel": ra.translate_y}


@pytest.mark.parametrize("magnitude", [9.0, 3.7])
def test_each_op_takes_timms_argument_at_a_magnitude(magnitude):
    """The policy maps a magnitude (and the random sign) to each op's argument as timm does:
    the op applied by the policy equals the op called with timm's argument (to one grey level)."""
    assert set(TIMM_ARGUMENT) == set(ra.OPS) == set(OP_FN)
    image = tf.constant(images(1)[0])
    for index, name in enumerate(ra.OPS):
        for negate in (False, True):
            got = ra.apply_op(image, tf.constant(index), tf.constant(magnitude), negate)
            args = () if TIMM_ARGUMENT[name] is None else (
                TIMM_ARGUMENT[name](magnitude, -1.0 if negate else 1.0),)
            want = OP_FN[name](image, *args)
            # The policy computes the argument in float32, timm's formula here in float64: a
            # blend factor one ulp apart truncates a few pixels one grey level apart.
            diff = np.abs(np.asarray(got, np.int32) - np.asarray(want, np.int32))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, magnitude, negate)


def test_policy_parsing_and_errors():
    assert ra.parse_policy("rand-m9-mstd0.5-inc1") == {"n": 2, "m": 9.0, "mstd": 0.5,
                                                       "inc": 1.0}
    assert ra.parse_policy("rand-n3-m7-inc1")["n"] == 3
    for bad, match in (("auto-m9", "starts with 'rand-'"), ("rand-m9-x3-inc1", "unknown field"),
                       ("rand-m9", "inc1"), ("rand-m9x-inc1", "needs a number")):
        with pytest.raises(ValueError, match=match):
            ra.parse_policy(bad)


def test_rand_augment_is_deterministic_per_seed_and_changes_images():
    policy = ra.parse_policy("rand-m9-mstd0.5-inc1")
    img = tf.constant(images(1)[0])
    fn = tf.function(lambda s: ra.rand_augment(img, s, policy))
    outs = [np.asarray(fn(tf.constant([7, i], tf.int64))) for i in range(40)]
    again = np.asarray(fn(tf.constant([7, 0], tf.int64)))
    np.testing.assert_array_equal(outs[0], again)
    assert all(o.shape == (40, 40, 3) and o.dtype == np.uint8 for o in outs)
    unchanged = sum(np.array_equal(o, images(1)[0]) for o in outs)
    # Each of the 2 ops applies with p = 0.5: P(image untouched) = 0.25 (+ ops that are no-ops)
    assert 2 <= unchanged <= 22
