"""Safe I/O: atomic writes never tear a file, loaders never run code from one, a run directory has
one writer (with flock, or a lock file where the file system has none)."""
import errno
import fcntl
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import (
    RunLock,
    atomic_torch_save,
    atomic_write,
    load_checkpoint,
    safe_unpickle,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ------------------------------------------------------------------------------------ run lock
def _no_flock(code=errno.ENOLCK):
    """fcntl.flock as on a file system without it (NFSv3 without lockd: ENOLCK; Lustre mounted
    without -o flock: ENOSYS / EOPNOTSUPP)."""
    def flock(fd, operation):
        raise OSError(code, os.strerror(code))
    return flock


# a second process on the same file system: flock fails the same way there
_LOCKER = """
import errno, fcntl, os, signal, sys
# a signal that the other process's liveness check sends reaches this owner whatever it inherits
# (under nohup SIGHUP is ignored): it says so instead of dying or going on unseen
for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, lambda signum, frame: print(f"signal {signum}", flush=True))
def flock(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
fcntl.flock = flock
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import RunLock
try:
    lock = RunLock(sys.argv[1])
except UsageError as e:
    print(e, flush=True)
    sys.exit(3)
print("locked", flush=True)
sys.stdin.readline()
lock.close()
"""


def _locker(directory):
    return subprocess.Popen([sys.executable, "-c", _LOCKER, str(directory)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP],
                         ids=["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_without_flock_a_lock_file_with_host_and_pid_locks_the_run(tmp_path, monkeypatch, code):
    monkeypatch.setattr(fcntl, "flock", _no_flock(code))
    lock = RunLock(str(tmp_path))
    owner = json.loads((tmp_path / RunLock.OWNER_NAME).read_text())
    assert (owner["host"], owner["pid"]) == (socket.gethostname(), os.getpid())
    assert owner["started"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / RunLock.OWNER_NAME).stat().st_mode & 0o777 == 0o644 & ~umask
    lock.close()
    assert not (tmp_path / RunLock.OWNER_NAME).exists()  # removed on close
    RunLock(str(tmp_path)).close()  # and the next run takes it


def test_without_flock_two_processes_still_exclude_each_other(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock())
    other = _locker(tmp_path)
    try:
        assert other.stdout.readline().strip() == "locked", other.stderr.read()
        with pytest.raises(UsageError) as refused:
            RunLock(str(tmp_path))
        message = str(refused.value)
        started = json.loads((tmp_path / RunLock.OWNER_NAME).read_text())["started"]
        # a live process on this host: wait for it (removing its lock file would be wrong)
        assert message == (
            f"another process (pid {other.pid} on {socket.gethostname()}, started {started}) is "
            f"writing into {str(tmp_path)!r} (lock file {tmp_path / RunLock.OWNER_NAME}: no flock "
            f"here, {os.strerror(errno.ENOLCK)}); wait for it to finish or stop it, or choose "
            "another output directory")
    finally:
        out, _ = other.communicate("\n", timeout=60)
    assert other.returncode == 0 and out == ""  # checked with signal 0: nothing was sent to it
    # the other way round: this process holds the run, the other one is refused
    lock = RunLock(str(tmp_path))
    try:
        other = _locker(tmp_path)
        out, err = other.communicate("\n", timeout=60)
        assert other.returncode == 3, err
        assert f"pid {os.getpid()} on {socket.gethostname()}" in out and "is writing into" in out
    finally:
        lock.close()


def test_without_flock_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setattr(fcntl, "flock", _no_flock())
    dead = _dead_pid()
    path = tmp_path / RunLock.OWNER_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead,
                                "started": "2024-01-01T00:00:00+00:00"}))
    lock = RunLock(str(tmp_path))
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"took over the stale lock file {path} of pid {dead} on "
                   f"{socket.gethostname()} (started 2024-01-01T00:00:00+00:00; no such process "
                   "any more)"]
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.close()
    assert not path.exists()


def test_without_flock_a_lock_file_of_another_host_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock())
    path = tmp_path / RunLock.OWNER_NAME
    text = json.dumps({"host": "node-17.cluster", "pid": _dead_pid(), "started": "yesterday"})
    path.write_text(text)
    with pytest.raises(UsageError) as refused:
        RunLock(str(tmp_path))
    message = str(refused.value)
    assert "\n" not in message and "node-17.cluster" in message and "is writing into" in message
    assert f"pid {json.loads(text)['pid']} on node-17.cluster" in message
    assert f"remove {str(path)!r}" in message
    assert path.read_text() == text


def test_a_held_flock_still_says_another_process_is_writing(tmp_path):
    lock = RunLock(str(tmp_path))
    try:
        other = _locker_with_flock(tmp_path)
        assert other.returncode == 3 and f"another process (pid {os.getpid()}) is writing into" \
            in other.stdout, other.stderr
    finally:
        lock.close()


