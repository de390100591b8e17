"""Safe I/O: atomic writes never tear a file, loaders never run code from one."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_torch_save, atomic_write, load_checkpoint, safe_unpickle


def test_atomic_write_keeps_old_file_and_leaves_no_temp_on_error(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(path) as f:
            f.write(b"half a checkpoint")
            raise RuntimeError("crash mid-write")
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pth"]


class _Abort(BaseException):
    """Neither an Exception nor a KeyboardInterrupt: what SystemExit or a GeneratorExit look like to
    a handler that catches Exception only."""


class _RaisesWhenPickled:
    def __init__(self, exc_type):
        self.exc_type = exc_type

    def __reduce__(self):
        raise self.exc_type("stopped while torch.save pickles")


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, _Abort], ids=["ctrl-c", "base-exception"])
@pytest.mark.parametrize("existed", [True, False], ids=["old-file", "no-file"])
def test_an_interrupted_write_keeps_the_old_file_or_none_and_leaves_no_temp(tmp_path, exc_type,
                                                                            existed):
    """Ctrl-C (KeyboardInterrupt) or any other BaseException inside the write: the target keeps
    its old bytes (or still does not exist) and no temporary file is left, for atomic_write and
    atomic_torch_save (which raises from inside torch.save's pickling)."""
    text, ckpt = tmp_path / "notes.txt", tmp_path / "ckpt.pth"
    if existed:
        text.write_bytes(b"old content\n")
        atomic_torch_save({"w": torch.ones(3)}, ckpt)
    names = sorted(os.listdir(tmp_path))
    with pytest.raises(exc_type):
        with atomic_write(text) as f:
            f.write(b"half of the new content")
            f.flush()
            assert any(n.endswith(".tmp") for n in os.listdir(tmp_path))  # the temp file exists
            raise exc_type("stopped mid-write")
    with pytest.raises(exc_type, match="stopped while torch.save pickles"):
        atomic_torch_save({"w": torch.zeros(3), "x": _RaisesWhenPickled(exc_type)}, ckpt)
    left = sorted(set(os.listdir(tmp_path)) - set(names))
    assert not left, f"the interrupted writes left {left}"  # no .tmp, no new target
    if existed:
        assert text.read_bytes() == b"old content\n"
        assert torch.equal(load_checkpoint(ckpt)["w"], torch.ones(3))
    else:
        assert names == []


def test_a_full_disk_is_a_one_line_error_naming_the_file_and_keeps_the_old_checkpoint(tmp_path):
    """A real refused write: the child runs under a 1 MiB file-size limit (EFBIG, what a full disk's
    ENOSPC looks like to the writer); torch.save reports it as a RuntimeError from its zip
    writer."""
    path = tmp_path / "checkpoint.pth.tar"
    atomic_torch_save({"w": torch.ones(3)}, path)
    child = (
        "import resource, signal, sys, torch\n"
        "from mocobench.utils.errors import UsageError\n"
        "from mocobench.utils.fileio import atomic_torch_save\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))\n"
        "try:\n"
        "    atomic_torch_save({'w': torch.zeros(2**20)}, sys.argv[1])\n"
        "except UsageError as e:\n"
        "    print(e)\n"
        "    sys.exit(2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"no room to write '{path}': the file-size limit is exceeded (")
    assert proc.stdout.count("\n") == 1
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


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
    data = pickle.dumps({"model": {"stem.conv1.weight": np.arange(6.0).reshape(2, 3)},
                         "__author__": "MOCO"})
    path.write_bytes(data)
    assert np.array_equal(safe_unpickle(path)["model"]["stem.conv1.weight"],
                          np.arange(6.0).reshape(2, 3))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="not a readable pickle"):
        safe_unpickle(path)
    (tmp_path / "t.pth").write_text("hello")
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "t.pth")
