"""MoCo augmentations: output format, and the same distribution as the official torchvision
recipes."""
import math
import os
import random

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from pretrain import augment
from pretrain.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_two_view_transform,
    normalize,
    sample_crop_params,
)


def colourful_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                    (xx + yy) * 127 // max(h + w - 2, 1)], -1)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov D (max distance between the empirical CDFs)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_critical(n, m, alpha=0.001):
    c = math.sqrt(-0.5 * math.log(alpha / 2))  # 1.949 for alpha = 0.001
    return c * math.sqrt((n + m) / (n * m))


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_two_views_are_uint8_chw_normalised_on_the_device(version):
    img = colourful_image(50, 70)
    random.seed(0)
    view1, view2 = build_two_view_transform(version, 32)(img)
    for view in (view1, view2):
        assert isinstance(view, torch.Tensor) and view.dtype == torch.uint8 and \
            view.shape == (3, 32, 32) and view.is_contiguous()
        x = normalize(view[None])
        assert x.dtype == torch.float32 and x.shape == (1, 3, 32, 32)
        lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
        hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
        assert lo - 1e-5 <= float(x.min()) and float(x.max()) <= hi + 1e-5
    assert not torch.equal(view1, view2)  # independent augmentations


def test_unknown_version_is_named():
    with pytest.raises(ValueError, match="'v4'"):
        build_two_view_transform("v4", 32)


def test_normalisation_values_exact():
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 0, 128, 255
    out = normalize(build_eval_transform(32)(img)[None])[0]
    assert out.shape == (3, 32, 32)
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), IMAGENET_MEAN, IMAGENET_STD)]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((32, 32), expected[c]), atol=1e-5)


def test_eval_transform_matches_torchvision_resize_centre_crop():
    img = colourful_image(100, 180)
    ours = normalize(build_eval_transform(32)(img)[None])[0]
    reference = T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(Image.fromarray(img))
    assert ours.shape == reference.shape == (3, 32, 32)
    # same geometry; resampling differs slightly
    assert float((ours - reference).abs().mean()) < 0.05


def test_wrong_input_type_is_refused():
    with pytest.raises(TypeError, match="RGB uint8"):
        build_eval_transform(32)(np.zeros((10, 10), np.float32))


@pytest.mark.parametrize("hw, scale", [((350, 400), (0.2, 1.0)), ((350, 400), (0.08, 1.0)),
                                       ((30, 400), (0.2, 1.0))])
def test_crop_distribution_matches_torchvision(hw, scale):
    n, ratio = 3000, (3 / 4, 4 / 3)
    h, w = hw
    rng = random.Random(1)
    ours = np.array([sample_crop_params(h, w, scale, ratio, rng) for _ in range(n)],
                    dtype=np.float64)
    torch.manual_seed(1)
    dummy = torch.empty(3, h, w)
    theirs = np.array([T.RandomResizedCrop.get_params(dummy, list(scale), list(ratio))
                       for _ in range(n)], np.float64)
    crit = ks_critical(n, n)
    for name, stat in {
        "area scale": lambda p: p[:, 2] * p[:, 3] / (h * w),
        "log aspect ratio": lambda p: np.log(p[:, 3] / p[:, 2]),
        "top offset": lambda p: p[:, 0] / h,
        "left offset": lambda p: p[:, 1] / w,
    }.items():
        d = ks_statistic(stat(ours), stat(theirs))
        assert d < crit, f"{name}: KS D={d:.4f} >= critical {crit:.4f}"
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()


def test_ks_detects_a_different_scale_range():
    # The test above has power: crops with scale (0.2, 1) are told apart from torchvision's
    # (0.08, 1).
    n, ratio = 3000, (3 / 4, 4 / 3)
    rng = random.Random(2)
    ours = np.array([sample_crop_params(350, 400, (0.2, 1.0), ratio, rng) for _ in range(n)],
                    np.float64)
    torch.manual_seed(2)
    theirs = np.array([T.RandomResizedCrop.get_params(torch.empty(3, 350, 400), [0.08, 1.0],
                                                      list(ratio))
                       for _ in range(n)], np.float64)
    area = lambda p: p[:, 2] * p[:, 3] / (350 * 400)  # noqa: E731
    assert ks_statistic(area(ours), area(theirs)) > ks_critical(n, n)