def _locker_with_flock(directory):
    script = ("import sys\nfrom mocobench.utils.fileio import RunLock\n"
              "try:\n    RunLock(sys.argv[1]).close()\nexcept Exception as e:\n"
              "    print(e)\n    sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", script, str(directory)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                          timeout=60)


def test_without_flock_of_two_processes_that_found_a_stale_lock_file_the_later_is_refused(
        tmp_path, monkeypatch):
    """Two processes find the same stale lock file; the other one takes it over first (between
    this process's liveness check and its takeover): this one finds the new owner under the guard
    and is refused, naming it, as any writer it finds there."""
    from mocobench.utils import fileio

    monkeypatch.setattr(fcntl, "flock", _no_flock())
    path = tmp_path / RunLock.OWNER_NAME
    dead = _dead_pid()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead,
                                "started": "2024-01-01T00:00:00+00:00"}))
    others = []
    dead_here = fileio._dead_here

    def the_other_takes_over_after_the_check(owner):
        stale = dead_here(owner)
        if not others:
            others.append(_locker(tmp_path))
            lines = [others[0].stdout.readline().strip() for _ in range(2)]
            assert lines[0].startswith(f"took over the stale lock file {path} of pid {dead} ") \
                and lines[1] == "locked", others[0].stderr.read()
        return stale

    monkeypatch.setattr(fileio, "_dead_here", the_other_takes_over_after_the_check)
    try:
        with pytest.raises(UsageError) as refused:
            RunLock(str(tmp_path))
        [other] = others
        started = json.loads(path.read_text())["started"]
        assert str(refused.value) == (
            f"another process (pid {other.pid} on {socket.gethostname()}, started {started}) is "
            f"writing into {str(tmp_path)!r} (lock file {path}: no flock here, "
            f"{os.strerror(errno.ENOLCK)}); wait for it to finish or stop it, or choose another "
            "output directory")
        assert not (tmp_path / (RunLock.OWNER_NAME + ".takeover")).exists()
    finally:
        out, _ = others[0].communicate("\n", timeout=60)
    assert others[0].returncode == 0 and out == ""
    assert not path.exists()  # removed by its owner on close


def test_another_flock_error_is_not_reported_as_another_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock(errno.EIO))
    with pytest.raises(UsageError) as refused:
        RunLock(str(tmp_path))
    assert "cannot lock" in str(refused.value) and "another process" not in str(refused.value)


def test_pretrain_runs_on_a_file_system_without_flock(tiny_imagenet, tmp_path, monkeypatch,
                                                      capsys):
    from mocobench import cli

    monkeypatch.setattr(fcntl, "flock", _no_flock())
    out = tmp_path / "run"
    cfg = os.path.join(REPO, "configs", "pretrain", "synth_R18_cpu.yaml")
    opts = {"DATA.ROOT": tiny_imagenet, "OUTPUT_DIR": out, "SOLVER.EPOCHS": 1,
            "SOLVER.BATCH_SIZE": 16, "MOCO.K": 32, "INPUT.SIZE": 32,
            "DATALOADER.NUM_WORKERS": 0, "KNN.PERIOD": 0, "LOG_PERIOD": 2,
            "CHECKPOINT_PERIOD": 1, "MOCO.SHUFFLE_BN_SPLITS": 2, "DEVICE": "cpu"}
    argv = ["pretrain", "--config-file", cfg, *[str(x) for kv in opts.items() for x in kv]]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (out / "checkpoint_0000.pth.tar").is_file()
    assert not (out / RunLock.OWNER_NAME).exists()


@pytest.mark.parametrize("chain, why", [
    # torch's zip writer: a RuntimeError raised from (or while handling) the OSError
    (lambda: _raise(RuntimeError("zip writer failed"), OSError(errno.ENOSPC, "full")),
     "the device is full"),
    (lambda: _raise(RuntimeError("zip writer failed"), OSError(errno.EDQUOT, "quota"),
                    as_context=True), "the disk quota is exceeded"),
    (lambda: _raise(RuntimeError("outer"), _chained(ValueError("middle"),
                                                    OSError(errno.EFBIG, "big"))),
     "the file-size limit is exceeded"),
    (lambda: _raise(RuntimeError("zip writer failed"), OSError(errno.EIO, "I/O")), None),
])
def test_no_room_is_found_anywhere_in_the_chain_of_the_writers_error(tmp_path, chain, why):
    path = tmp_path / "checkpoint.pth.tar"
    atomic_torch_save({"w": torch.ones(3)}, path)
    with pytest.raises(Exception) as e:
        with atomic_write(path) as f:
            f.write(b"partial")
            chain()
    if why is None:  # no room is not why: the writer's own error stands
        assert type(e.value) is RuntimeError
    else:
        assert type(e.value) is UsageError
        assert str(e.value).startswith(f"no room to write '{path}': {why} (")
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]


