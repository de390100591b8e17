"""MoCo augmentation recipes on uint8 numpy images with OpenCV.

The official MoCo code builds its views with PIL + torchvision.transforms. We keep the same
augmentation *distribution* (same crop sampler, same jitter factor ranges, same probabilities and op
order) but run the photometric ops on a uint8 HxWx3 RGB numpy array with OpenCV, which is several
times faster per worker; their outputs are identically distributed, not pixel-identical (rounding
differs by about one grey level).
Resampling is PIL's bilinear filter, the op torchvision's PIL path calls: it antialiases at every
shrink factor (a triangle filter stretched by the factor), which OpenCV's INTER_LINEAR does not and
INTER_AREA does only with a narrower box. Training crops run it as torch's uint8 kernel (a SIMD port
of PIL's, ~4x faster than PIL's resize here; it rounds its filter weights to fewer bits: 3 % of the
values one grey level off PIL's, 2 in 9 million two levels); the eval transform runs PIL's own and
equals torchvision's PIL Resize(256) + CenterCrop(224) to <= 1/255 (tests/test_faithful.py).
With that, one vectorised OpenCV pass per jitter op, the floating-point separable blur, uint8 CHW
output and the SIMD JPEG decoder (pretrain.data.read_rgb), one worker builds two MoCo v2 views
4.5-4.7x as fast as the official recipe at 224 px and 5.5-5.7x at 64 px
(benchmarks/augment_throughput.py, target >= 4x; was 3.9x and 4.6x).

Random numbers come from Python's `random` module (cheap for scalars); the data loader seeds it per
worker (pretrain.data.worker_init_fn) or per sample (SafeImageFolder(seed=...)).

The views leave the worker as uint8 CHW tensors, a quarter of float32's bytes through the loader's
shared memory (MoCo v3 at 512 images per GPU, 8 workers, prefetch 2: ~2.5 GB of /dev/shm per rank
instead of ~10 GB); the training step converts them on its device with `normalize`, which looks up
the same float32 values the workers used to write, so training is unchanged bit for bit.

    transform = build_two_view_transform("v2", 224)
    view1, view2 = transform(rgb_uint8_image)   # uint8 3xHxW tensors
    x1 = normalize(view1_batch.to(device, non_blocking=True))   # float32, ImageNet-normalised
"""
import functools
import math
import random

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (x / 255 - mean) / std for every grey level x (columns) of every channel (rows), computed in
# float64 and rounded once to float32: the values the data loader's workers wrote before they sent
# uint8 (torchvision's float32 ToTensor + Normalize rounds three times: 491 of these 768 values are
# one float32 ulp away from it, <= 4.8e-7). A look-up keeps them exact on every device, where float
# arithmetic need not (CUDA divides by a scalar as a multiplication by its reciprocal).
NORMALIZE_TABLE = torch.from_numpy(np.stack([
    ((np.arange(256, dtype=np.float64) / 255.0 - m) / s).astype(np.float32)
    for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)
]))
_SOLARIZE_LUT = np.where(np.arange(256) < 128, np.arange(256),
                         255 - np.arange(256)).astype(np.uint8)