def test_jitter_factor_ranges_and_random_order():
    jitter = augment.ColorJitter(0.4, 0.4, 0.4, 0.1)
    rng = random.Random(3)
    factors = {op: [] for op in ("adjust_brightness", "adjust_contrast", "adjust_saturation",
                                 "adjust_hue")}
    first = {op: 0 for op in factors}
    n = 4000
    for _ in range(n):
        params = jitter.sample_params(rng)
        assert len(params) == 4
        first[params[0][0].__name__] += 1
        for op, factor in params:
            factors[op.__name__].append(factor)
    crit = ks_critical(n, n)
    uniform = np.random.default_rng(0).uniform(0, 1, n)
    for name, bounds in [("adjust_brightness", (0.6, 1.4)), ("adjust_contrast", (0.6, 1.4)),
                         ("adjust_saturation", (0.6, 1.4)), ("adjust_hue", (-0.1, 0.1))]:
        values = np.array(factors[name])
        assert bounds[0] <= values.min() and values.max() <= bounds[1], name
        unit = (values - bounds[0]) / (bounds[1] - bounds[0])
        assert ks_statistic(unit, uniform) < crit, f"{name} factors are not uniform on {bounds}"
    for name, count in first.items():  # each op comes first ~1/4 of the time
        assert abs(count / n - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n), (name, count)
    # Brightness 0.9 -> range clamped at 0, as torchvision does.
    assert augment.ColorJitter(1.5, 0, 0, 0).brightness == (0.0, 2.5)
    assert augment.ColorJitter(0, 0, 0, 0).sample_params(rng) == []


def _rate_tolerance(p, n):
    return 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def _application_rates(view, n, monkeypatch, seed=0):
    """Run the uint8 ops of one view n times; rates of jitter, blur, solarize calls and of grayscale
    outputs."""
    calls = {"jitter": 0, "blur": 0, "solarize": 0}

    def counting(cls, key):
        original = cls.__call__

        def call(self, img, rng=random):
            calls[key] += 1
            return original(self, img, rng)

        monkeypatch.setattr(cls, "__call__", call)

    counting(augment.ColorJitter, "jitter")
    counting(augment.GaussianBlur, "blur")
    counting(augment.Solarize, "solarize")
    rng = random.Random(seed)
    img = colourful_image(24, 24, seed=1)
    gray = 0
    for _ in range(n):
        out = img
        for op in view.ops:
            out = op(out, rng)
        gray += int(np.array_equal(out[..., 0], out[..., 1])
                    and np.array_equal(out[..., 1], out[..., 2]))
    return {k: v / n for k, v in calls.items()} | {"gray": gray / n}


@pytest.mark.parametrize("version, view_index, expected", [
    ("v1", 0, {"jitter": 1.0, "blur": 0.0, "solarize": 0.0, "gray": 0.2}),
    ("v2", 0, {"jitter": 0.8, "blur": 0.5, "solarize": 0.0, "gray": 0.2}),
    ("v2", 1, {"jitter": 0.8, "blur": 0.5, "solarize": 0.0, "gray": 0.2}),
    ("v3", 0, {"jitter": 0.8, "blur": 1.0, "solarize": 0.0, "gray": 0.2}),
    ("v3", 1, {"jitter": 0.8, "blur": 0.1, "solarize": 0.2, "gray": 0.2}),
])
def test_application_probabilities(version, view_index, expected, monkeypatch):
    n = 1500
    transform = build_two_view_transform(version, 16)
    view = (transform.view1, transform.view2)[view_index]
    rates = _application_rates(view, n, monkeypatch)
    for key, p in expected.items():
        message = f"{version} view{view_index + 1} {key}: rate {rates[key]} vs {p}"
        assert abs(rates[key] - p) <= _rate_tolerance(p, n), message


