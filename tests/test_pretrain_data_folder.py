"""SafeImageFolder (bad files across workers, layout errors), read_rgb, and build_loader
determinism."""
import os

import cv2
import numpy as np
import pytest
import torch

from mocobench.utils.errors import UsageError
from pretrain.augment import build_two_view_transform
from pretrain.data import SafeImageFolder, TooManyBadImagesError, build_loader, read_rgb


def write_folder(root, classes=2, per_class=50, size=10, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
            path = os.path.join(root, f"class_{c}", f"img_{i:03d}.jpg")
            assert cv2.imwrite(path, img)
            paths.append(path)
    return paths


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def junk(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())


def to_array(x):
    return torch.from_numpy(np.ascontiguousarray(x)).float().mean()


def test_read_rgb_returns_rgb_and_rejects_bad_files(tmp_path):
    img = np.zeros((6, 8, 3), np.uint8)
    img[..., 0] = 250  # red in RGB
    png = str(tmp_path / "red.png")
    cv2.imwrite(png, img[..., ::-1])  # cv2 writes BGR
    out = read_rgb(png)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8 and out[0, 0].tolist() == [250, 0, 0]
    paths = write_folder(str(tmp_path / "f"), classes=1, per_class=3, size=32)
    truncate(paths[0])
    junk(paths[1])
    for bad in paths[:2]:
        with pytest.raises((OSError, ValueError)):
            read_rgb(bad)
    open(paths[2], "wb").close()
    with pytest.raises(ValueError, match="empty"):
        read_rgb(paths[2])


def test_trailing_bytes_after_jpeg_end_are_accepted(tmp_path):
    path = write_folder(str(tmp_path), classes=1, per_class=1, size=16)[0]
    with open(path, "ab") as f:
        f.write(b"\x00" * 100 + b"camera trailer")
    assert read_rgb(path).shape == (16, 18, 3)


def _pil_rgb(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode, subsampling", [("RGB", 2), ("RGB", 0), ("L", -1)])
def test_jpegs_decode_to_pil_s_pixels(tmp_path, mode, subsampling):
    """read_rgb's JPEG decoder (simplejpeg) gives exactly the pixels of PIL's decode, the one
    torchvision's ImageFolder runs: 4:2:0 and 4:4:4 chroma, and a greyscale JPEG as RGB."""
    from PIL import Image

    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8), (5, 5), 1.5)
    path = str(tmp_path / "a.jpg")
    Image.fromarray(img).convert(mode).save(path, quality=90, subsampling=subsampling)
    ours = read_rgb(path)
    assert ours.shape == (45, 70, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, _pil_rgb(path))


def test_a_jpeg_with_a_libjpeg_warning_is_decoded(tmp_path):
    """Bytes before the end marker make libjpeg warn ("extraneous bytes"): the strict fast decoder
    refuses the file, PIL decodes it, as torchvision's ImageFolder would (not a bad image)."""
    path = write_folder(str(tmp_path), classes=1, per_class=1, size=16)[0]
    data = open(path, "rb").read()
    assert data.endswith(b"\xff\xd9")
    with open(path, "wb") as f:
        f.write(data[:-2] + b"\x00\x00\x00" + data[-2:])
    assert np.array_equal(read_rgb(path), _pil_rgb(path))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("corrupt", [truncate, junk])
def test_bad_image_is_replaced_and_counted(tmp_path, num_workers, corrupt):
    paths = write_folder(str(tmp_path))  # 100 images: 1 bad is exactly 1 %, still allowed
    corrupt(paths[7])
    dataset = SafeImageFolder(str(tmp_path), transform=lambda img: img.astype(np.float32).mean())
    assert len(dataset) == 100 and dataset.classes == ["class_0", "class_1"]
    loader = build_loader(dataset, batch_size=16, num_workers=num_workers, shuffle=False,
                          drop_last=False)
    samples, targets = [], []
    for sample, target in loader:
        samples.append(sample)
        targets.append(target)
    samples, targets = torch.cat(samples), torch.cat(targets)
    assert len(samples) == 100 and torch.isfinite(samples).all()
    assert samples[7] == samples[8]  # index 7 was replaced by the next readable image
    assert targets.tolist() == [0] * 50 + [1] * 50
    # Recorded in shared memory by the worker, visible here in the main process.
    assert dataset.num_bad == 1 and dataset.bad_files() == [paths[7]]
    assert dataset.check_bad_fraction() == 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_more_than_one_percent_bad_is_a_clear_error(tmp_path, num_workers):
    paths = write_folder(str(tmp_path))
    truncate(paths[3])
    junk(paths[60])
    dataset = SafeImageFolder(str(tmp_path), transform=None)
    loader = build_loader(dataset, batch_size=10, num_workers=num_workers, shuffle=False,
                          drop_last=False)
    loader.collate_fn = lambda batch: batch
    with pytest.raises(TooManyBadImagesError, match=r"2 of 100 images are unreadable") as info:
        for _ in loader:
            pass
    assert "img_003.jpg" in str(info.value) and "img_010.jpg" in str(info.value)