def _chained(error, cause):
    error.__cause__ = cause
    return error


def _raise(error, cause, as_context=False):
    if as_context:
        try:
            raise cause
        except OSError:
            raise error  # noqa: B904  (the context, as torch's writer leaves it)
    raise error from cause


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch warns first
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickled_module_is_named_by_its_own_class(tmp_path, protocol):
    """torch.save(model): the refusal names the pickled object's class (its first global: GLOBAL
    in torch.save's protocol 2, STACK_GLOBAL in protocol 4, of which torch lists no unsafe
    globals), not the first of the unsafe globals in sorted order (Linear)."""
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path, pickle_protocol=protocol)
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    assert str(e.value) == (
        f"{str(path)!r} holds a pickled module (torch.nn.modules.container.Sequential: code), not "
        "a state dict; save the weights with torch.save(model.state_dict(), PATH) and pass that "
        "file")


def test_a_refused_checkpoint_names_the_first_global_the_unpickler_met(tmp_path):
    """Of several globals outside the allow-list, the one torch's unpickler stopped at (not the
    first in sorted order)."""
    import argparse
    import pathlib

    path = tmp_path / "odd.pth"
    torch.save({"path": pathlib.PurePosixPath("a"), "args": argparse.Namespace(x=1)}, path)
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    assert str(e.value) == (
        f"refusing to load {str(path)!r}: it holds objects outside torch's weights-only "
        "allow-list (a checkpoint must contain tensors, numbers, strings and containers only): "
        "pathlib.PurePosixPath")


_PROTOCOL_4 = ("was saved with pickle protocol 4 or later (torch.save(..., pickle_protocol=4)), "
               "which torch's weights-only loader cannot read")


# (a legacy file of protocol 0 starts with text: it is refused as not a checkpoint at all)
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch warns first
@pytest.mark.parametrize("zip_format, protocol, reason", [
    (True, 4, _PROTOCOL_4), (False, 4, _PROTOCOL_4), (True, 5, _PROTOCOL_4),
    (True, 0, "uses pickle opcode 112 (PUT), which torch's weights-only loader cannot read "
              "(pickle protocol 0 or 1?)"),
])
def test_a_state_dict_in_a_pickle_protocol_torch_cannot_read_safely_says_so(tmp_path, zip_format,
                                                                          protocol, reason):
    """A plain state dict saved with another pickle protocol: torch's weights-only unpickler
    refuses every file of protocol 4 and later (its FRAME opcode) and protocols 0 and 1; the
    refusal says that, not "objects outside the allow-list" with torch's boilerplate."""
    path = tmp_path / "weights.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"{str(path)!r} {reason}; load it where you trust it and save it "
                            "again with torch.save's default protocol (2)")


def test_a_refusal_torch_words_otherwise_is_its_first_line(tmp_path):
    """A weights-only refusal this code does not know (a later torch's wording) is named by its
    first line, without terminal colours."""
    from mocobench.utils.fileio import _refusal

    path = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(1)}, path)
    error = pickle.UnpicklingError("\x1b[31mWeights only load failed: a new reason\x1b[0m\nmore")
    assert _refusal(str(path), error).endswith(
        "strings and containers only): Weights only load failed: a new reason")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_cut_at_any_length_is_refused_in_one_line(tmp_path, zip_format):
    """torch.save's file (the zip format, and the legacy one of checkpoints saved before torch 1.6)
    cut short anywhere: a one-line UsageError naming the file and the loader's first line (the
    exception's name when it has no text), never another exception. (The legacy file cut inside a
    record's length raised struct.error, uncaught.)"""
    whole = tmp_path / "whole.pth"
    torch.save({"state_dict": torch.nn.Linear(3, 3).state_dict(), "epoch": 1}, whole,
               _use_new_zipfile_serialization=zip_format)
    data = whole.read_bytes()
    cut, details = tmp_path / "cut.pth", set()
    for length in range(1, len(data), 1 if not zip_format else 7):
        cut.write_bytes(data[:length])
        with pytest.raises(UsageError) as refused:
            load_checkpoint(str(cut))
        message = str(refused.value)
        assert "\n" not in message, (length, message)
        if message.startswith(f"{str(cut)!r} is not a readable torch checkpoint (truncated"):
            details.add(message.rsplit("?): ", 1)[1])
    if not zip_format:
        # the first lines of torch's own errors, and the name of those without text
        assert {"EOFError", "unpack requires a buffer of 4 bytes"} <= details, details
    else:
        assert any(d.startswith("PytorchStreamReader failed") for d in details), details


def test_the_weights_only_load_holds_whatever_the_environment_says(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (set in some shells to load old checkpoints) turns
    torch.load's default into a full unpickle; load_checkpoint asks for weights_only explicitly,
    so a pickled module is still refused."""
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UsageError, match="holds a pickled module"):
        load_checkpoint(path)