def test_brightness_rounds_every_grey_level_to_the_nearest():
    # the official ColorJitter works on PIL images (integers); a look-up table that truncated, or
    # rounded the wrong way, would darken every image by up to one grey level
    levels = np.arange(256, dtype=np.float64)
    image = np.repeat(levels.astype(np.uint8)[None, :, None], 3, axis=2)
    for factor in (0.37, 0.6, 1.3):
        out = augment.adjust_brightness(image, factor)[0, :, 0].astype(np.float64)
        exact = np.minimum(levels * factor, 255.0)
        assert np.abs(out - exact).max() <= 0.5 + 1e-4, factor


GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, PIL's "L" conversion


def _levels_off(out, exact):
    return np.abs(out.astype(np.float64) - exact)


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.4])
def test_contrast_blends_with_the_mean_grey_level_rounded_to_the_nearest(factor):
    img = colourful_image(40, 56, seed=7)
    mean = float((img.astype(np.float64) @ GRAY_WEIGHTS).mean())
    exact = np.clip(factor * img + (1 - factor) * mean, 0, 255)
    out = augment.adjust_contrast(img, factor)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert _levels_off(out, exact).max() <= 0.5 + 1e-3
    if factor > 1:  # saturated at both ends, not wrapped around
        assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("factor", [0.6, 0.93, 1.4])
def test_saturation_blends_each_pixel_with_its_grey_level(factor):
    """One 3x3 colour matrix in OpenCV's 10-bit fixed point: <= 0.72 grey levels from the exact
    blend (a wrong grey weight or blend direction is many levels off)."""
    img = colourful_image(40, 56, seed=8)
    gray = img.astype(np.float64) @ GRAY_WEIGHTS
    exact = np.clip(factor * img + (1 - factor) * gray[..., None], 0, 255)
    off = _levels_off(augment.adjust_saturation(img, factor), exact)
    assert off.max() <= 0.75 and off.mean() < 0.3  # rounding alone: 0.25 on average


@pytest.mark.parametrize("shift", [0.1, -0.1, 0.37, -0.5])
def test_hue_rotates_the_hsv_hue_by_the_nearest_of_256_steps(shift):
    """The hue of OpenCV's 256-step HSV moves by round(shift * 256) steps, wrapping around, and
    nothing else changes (an odd width: every pixel of a row, not a multiple of some block)."""
    img = colourful_image(31, 53, seed=9)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(shift * 256)) % 256
    expected = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    out = augment.adjust_hue(img, shift)
    assert np.array_equal(out, expected)
    assert _levels_off(out, img).mean() > 5  # it did turn the colours


@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (64, 64)])
def test_views_leave_as_chw_copies_of_the_hwc_image(hw):
    img = colourful_image(*hw, seed=10)
    for source in (img, img[:, ::-1]):  # contiguous, and a flipped view
        chw = augment.to_chw_tensor(source)
        assert chw.dtype == torch.uint8 and chw.is_contiguous()
        assert torch.equal(chw, torch.from_numpy(source.copy()).permute(2, 0, 1))


@pytest.mark.parametrize("size", [32, 64])
def test_crops_come_out_as_contiguous_hwc_arrays(size):
    """The layout OpenCV's ops take without a copy: a crop whose tensor was read as planar (NCHW)
    comes out strided and makes every later op copy it first (30 % of the pipeline's time)."""
    img = colourful_image(90, 120, seed=11)
    out = augment.RandomResizedCrop(size)(img, random.Random(0))
    assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


def test_photometric_ops_match_torchvision_functional():
    img = colourful_image(48, 48, seed=4)
    tensor = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    pil = Image.fromarray(img)

    def diff(ours, theirs):
        return float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).mean())

    to_np = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
    assert diff(augment.adjust_brightness(img, 1.3), to_np(TF.adjust_brightness(tensor, 1.3))) < 1.0
    assert diff(augment.adjust_contrast(img, 0.7), to_np(TF.adjust_contrast(tensor, 0.7))) < 1.0
    assert diff(augment.adjust_saturation(img, 1.4), to_np(TF.adjust_saturation(tensor, 1.4))) < 1.0
    assert diff(augment.adjust_hue(img, 0.08), to_np(TF.adjust_hue(tensor, 0.08))) < 3.0
    assert diff(augment.adjust_hue(img, 0.0), img) < 2.0
    # Blur: the official kernel is PIL GaussianBlur(radius=sigma).
    random_state = random.Random(0)
    sigma_probe = random_state.uniform(0.1, 2.0)
    ours = augment.GaussianBlur((sigma_probe, sigma_probe))(img, random.Random(0))
    theirs = np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=sigma_probe)))
    assert diff(ours, theirs) < 1.5
    assert diff(ours, img) > 2.0  # it did blur
    solarized = augment.Solarize()(img)
    assert np.array_equal(solarized, np.where(img < 128, img, 255 - img))