def test_check_bad_fraction_uses_the_fraction_seen(tmp_path):
    paths = write_folder(str(tmp_path))
    truncate(paths[0])
    dataset = SafeImageFolder(str(tmp_path), transform=None)
    for i in range(20):  # 1 bad out of the 20 seen: 5 %
        dataset[i]
    with pytest.raises(TooManyBadImagesError, match=r"1 of 20 images.*img_000.jpg"):
        dataset.check_bad_fraction()


def test_layout_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nope" / "train")
    with pytest.raises(UsageError, match=r"nope/train.*ROOT/train/<class>/\*\.jpg"):
        SafeImageFolder(missing, transform=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no class subdirectories.*ROOT/train/<class>"):
        SafeImageFolder(str(tmp_path / "empty"), transform=None)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match=r"hold no images.*cat"):
        SafeImageFolder(str(tmp_path / "noimg"), transform=None)


def _epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(torch.stack([v1, v2]), target) for (v1, v2), target in loader]


def test_loader_is_deterministic_across_worker_counts_and_resume(tmp_path):
    write_folder(str(tmp_path), classes=2, per_class=12, size=20)
    transform = build_two_view_transform("v2", 16)
    runs = {}
    for workers in (0, 2):
        dataset = SafeImageFolder(str(tmp_path), transform)
        loader = build_loader(dataset, batch_size=8, num_workers=workers, shuffle=True,
                              drop_last=True, seed=5)
        runs[workers] = [_epoch_batches(loader, 0), _epoch_batches(loader, 1)]
    # A fresh loader that starts at epoch 1 (a resume) sees exactly what the continuing run saw.
    resumed = build_loader(SafeImageFolder(str(tmp_path), transform), 8, 0, shuffle=True,
                           drop_last=True, seed=5)
    resumed_epoch1 = _epoch_batches(resumed, 1)
    for a, b in [(runs[0][0], runs[2][0]), (runs[0][1], runs[2][1]), (runs[0][1], resumed_epoch1)]:
        assert len(a) == len(b) == 3
        for (views_a, t_a), (views_b, t_b) in zip(a, b):
            assert torch.equal(t_a, t_b) and torch.equal(views_a, views_b)
    assert not torch.equal(runs[0][0][0][1], runs[0][1][0][1]) or \
        not torch.equal(runs[0][0][0][0], runs[0][1][0][0])


def test_distributed_loader_shards(tmp_path, monkeypatch):
    write_folder(str(tmp_path), classes=2, per_class=10, size=8)
    dataset = SafeImageFolder(str(tmp_path), transform=None)
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, r=rank: r)
        loader = build_loader(dataset, 5, 0, shuffle=True, drop_last=True, distributed=True, seed=1)
        loader.sampler.set_epoch(3)
        seen.append(list(iter(loader.sampler)))
    assert len(seen[0]) == len(seen[1]) == 10 and not set(seen[0]) & set(seen[1])


def test_workers_send_uint8_views_a_quarter_of_the_float32_bytes(tmp_path, monkeypatch):
    """A batch of two v2 views as it leaves a DataLoader worker (through shared memory): uint8,
    3 x 32 x 32 bytes per view and image; the former float32 normalised views of the same batch
    (same seed, same augmentations) took 4 times the bytes and equal `normalize` of the new ones
    bit for bit."""
    from conftest import float_worker_views

    from pretrain import augment

    write_folder(str(tmp_path), classes=2, per_class=8, size=40)

    def first_batch():
        dataset = SafeImageFolder(str(tmp_path), build_two_view_transform("v2", 32))
        loader = build_loader(dataset, batch_size=8, num_workers=1, seed=3)
        loader.sampler.set_epoch(0)
        (view1, view2), _ = next(iter(loader))
        assert view1.is_shared() and view2.is_shared()  # they came from the worker
        return view1, view2, sum(v.untyped_storage().nbytes() for v in (view1, view2))

    *views, sent = first_batch()
    assert all(v.dtype == torch.uint8 and v.shape == (8, 3, 32, 32) for v in views)
    assert sent == 2 * 8 * 3 * 32 * 32
    monkeypatch.setattr(augment, "to_chw_tensor", float_worker_views)  # the workers fork after
    *former_views, former_sent = first_batch()
    assert former_sent == 4 * sent
    for former, view in zip(former_views, views):
        assert former.dtype == torch.float32 and torch.equal(former, augment.normalize(view))
