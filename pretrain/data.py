"""Image folders that survive bad files, and the data loader used by pretraining and linear
evaluation.

Layout (torchvision ImageFolder): ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg; classes are
the sorted subdirectory names.

Bad files. A corrupt or unreadable image is replaced by the next readable one (so a long run does
not die on one broken JPEG out of a million), logged once, and recorded. The record lives in a
shared-memory status array (one byte per image: unseen / ok / bad) created at construction, so every
DataLoader worker (fork, spawn, persistent) writes to the same array and the main process can read
it: `dataset.bad_files()`, `dataset.check_bad_fraction()`. We chose this over a validation pass at
construction because only a full decode catches truncated JPEGs, and decoding 1.28 M ImageNet files
up front costs as much as an epoch.
More than `max_bad_fraction` (1 %) bad images means the data is broken, not noisy: the worker that
sees the bad image past that count raises TooManyBadImagesError (the DataLoader re-raises it in the
main process), and `check_bad_fraction()` (called by the training loop after an epoch) applies the
same rule to the fraction seen so far.

Determinism. `build_loader(..., seed)` makes the sample order a function of (seed, epoch) and the
augmentation of each sample a function of (seed, epoch, index), whatever the number of workers: an
exact resume needs only the epoch number.
"""
import itertools
import logging
import os
import random

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mocobench.utils.errors import UsageError

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT_HINT = ("expected ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg "
               "(one subdirectory per class)")

_UNSEEN, _OK, _BAD = 0, 1, 2


class TooManyBadImagesError(UsageError):
    """More than the allowed fraction of a dataset's images are unreadable."""

    every_rank = False  # seen in this rank's shard: the others may not know (run_main)


def read_rgb(path):
    """Decode an image file to an RGB uint8 HxWx3 array; raise ValueError/OSError when it is not
    readable.

    JPEGs: libjpeg-turbo through simplejpeg, straight to RGB: the same pixels as PIL's decode (the
    one torchvision's ImageFolder runs), and ~25 % faster than OpenCV's, whose bundled libjpeg-turbo
    is built without its SIMD code (benchmarks/augment_throughput.py). Its strict mode raises on
    libjpeg's warnings (a truncated file among them, which OpenCV silently fills with grey); such a
    file is then decoded by PIL, which raises on truncation and accepts the harmless warnings.
    Other formats: OpenCV, then PIL. EXIF orientation is ignored, as PIL's loader in torchvision's
    ImageFolder does.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise ValueError("empty file")
    if data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            return _read_rgb_pil(path)
    img = cv2.imdecode(np.frombuffer(data, np.uint8),
                       cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    return _read_rgb_pil(path) if img is None else img


def _read_rgb_pil(path):
    with Image.open(path) as pil_image:
        return np.asarray(pil_image.convert("RGB"))


def _class_folders(root):
    """(root, its class folder names, sorted); UsageError when it is no ImageFolder root."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UsageError(f"image folder {root!r} does not exist; {LAYOUT_HINT}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UsageError(f"image folder {root!r} has no class subdirectories; {LAYOUT_HINT}")
    return root, classes


def find_images(root):
    """(classes, [(path, class_index), ...]) for ROOT/<class>/**/<image>, sorted like torchvision's
    ImageFolder."""
    root, classes = _class_folders(root)
    samples, empty = [], []
    for class_index, name in enumerate(classes):
        found = []
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            empty.append(name)
        samples += [(path, class_index) for path in found]
    if empty:
        raise UsageError(
            f"image folder {root!r}: {len(empty)} class folder(s) hold no images with extensions "
            f"{', '.join(IMG_EXTENSIONS)} (e.g. {', '.join(empty[:3])}); {LAYOUT_HINT}"
        )
    return classes, samples