@pytest.mark.parametrize("version, default",
                         [("v1", (0.2, 1.0)), ("v2", (0.2, 1.0)), ("v3", (0.08, 1.0))])
def test_crop_scale_defaults_to_the_recipe_and_can_be_overridden(version, default):
    crops = lambda t: {op.scale for view in (t.view1, t.view2) for op in view.ops  # noqa: E731
                       if isinstance(op, augment.RandomResizedCrop)}
    assert crops(augment.build_two_view_transform(version, 32)) == {default}
    assert crops(augment.build_two_view_transform(version, 32, (0.5, 1.0))) == {(0.5, 1.0)}
    supervised = augment.build_linear_train_transform(32, (0.5, 1.0))
    assert [op.scale for op in supervised.ops if isinstance(op, augment.RandomResizedCrop)] == \
        [(0.5, 1.0)]


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_blur_sigma_is_the_official_range_at_224_px_and_scales_with_the_crop(version):
    blurs = lambda t: {op.op.sigma for view in (t.view1, t.view2) for op in view.ops  # noqa: E731
                       if isinstance(op, augment.RandomApply)
                       and isinstance(op.op, augment.GaussianBlur)}
    assert blurs(augment.build_two_view_transform(version, 224)) == {(0.1, 2.0)}
    [(low, high)] = blurs(augment.build_two_view_transform(version, 32))
    assert low == pytest.approx(0.1 * 32 / 224) and high == pytest.approx(2.0 * 32 / 224)


def test_bad_crop_scale_is_a_config_error():
    from mocobench.utils.errors import UsageError
    from pretrain.config import load_config

    with pytest.raises(UsageError, match="INPUT.CROP_SCALE = \\(0.5, 1.5\\)"):
        config = os.path.join(os.path.dirname(__file__), "..", "configs", "pretrain",
                              "synth_R18_cpu.yaml")
        load_config(config, ["INPUT.CROP_SCALE", "(0.5, 1.5)"])


@pytest.mark.parametrize("hw", [(100, 180), (180, 100), (90, 90), (101, 57)])
def test_resize_centre_crop_is_torchvision_pil_on_landscape_portrait_and_square(hw):
    """The eval geometry on every shape: the shorter side to 37, the longer int(37 * long / short),
    centre 32; the same pixels as torchvision's PIL Resize + CenterCrop (<= 1 grey level, PIL's
    resize on both sides)."""
    img = colourful_image(*hw, seed=5)
    ours = augment.ResizeCenterCrop(37, 32)(img)
    theirs = np.asarray(T.CenterCrop(32)(T.Resize(37)(Image.fromarray(img))))
    assert ours.shape == theirs.shape == (32, 32, 3)
    assert int(np.abs(ours.astype(int) - theirs.astype(int)).max()) <= 1


def test_linear_train_transform_crops_and_flips_to_size():
    img = colourful_image(50, 70)
    random.seed(0)
    transform = augment.build_linear_train_transform(24.0)  # sizes from a yaml may be floats
    out = transform(img)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 24, 24) and out.dtype == torch.uint8
    crop, flip = transform.ops
    assert (type(crop), crop.size, crop.scale, crop.ratio) == \
        (augment.RandomResizedCrop, 24, (0.08, 1.0), (3 / 4, 4 / 3))
    assert type(flip) is augment.RandomHorizontalFlip and flip.p == 0.5
    assert augment.build_linear_train_transform(16, [0.5, 1.0])(img).shape == (3, 16, 16)
    assert augment.build_eval_transform(24.0)(img).shape == (3, 24, 24)