# -------------------------------------------------------------------------------------- geometry
def sample_crop_params(height, width, scale, ratio, rng=random):
    """(top, left, crop_h, crop_w), sampled exactly as torchvision's RandomResizedCrop.get_params.

    Area fraction ~ U[scale], aspect ratio log-uniform in `ratio`; 10 tries, then a centre crop
    clamped to the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pil_resize(img, out_w, out_h, box=None):
    """PIL's BILINEAR resize of a uint8 HxWx3 array (what torchvision's RandomResizedCrop / Resize
    run on PIL images): antialiased at every shrink factor, plain bilinear when enlarging.
    box=(x0, y0, x1, y1) resizes only that region of the image, with the filter taps reaching
    outside it exactly as in the full resize."""
    return np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.BILINEAR, box=box))


def antialiased_resize(img, out_w, out_h):
    """The same antialiased bilinear filter as `pil_resize` (torch's uint8 kernel, a port of PIL's
    resampling with SIMD) on a uint8 HxWx3 array, about twice as fast. Its filter weights are
    rounded to fewer bits: 3 % of the values differ from PIL's by one grey level, 1 in 5 million
    by two (tests/test_faithful.py)."""
    # 1xHxWx3 seen as 1x3xHxW is channels_last: the layout torch's vectorised uint8 kernel takes
    # (the output is channels_last too: HxWx3 again without a copy; unsqueezing after the permute
    # would give the batch dimension a stride torch does not read as channels_last). A crop is
    # copied by numpy (rows of contiguous bytes), several times faster than torch's strided copy.
    x = torch.from_numpy(np.ascontiguousarray(img))[None].permute(0, 3, 1, 2)
    out = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


class RandomResizedCrop:
    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img, rng=random):
        top, left, h, w = sample_crop_params(img.shape[0], img.shape[1], self.scale, self.ratio,
                                             rng)
        # crop, then resize the crop (torchvision's resized_crop): the filter does not reach past
        # the crop edges
        return antialiased_resize(img[top : top + h, left : left + w], self.size, self.size)


class ResizeCenterCrop:
    """torchvision's Resize(resize) + CenterCrop(size) on a PIL image (evaluation), computing only
    the crop.

    Sizes and offsets follow torchvision: the shorter side becomes `resize`, the longer
    int(resize * long / short); the crop starts at int(round((new - size) / 2)). Only the centre
    size x size output pixels are resampled (PIL's box argument: the same filter centres and taps as
    the full resize)."""

    def __init__(self, resize, size):
        self.resize, self.size = resize, size

    def __call__(self, img, rng=random):
        h, w = img.shape[:2]
        if h <= w:
            new_h, new_w = self.resize, int(self.resize * w / h)
        else:
            new_h, new_w = int(self.resize * h / w), self.resize
        top = int(round((new_h - self.size) / 2.0))
        left = int(round((new_w - self.size) / 2.0))
        sx, sy = w / new_w, h / new_h  # input pixels per output pixel
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return pil_resize(img, self.size, self.size, box)


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img, rng=random):
        return cv2.flip(img, 1) if rng.random() < self.p else img


# -------------------------------------------------------------------------------------- photometric
def _gray(img):
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


# Each jitter op is one vectorised OpenCV pass over the uint8 image that rounds to the nearest grey
# level and saturates to [0, 255], as the look-up tables before them did (a LUT pass cost 2-3 of
# these: OpenCV's LUT is not vectorised).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # RGB -> grey (ITU-R 601-2), as PIL's "L" and cv2
# saturation's colour matrix is _EYE3 + (1 - factor) * _TO_GRAY_MINUS_EYE3 (every row: the grey
# weights)
_EYE3 = np.eye(3)
_TO_GRAY_MINUS_EYE3 = np.array([_GRAY_WEIGHTS] * 3) - _EYE3


def adjust_brightness(img, factor):
    # factor * x, rounded and saturated (factor >= 0: the "Abs" never acts)
    return cv2.convertScaleAbs(img, alpha=factor)


def adjust_contrast(img, factor):
    # Blend with the mean grey level of the image (torchvision/PIL both use the grayscale mean): the
    # grey weights applied to the channel means, no grey image needed
    red, green, blue, _ = cv2.mean(img)
    mean = _GRAY_WEIGHTS[0] * red + _GRAY_WEIGHTS[1] * green + _GRAY_WEIGHTS[2] * blue
    return cv2.addWeighted(img, factor, img, 0.0, (1.0 - factor) * mean)


def adjust_saturation(img, factor):
    """Blend every pixel with its grey level: factor * rgb + (1 - factor) * grey, as one 3x3 colour
    matrix. OpenCV's uint8 transform holds the matrix in 10-bit fixed point: <= 0.72 grey levels
    from the exact blend (5-11 % of the values one level off its nearest rounding); PIL's own blend
    rounds its grey image and truncates its output, a larger difference."""
    matrix = _EYE3 + (1.0 - factor) * _TO_GRAY_MINUS_EYE3
    return cv2.transform(img, matrix)


def adjust_hue(img, shift):
    """Rotate hue by `shift` turns (in [-0.5, 0.5]); HSV_FULL keeps hue in 256 steps instead of
    180, so the rotation is a uint8 addition that wraps around."""
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
    # add (step, 0, 0) to every pixel of a row at once: one contiguous vectorised addition per row,
    # twice as fast as adding to the strided hue channel
    step = np.uint8(int(round(shift * 256)) % 256)
    rows = hsv.reshape(hsv.shape[0], -1)
    rows += _hue_row(hsv.shape[1]) * step
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


@functools.cache
def _hue_row(width):
    """(1, 0, 0) repeated `width` times: a row of HSV pixels with only the hue set."""
    return np.tile(np.array([1, 0, 0], np.uint8), width)


class ColorJitter:
    """torchvision ColorJitter: factors U[max(0, 1-x), 1+x], hue U[-h, h], the four ops in random
    order."""

    def __init__(self, brightness, contrast, saturation, hue):
        self.brightness = self._range(brightness)
        self.contrast = self._range(contrast)
        self.saturation = self._range(saturation)
        self.hue = (-hue, hue) if hue > 0 else None

    @staticmethod
    def _range(x):
        return (max(0.0, 1.0 - x), 1.0 + x) if x > 0 else None

    def sample_params(self, rng=random):
        """[(op, factor), ...] in the random order they are applied."""
        ops = [
            (adjust_brightness, self.brightness),
            (adjust_contrast, self.contrast),
            (adjust_saturation, self.saturation),
            (adjust_hue, self.hue),
        ]
        rng.shuffle(ops)
        return [(op, rng.uniform(*bounds)) for op, bounds in ops if bounds is not None]

    def __call__(self, img, rng=random):
        for op, factor in self.sample_params(rng):
            img = op(img, factor)
        return img


class RandomGrayscale:
    def __init__(self, p):
        self.p = p

    def __call__(self, img, rng=random):
        return cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB) if rng.random() < self.p else img


class GaussianBlur:
    """Blur with sigma ~ U[sigma_range]; like PIL's GaussianBlur(radius=sigma) used by the official
    code."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img, rng=random):
        sigma = rng.uniform(*self.sigma)
        # Kernel of +-3 sigma (odd size), applied separably in floating point: twice as fast as
        # cv2.GaussianBlur's bit-exact fixed point on uint8, and closer to the exact filter
        ksize = 2 * int(math.ceil(3.0 * sigma)) + 1
        kernel = cv2.getGaussianKernel(ksize, sigma)
        return cv2.sepFilter2D(img, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)