def _first_image(folder):
    """The first image under `folder` (depth first, sorted), or None; stops at it (an ImageNet class
    holds ~1300)."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMG_EXTENSIONS):
                return os.path.join(dirpath, f)
    return None


def check_image_folder(root):
    """What find_images would refuse, without listing every image: ROOT has class folders, each
    holds at least one image, and the first one decodes. For a check before a run starts."""
    root, classes = _class_folders(root)
    first = None
    for name in classes:
        found = _first_image(os.path.join(root, name))
        if found is None:
            raise UsageError(f"image folder {root!r}: class folder {name!r} holds no images with "
                             f"extensions {', '.join(IMG_EXTENSIONS)}; {LAYOUT_HINT}")
        first = first or found
    try:
        read_rgb(first)
    except Exception as e:  # noqa: BLE001 - cv2 / PIL: any failure means it does not decode
        raise UsageError(f"image folder {root!r}: {first!r} does not decode as an image "
                         f"({type(e).__name__}: {e})") from None
    return len(classes)


class SafeImageFolder(Dataset):
    """ImageFolder that replaces unreadable images by the next readable one and counts them across
    workers.

    Returns (transform(rgb_uint8_image), class_index); with a two-view transform the sample is
    (view1, view2).
    """

    def __init__(self, root, transform=None, max_bad_fraction=0.01, seed=None, loader=read_rgb):
        self.root = os.fspath(root)
        self.transform = transform
        self.loader = loader
        self.max_bad_fraction = max_bad_fraction
        self.classes, self.samples = find_images(self.root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = [target for _, target in self.samples]
        # Shared memory: written by whichever process loads the image, read by all.
        self._status = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        # With a seed, each sample's augmentation is a function of (seed, epoch, index);
        # build_loader sets it.
        self.seed = seed

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        """Visible to running workers (shared memory); build_loader's sampler calls it every
        epoch."""
        self._epoch[0] = int(epoch)

    def __getitem__(self, index):
        img, target = self._load_readable(index)
        if self.seed is not None:
            random.seed((int(self.seed) << 72) | (int(self._epoch[0]) << 40) | int(index))
        sample = self.transform(img) if self.transform is not None else img
        return sample, target

    def _load_readable(self, index):
        n = len(self.samples)
        status = self._status.numpy()
        for offset in range(n):
            i = (index + offset) % n
            if status[i] == _BAD:
                continue
            path, target = self.samples[i]
            try:
                img = self.loader(path)
            except Exception as e:  # noqa: BLE001 - any decoder failure means "bad file"
                self._record_bad(i, e)
                continue
            status[i] = _OK
            return img, target
        raise TooManyBadImagesError(f"image folder {self.root!r}: none of its {n} images is "
                                    "readable")

    def _record_bad(self, i, error):
        status = self._status.numpy()
        status[i] = _BAD
        path = self.samples[i][0]
        logger.warning("unreadable image %s (%s: %s); using the next readable one instead",
                       path, type(error).__name__, error)
        bad = int(np.count_nonzero(status == _BAD))
        if bad > self.max_bad_fraction * len(self.samples):
            raise TooManyBadImagesError(self._too_many_message(bad, len(self.samples)))

    # -- reporting (any process) --
    def bad_files(self):
        return [self.samples[i][0] for i in np.flatnonzero(self._status.numpy() == _BAD)]

    @property
    def num_bad(self):
        return int(np.count_nonzero(self._status.numpy() == _BAD))

    def check_bad_fraction(self):
        """Raise TooManyBadImagesError if more than max_bad_fraction of the images seen so far were
        bad.

        Call it after an epoch (each rank sees its shard: bad/seen is then an estimate over that
        shard). Returns the number of bad files otherwise.
        """
        status = self._status.numpy()
        bad = int(np.count_nonzero(status == _BAD))
        seen = int(np.count_nonzero(status != _UNSEEN))
        if bad and (bad > self.max_bad_fraction * len(status)
                    or bad > self.max_bad_fraction * seen):
            raise TooManyBadImagesError(self._too_many_message(bad, seen))
        return bad

    def _too_many_message(self, bad, out_of):
        examples = ", ".join(self.bad_files()[:5])
        return (
            f"image folder {self.root!r}: {bad} of {out_of} images are unreadable (more than "
            f"{self.max_bad_fraction:.0%}); the data is broken, not noisy. Bad files include: "
            f"{examples}"
        )


class EpochShuffleSampler(DistributedSampler):
    """DistributedSampler (also for a single process) that keeps the dataset's epoch in step.

    The order is a function of (seed, epoch). set_epoch() before each epoch is the caller's job, as
    with DistributedSampler; if it is forgotten the epoch still advances by one per pass instead of
    repeating the same permutation.
    """

    start_index = 0

    def __iter__(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        indices = super().__iter__()
        self.epoch += 1
        if self.start_index:  # an exact mid-epoch resume: the rest of this epoch's order, once
            indices, self.start_index = itertools.islice(indices, self.start_index, None), 0
        return indices

    def skip(self, num_indices):
        """The next pass starts after its first num_indices indices (pretrain.resume)."""
        self.start_index = int(num_indices)

    def set_epoch(self, epoch):
        self.epoch = epoch


def worker_init_fn(worker_id):
    """Seed `random` and numpy from the worker's torch seed (base_seed + worker_id, drawn from the
    loader's generator), so a loader built with the same seed produces the same random streams;
    leave stop signals to the main process (mocobench.utils.preempt)."""
    from mocobench.utils.preempt import ignore_in_worker

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    # SIGTERM / Ctrl-C reach the whole process group; the main process saves and stops
    ignore_in_worker()


def build_loader(dataset, batch_size, num_workers, shuffle=True, drop_last=True, distributed=False,
                 seed=0):
    """DataLoader over `dataset`: per-rank shard when distributed, pinned memory on CUDA, persistent
    workers.

    The sampler is `loader.sampler` (an EpochShuffleSampler): call `loader.sampler.set_epoch(epoch)`
    before each epoch. A dataset with a `seed` attribute left at None gets `seed`, making its
    augmentations reproducible per (seed, epoch, index).
    """
    if distributed:
        sampler = EpochShuffleSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    else:
        sampler = EpochShuffleSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
    if num_workers > 0:
        # The workers are the parallelism: OpenCV's own thread pool would oversubscribe the cores,
        # and calling cv2.setNumThreads inside a forked worker can deadlock on the parent's pool
        # (seen here). Turning the pool off in the parent before the workers fork is the safe place
        # (detectron2 does the same).
        cv2.setNumThreads(0)
    if getattr(dataset, "seed", False) is None:
        dataset.seed = seed
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=worker_init_fn,
        generator=generator,
    )