def test_recipes_print_their_ops():
    assert repr(build_two_view_transform("v1", 32)) == (
        "TwoViewTransform("
        "view1=Compose(RandomResizedCrop, RandomGrayscale, ColorJitter, RandomHorizontalFlip), "
        "view2=Compose(RandomResizedCrop, RandomGrayscale, ColorJitter, RandomHorizontalFlip))")
    assert repr(build_eval_transform(32)) == "Compose(ResizeCenterCrop)"


@pytest.mark.parametrize("img, shown", [
    (np.zeros((10, 10, 3), np.float32), "ndarray float32 (10, 10, 3)"),
    (np.zeros((10, 10), np.uint8), "ndarray uint8 (10, 10)"),
    (np.zeros((10, 10, 4), np.uint8), "ndarray uint8 (10, 10, 4)"),
    (Image.new("RGB", (10, 10)), "Image  "),
])
def test_only_rgb_uint8_arrays_are_taken(img, shown):
    with pytest.raises(TypeError) as e:
        build_eval_transform(8)(img)
    assert str(e.value) == f"expected an RGB uint8 numpy image of shape HxWx3, got {shown}"


def _ops(view, cls):
    return [op.op if isinstance(op, augment.RandomApply) else op for op in view.ops
            if isinstance(op.op if isinstance(op, augment.RandomApply) else op, cls)]


@pytest.mark.parametrize("version, jitter, jitter_p", [
    # facebookresearch/moco main_moco.py: v1 ColorJitter(0.4, 0.4, 0.4, 0.4) always; aug+ (v2)
    # RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8); facebookresearch/moco-v3 main_moco.py:
    # RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8); RandomGrayscale(p=0.2) and flip in all
    # three
    ("v1", ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.4, 0.4)), None),
    ("v2", ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)), 0.8),
    ("v3", ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)), 0.8),
])
def test_recipe_jitter_strengths_are_the_official_ones(version, jitter, jitter_p):
    transform = build_two_view_transform(version, 32)
    for view in (transform.view1, transform.view2):
        [op] = _ops(view, augment.ColorJitter)
        got = (op.brightness, op.contrast, op.saturation, op.hue)
        assert np.allclose(got, jitter, rtol=0, atol=1e-12), got
        [wrapper] = [o for o in view.ops
                     if isinstance(o, augment.RandomApply) and o.op is op] or [None]
        assert (wrapper.p if wrapper else None) == jitter_p
        [gray] = _ops(view, augment.RandomGrayscale)
        assert gray.p == 0.2
        [flip] = _ops(view, augment.RandomHorizontalFlip)
        assert flip.p == 0.5
        assert isinstance(view.ops[0], augment.RandomResizedCrop) and view.ops[0].size == 32


@pytest.mark.parametrize("sigma", [0.7, 1.3, 2.0])
def test_gaussian_blur_is_a_gaussian_of_that_sigma_cut_at_3_sigma(sigma):
    """Against scipy's Gaussian filter with the same radius ceil(3 sigma) and the same (mirror)
    border."""
    from scipy import ndimage

    img = colourful_image(40, 40, seed=6)
    img[10:14, 20:23] = 255  # a bright patch: its halo shows the kernel's width
    ours = augment.GaussianBlur((sigma, sigma))(img, random.Random(0))
    radius = math.ceil(3 * sigma)
    theirs = np.stack([ndimage.gaussian_filter(img[..., c].astype(np.float64), sigma, mode="mirror",
                                               truncate=radius / sigma) for c in range(3)], -1)
    # the exact filter rounded to uint8 (cv2.GaussianBlur's fixed point was up to 1.25 grey levels
    # off); a wrong sigma or border is 3-50 levels off
    assert np.abs(ours - theirs).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("hw, scale", [((400, 30), (0.9, 1.0)), ((30, 400), (0.9, 1.0)),
                                       ((50, 60), (1.5, 2.0)), ((401, 30), (0.9, 1.0)),
                                       ((30, 401), (0.9, 1.0))])