class Solarize:
    """Invert pixels >= threshold (PIL ImageOps.solarize with threshold 128)."""

    def __call__(self, img, rng=random):
        return cv2.LUT(img, _SOLARIZE_LUT)


class RandomApply:
    def __init__(self, op, p):
        self.op, self.p = op, p

    def __call__(self, img, rng=random):
        return self.op(img, rng) if rng.random() < self.p else img


def to_chw_tensor(img):
    """uint8 HxWx3 RGB array -> uint8 3xHxW tensor (what a worker sends; `normalize` on the
    device)."""
    chw = np.empty((3,) + img.shape[:2], np.uint8)
    # cv2.split writes the three planes into chw's rows: a vectorised de-interleave, 5x numpy's
    # strided transpose copy
    cv2.split(img, [chw[0], chw[1], chw[2]])
    return torch.from_numpy(chw)


@functools.cache
def _normalize_table(device):
    return NORMALIZE_TABLE.to(device)  # once per device: no host-to-device copy in every step


def normalize(images):
    """The data loader's uint8 Nx3xHxW images -> float32 (x / 255 - mean) / std (ImageNet), on
    their device and in their memory layout (channels_last stays channels_last).

    Call it after `.to(device, non_blocking=True)`: the copy moves a quarter of float32's bytes.
    The values are NORMALIZE_TABLE's, bit for bit what the workers wrote when they normalised."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise TypeError("expected uint8 images of shape Nx3xHxW (the data loader's batches), got "
                        f"{images.dtype} {tuple(images.shape)}")
    table = _normalize_table(images.device)
    # row c of the table holds channel c: index c * 256 + x of the flattened table
    offsets = torch.arange(0, 3 * 256, 256, device=images.device).view(1, 3, 1, 1)
    return table.view(-1)[images.long().add_(offsets)]


class Compose:
    """Apply uint8 ops in order, then make a uint8 CHW tensor."""

    def __init__(self, ops):
        self.ops = list(ops)

    def __call__(self, img, rng=random):
        img = _as_rgb_uint8(img)
        for op in self.ops:
            img = op(img, rng)
        return to_chw_tensor(img)

    def __repr__(self):
        return "Compose(" + ", ".join(type(op).__name__ for op in self.ops) + ")"


def _as_rgb_uint8(img):
    if (not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3
            or img.shape[2] != 3):
        desc = f"{type(img).__name__} {getattr(img, 'dtype', '')} {getattr(img, 'shape', '')}"
        raise TypeError(f"expected an RGB uint8 numpy image of shape HxWx3, got {desc}")
    return img


class TwoViewTransform:
    """Two independently augmented views of one image (the query and key of MoCo)."""

    def __init__(self, view1, view2):
        self.view1, self.view2 = view1, view2

    def __call__(self, img):
        return self.view1(img), self.view2(img)

    def __repr__(self):
        return f"TwoViewTransform(view1={self.view1!r}, view2={self.view2!r})"


# -------------------------------------------------------------------------------------- recipes
OFFICIAL_SIZE = 224
OFFICIAL_BLUR_SIGMA = (0.1, 2.0)


def blur_sigma(size):
    """The official blur sigma range (pixels, tuned for 224 px crops) scaled to `size` px crops.

    A blur is a fraction of the object, not a number of pixels: sigma 2 px at 224 px keeps an
    object's outline, the same 2 px on a 32 px crop (14 px at 224) wipes most of it out in half of
    the views. At 224 px this is the official (0.1, 2.0); below it, the same blur relative to the
    image."""
    scale = size / OFFICIAL_SIZE
    return (OFFICIAL_BLUR_SIGMA[0] * scale, OFFICIAL_BLUR_SIGMA[1] * scale)


def _moco_v1(size, crop_scale=(0.2, 1.0)):
    # MoCo v1 (main_moco.py without --aug-plus): grayscale before an always-on jitter.
    view = Compose([
        RandomResizedCrop(size, scale=crop_scale),
        RandomGrayscale(0.2),
        ColorJitter(0.4, 0.4, 0.4, 0.4),
        RandomHorizontalFlip(),
    ])
    return view, view


def _moco_v2(size, crop_scale=(0.2, 1.0)):
    # MoCo v2 "aug+", following SimCLR: jitter p=0.8, grayscale, blur p=0.5.
    view = Compose([
        RandomResizedCrop(size, scale=crop_scale),
        RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8),
        RandomGrayscale(0.2),
        RandomApply(GaussianBlur(blur_sigma(size)), p=0.5),
        RandomHorizontalFlip(),
    ])
    return view, view


def _moco_v3(size, crop_scale=(0.08, 1.0)):
    # MoCo v3 (BYOL recipe): asymmetric blur / solarize between the two views.
    def view(blur_p, solarize_p):
        return Compose([
            RandomResizedCrop(size, scale=crop_scale),
            RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8),
            RandomGrayscale(0.2),
            RandomApply(GaussianBlur(blur_sigma(size)), p=blur_p),
            RandomApply(Solarize(), p=solarize_p),
            RandomHorizontalFlip(),
        ])

    return view(blur_p=1.0, solarize_p=0.0), view(blur_p=0.1, solarize_p=0.2)


# version -> builder(size[, crop_scale]) -> (view1 transform, view2 transform); crop_scale defaults
# to the official recipe's RandomResizedCrop area range
TWO_VIEW_RECIPES = {
    "v1": _moco_v1,
    "v2": _moco_v2,
    "v3": _moco_v3,
}


def build_two_view_transform(version: str, size: int, crop_scale=None):
    """Callable: RGB uint8 HxWx3 numpy image -> (view1, view2) uint8 CHW tensors (`normalize` them
    on the device).

    crop_scale: RandomResizedCrop's (min, max) area fraction; None = the official recipe's."""
    if version not in TWO_VIEW_RECIPES:
        raise ValueError(f"unknown MoCo augmentation version {version!r}; expected one of "
                         f"{sorted(TWO_VIEW_RECIPES)}")
    kwargs = {"crop_scale": tuple(crop_scale)} if crop_scale else {}
    view1, view2 = TWO_VIEW_RECIPES[version](int(size), **kwargs)
    return TwoViewTransform(view1, view2)


def build_eval_transform(size: int):
    """Resize the shorter side to round(size * 256 / 224), centre-crop `size` (one uint8 CHW
    tensor)."""
    size = int(size)
    return Compose([ResizeCenterCrop(int(round(size * 256 / 224)), size)])


def build_linear_train_transform(size: int, crop_scale=None):
    """Linear-classification / supervised training augmentation: RandomResizedCrop (scale 0.08-1
    unless crop_scale is given) + flip."""
    size = int(size)
    crop = (RandomResizedCrop(size, scale=tuple(crop_scale)) if crop_scale
            else RandomResizedCrop(size))
    return Compose([crop, RandomHorizontalFlip()])
