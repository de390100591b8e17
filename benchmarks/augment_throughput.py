"""Two-view MoCo v2 (aug+) throughput: our pipeline (OpenCV uint8 ops, torch's antialiased uint8
resize, uint8 CHW output that the training step normalises on its device) vs the official PIL +
torchvision recipe (float32 normalised output); and the evaluation transform (Resize 256 +
CenterCrop 224) against torchvision's.

One worker, one thread (cv2.setNumThreads(1), torch.set_num_threads(1)): what one DataLoader worker
does per image, JPEG decode included. Variants are interleaved over several rounds so machine noise
hits both alike; medians are printed with the ratio (ours / official) and the median of the
per-round ratios. Ratios are what to compare across machines: both sides of a ratio are measured in
the same run, interleaved, so a loaded machine slows both alike. On a machine shared with other jobs
`--clock cpu` (this process's CPU time; one thread, so the same as wall time on a quiet machine) is
the steadier figure.

    python benchmarks/augment_throughput.py [--rounds 7] [--images 64] [--clock wall|cpu]

Measured 2026-12-07 on the 2-core development machine while other jobs ran (load 2.5-4), 9 rounds:
224 px 4.53x and 4.68x (CPU clock, two runs), 4.70x (wall clock); 64 px 5.48x and 5.68x (CPU),
5.55x (wall); the evaluation transform 1.6x. The code before the decode and jitter changes of
issue 22, a minute later on the same machine: 3.86x and 4.55x (CPU clock). Per image at 224 px (CPU
time of each op, two views): JPEG decode 0.83 ms (was 0.95 with OpenCV's decoder), two crops
0.57 ms, jitter 0.50 ms (was 0.78 with look-up tables; hue is half of it), CHW copies 0.15 ms, blur
0.14 ms; the official recipe 10.3 ms per image.
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pretrain.augment import build_eval_transform, build_two_view_transform  # noqa: E402
from pretrain.data import read_rgb  # noqa: E402


class PILGaussianBlur:
    """The official MoCo v2 blur: PIL GaussianBlur with radius = sigma ~ U[0.1, 2.0]."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def official_two_view(size):
    view = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([PILGaussianBlur((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])

    def load(path):
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return view(img), view(img)

    return load


def ours_two_view(size):
    two_view = build_two_view_transform("v2", size)
    return lambda path: two_view(read_rgb(path))


def official_eval(size):
    view = transforms.Compose([
        transforms.Resize(round(size * 256 / 224)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])

    def load(path):
        with open(path, "rb") as f:
            return view(Image.open(f).convert("RGB"))

    return load


def ours_eval(size):
    transform = build_eval_transform(size)
    return lambda path: transform(read_rgb(path))


def photo_like_image(rng, height, width):
    """Smooth random colour field plus a few shapes and mild noise: compresses like a photo, not
    like noise."""
    coarse = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3),
                          dtype=np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(img, center, int(rng.integers(5, max(6, width // 4))), color, -1)
    noise = rng.normal(0, 8, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def write_jpegs(directory, count, height, width, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        # Vary the size by +-10 % like a real photo collection.
        h = int(height * rng.uniform(0.9, 1.1))
        w = int(width * rng.uniform(0.9, 1.1))
        path = os.path.join(directory, f"img_{i:04d}.jpg")
        Image.fromarray(photo_like_image(rng, h, w)).save(path, quality=90)
        paths.append(path)
    return paths


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def images_per_second(load, paths, clock=time.perf_counter):
    start = clock()
    for path in paths:
        load(path)
    return len(paths) / (clock() - start)


def run_case(name, size, image_hw, count, rounds, ours=ours_two_view, official=official_two_view,
             clock=time.perf_counter):
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(tmp, count, *image_hw)
        mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        variants = {"ours": ours(size), "official (PIL+torchvision)": official(size)}
        for load in variants.values():  # warm-up: page cache, lazy imports, allocator
            images_per_second(load, paths[:8])
        results = {k: [] for k in variants}
        for _ in range(rounds):
            for key, load in variants.items():
                results[key].append(images_per_second(load, paths, clock))
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"\n{name}: {size} px from ~{image_hw[1]}x{image_hw[0]} JPEGs ({mean_kb:.0f} KiB mean), "
          f"{count} images x {rounds} rounds")
    for key, values in results.items():
        spread = f"min {min(values):.0f} / max {max(values):.0f}"
        print(f"  {key:<28} median {medians[key]:8.1f} img/s   ({spread})")
    ratio = medians["ours"] / medians["official (PIL+torchvision)"]
    per_round = statistics.median(a / b for a, b in zip(*results.values()))
    print(f"  ratio ours/official: {ratio:.2f}x (median of the per-round ratios {per_round:.2f}x)")
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=64, help="images per round")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time (a quiet machine); cpu: CPU time of this process "
                             "(steadier on a machine shared with other jobs)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    random.seed(0)
    print(f"torch {torch.__version__}, opencv {cv2.__version__}, single worker, single thread, "
          f"{args.clock} clock")
    ratios = {
        "224 px": run_case("ImageNet-like, two v2 views", 224, (350, 400), args.images,
                           args.rounds, clock=clock),
        "64 px": run_case("small, two v2 views", 64, (80, 80), args.images * 4, args.rounds,
                          clock=clock),
    }
    evaluation = run_case("evaluation transform", 224, (375, 500), args.images, args.rounds,
                          ours_eval, official_eval, clock)
    print("\nsummary (training augmentation, target >= 4.0x): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
          + f"; evaluation transform {evaluation:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