def test_fallback_centre_crop_is_torchvision_s(hw, scale):
    """When 10 tries find no crop that fits (too tall, too wide, area over 1): torchvision's centre
    crop, clamped to the ratio range; deterministic, so equal to torchvision's exactly, in integer
    pixels (an odd margin rounds down)."""
    ratio = (3 / 4, 4 / 3)
    theirs = tuple(T.RandomResizedCrop.get_params(torch.empty(3, *hw), list(scale), list(ratio)))
    ours = sample_crop_params(*hw, scale, ratio, random.Random(0))
    assert ours == theirs and all(type(v) is int for v in ours), ours
    assert theirs == {(400, 30): (180, 0, 40, 30), (30, 400): (0, 180, 30, 40),
                      (50, 60): (0, 0, 50, 60), (401, 30): (180, 0, 40, 30),
                      (30, 401): (0, 180, 30, 40)}[hw]


class _ScriptedRandom:
    """A `random` stand-in that returns scripted draws (uniform) and the lowest offset (randint)."""

    def __init__(self, uniforms):
        self.uniforms = list(uniforms)

    def uniform(self, low, high):
        return self.uniforms.pop(0)

    def randint(self, low, high):
        return high  # the last offset: the crop touches the bottom/right edge


def test_a_crop_as_wide_or_as_tall_as_the_image_is_accepted():
    # try 1: area 0.5, aspect 4 on a 100x200 image -> w = 200 (the full width), h = 50: accepted, as
    # torchvision (`0 < w <= width`); a second try (area 0.5, aspect 1) would give a 100x100 crop
    rng = _ScriptedRandom([0.5, math.log(4.0), 0.5, 0.0])
    assert sample_crop_params(100, 200, (0.08, 1.0), (0.25, 4.0), rng) == (50, 0, 50, 200)
    rng = _ScriptedRandom([0.125, math.log(0.25), 0.5, 0.0])  # h = 100, the full height, w = 25
    assert sample_crop_params(100, 200, (0.08, 1.0), (0.25, 4.0), rng) == (0, 175, 100, 25)


@pytest.mark.parametrize("size, resize", [(224, 256), (32, 37), (24, 27), (64, 73)])
def test_eval_resize_keeps_the_official_256_to_224_ratio(size, resize):
    # facebookresearch/moco main_lincls.py: Resize(256) + CenterCrop(224); smaller inputs keep the
    # ratio, rounded
    [op] = build_eval_transform(size).ops
    assert (type(op), op.resize, op.size) == (augment.ResizeCenterCrop, resize, size)


def test_normalize_gives_the_workers_former_values_bit_for_bit_in_any_layout():
    """Every grey level of every channel: the float64-exact (x / 255 - mean) / std rounded once to
    float32, which is what the workers' per-channel tables wrote before they sent uint8; the
    memory layout is kept (channels_last in, channels_last out)."""
    levels = np.arange(256, dtype=np.float64)
    exact = np.stack([((levels / 255.0 - m) / s).astype(np.float32)
                      for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)
    assert torch.equal(out.view(2, 3, 256), torch.from_numpy(exact).expand(2, 3, 256))
    last = normalize(images.contiguous(memory_format=torch.channels_last))
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, out)
    # torchvision's float32 ToTensor + Normalize rounds three times: within one ulp of these, not
    # equal to them (why the table, and not that arithmetic, is the reference)
    reference = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(images[0].float().div(255))
    assert 0 < float((reference - out[0]).abs().max()) <= 4.8e-7


@pytest.mark.parametrize("images, shown", [
    (torch.zeros(2, 3, 8, 8), "torch.float32 (2, 3, 8, 8)"),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), "torch.uint8 (3, 8, 8)"),
    (torch.zeros(2, 8, 8, 3, dtype=torch.uint8), "torch.uint8 (2, 8, 8, 3)"),
])
def test_normalize_takes_only_uint8_batches(images, shown):
    with pytest.raises(TypeError) as e:
        normalize(images)
    assert str(e.value) == ("expected uint8 images of shape Nx3xHxW (the data loader's batches), "
                            f"got {shown}")
