"""Is the generated ImageNet stand-in learnable but not trivial? And how long does generation take?

Three linear/small probes on the object images (train -> val accuracy, chance = 1 / classes):
- colour histograms (joint 6x6x6 RGB + per-channel 16 bins) -> logistic regression: should stay
  near chance, because colour, texture and background are drawn alike for every class;
- HOG (gradient orientations on a grid) -> logistic regression: shapes leave a trace even without
  learning features;
- a tiny CNN trained from scratch for a few epochs: well above chance, still short of perfect.
Then times `synthesize` for the test and demo presets (one process; the files go to a temporary
directory).

    python benchmarks/synth_learnability.py [--classes 8] [--images-per-class 150] [--epochs 8]
"""
import argparse
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mocobench.utils.synth_meta import CLASS_NAMES  # noqa: E402
from synth.generate import synthesize  # noqa: E402


def load_split(root, split, class_names):
    images, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, "imagenet", split, name)
        for file in sorted(os.listdir(folder)):
            images.append(cv2.imread(os.path.join(folder, file))[..., ::-1])
            labels.append(label)
    return np.stack(images), np.array(labels)


def colour_histograms(images):
    q = (images // 43).astype(np.int64)  # 6 levels per channel
    joint = q[..., 0] * 36 + q[..., 1] * 6 + q[..., 2]
    feats = [np.stack([np.bincount(j.ravel(), minlength=216) for j in joint])]
    for c in range(3):
        feats.append(np.stack([np.bincount((im[..., c] // 16).ravel(), minlength=16)
                               for im in images]))
    return np.concatenate(feats, 1).astype(np.float32) / (images.shape[1] * images.shape[2])


def hog_features(images, cell=8, bins=9):
    """Histograms of unsigned gradient orientations per 8x8 cell (HOG without block
    normalisation)."""
    gray = images.astype(np.float32).mean(3)
    gy, gx = np.gradient(gray, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    orientation = ((np.arctan2(gy, gx) % np.pi) / np.pi * bins).astype(np.int64).clip(0, bins - 1)
    n, h, w = gray.shape
    cells = (np.arange(h)[:, None] // cell) * (w // cell) + np.arange(w)[None, :] // cell
    index = ((cells[None] * bins + orientation)
             + np.arange(n)[:, None, None] * (h // cell) * (w // cell) * bins)
    hist = np.bincount(index.ravel(), magnitude.ravel(),
                       minlength=n * (h // cell) * (w // cell) * bins)
    hist = hist.reshape(n, -1).astype(np.float32)
    return hist / (np.linalg.norm(hist, axis=1, keepdims=True) + 1e-6)


def logistic_regression(x_train, y_train, x_val, y_val, classes, steps=300):
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xv = torch.from_numpy((x_train - mean) / std), torch.from_numpy((x_val - mean) / std)
    yt = torch.from_numpy(y_train)
    layer = nn.Linear(xt.shape[1], classes)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(layer(xt), yt).backward()
        opt.step()
    with torch.no_grad():
        return float((layer(xv).argmax(1).numpy() == y_val).mean())


def tiny_cnn(x_train, y_train, x_val, y_val, classes, epochs):
    torch.manual_seed(0)

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))

    model = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))
    to_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    xt, xv, yt = to_tensor(x_train), to_tensor(x_val), torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            batch = xt[idx]
            flip = torch.rand(len(idx)) < 0.5  # cheap augmentation: flips keep the shape class
            batch[flip] = batch[flip].flip(3)
            opt.zero_grad()
            F.cross_entropy(model(batch), yt[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(xv).argmax(1).numpy() == y_val).mean())
        if epoch % 4 == 3:
            print(f"    tiny CNN epoch {epoch + 1}: val acc {acc:.3f}", flush=True)
    return acc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--images-per-class", type=int, default=150)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("test", "demo"):
            start = time.perf_counter()
            meta = synthesize(os.path.join(tmp, preset), preset=preset, seed=0)
            s = meta["splits"]
            print(f"synthesize preset={preset}: {time.perf_counter() - start:.1f} s "
                  f"({s['imagenet']['train'] + s['imagenet']['val']} object images "
                  f"at {meta['size']} px, "
                  f"{meta['scenes']} scenes at {meta['scene_size']} px, "
                  f"{sum(meta['objects'].values())} objects)")

        root = os.path.join(tmp, "probe")
        synthesize(root, seed=1, classes=args.classes, images_per_class=args.images_per_class,
                   val_per_class=args.val_per_class, scenes=4)
        names = list(CLASS_NAMES[:args.classes])
        x_train, y_train = load_split(root, "train", names)
        x_val, y_val = load_split(root, "val", names)

    print(f"probes: {args.classes} classes, {len(x_train)} train / {len(x_val)} val images, "
          f"chance = {1 / args.classes:.3f}")
    acc = logistic_regression(colour_histograms(x_train), y_train, colour_histograms(x_val), y_val,
                              args.classes)
    print(f"  colour histogram + logistic regression: val acc {acc:.3f}")
    acc = logistic_regression(hog_features(x_train), y_train, hog_features(x_val), y_val,
                              args.classes)
    print(f"  HOG + logistic regression:              val acc {acc:.3f}")
    start = time.perf_counter()
    acc = tiny_cnn(x_train, y_train, x_val, y_val, args.classes, args.epochs)
    print(f"  tiny CNN from scratch, {args.epochs} epochs:       val acc {acc:.3f} "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
