"""Safe I/O: atomic writes never tear a file, loaders never run code from one."""
import os
import pickle

import numpy as np
import pytest
import torch

from mocobench.errors import UsageError
from mocobench.fileio import atomic_torch_save, atomic_write, load_checkpoint, safe_unpickle


def test_atomic_write_keeps_old_file_and_leaves_no_temp_on_error(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(path) as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("crash mid-write")
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pth"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file when unpickled


def test_loaders_refuse_code_and_name_the_file(tmp_path):
    marker = tmp_path / "pwned"
    bad_pth, bad_pkl = tmp_path / "bad.pth", tmp_path / "bad.pkl"
    torch.save({"state_dict": _Payload(str(marker))}, bad_pth)
    bad_pkl.write_bytes(pickle.dumps({"model": _Payload(str(marker))}))
    for load, path in ((load_checkpoint, bad_pth), (safe_unpickle, bad_pkl)):
        with pytest.raises(UsageError, match=f"refusing to load '{path}'"):
            load(path)
    assert not marker.exists()


def test_safe_unpickle_reads_arrays_and_reports_truncation(tmp_path):
    path = tmp_path / "w.pkl"
    data = pickle.dumps({"model": {"stem.conv1.weight": np.arange(6.0).reshape(2, 3)}, "__author__": "MOCO"})
    path.write_bytes(data)
    assert np.array_equal(safe_unpickle(path)["model"]["stem.conv1.weight"], np.arange(6.0).reshape(2, 3))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="not a readable pickle"):
        safe_unpickle(path)
    (tmp_path / "t.pth").write_text("hello")
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "t.pth")
