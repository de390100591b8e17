"""Checkpoint and file I/O that never tears a file and never runs code from one.

- `atomic_write`: write to a temp file in the same directory, fsync, then `os.replace`: a crash
  leaves either the old file or the new one, never half of one; a full disk is a one-line
  UsageError. The file gets the permissions the umask gives a new file (as open() would), not
  mkstemp's 0600.
- `RunLock`: an exclusive lock on a run directory for the life of the process (released by the
  kernel even on SIGKILL): a second process writing into the same directory is refused. Where the
  file system has no flock (NFSv3 without lockd, Lustre without -o flock), an exclusive lock file
  holding host and pid; a stale one (dead pid, same host) is taken over.
- `load_checkpoint`: `torch.load(weights_only=True)` with an error that names the file.
- `safe_unpickle`: an allow-list unpickler for .pkl files (detectron2 weights): plain containers and
  numpy arrays only; anything else (a `__reduce__` that calls os.system, say) is refused.
"""
import contextlib
import errno
import hashlib
import io
import os
import pickle
import re
import shutil
import struct
import tempfile

from mocobench.utils.errors import UsageError


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Context manager yielding a file object; `path` appears only if the block finishes."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        why = _out_of_room(e)
        if why:
            free_mib = shutil.disk_usage(directory).free / 2**20
            raise UsageError(
                f"no room to write {path!r}: {why} ({free_mib:.0f} MiB free there); "
                "files written before are intact; free some space and resume"
            ) from None
        raise


# ENOSPC: disk full; EDQUOT: quota; EFBIG: over the file-size limit (ulimit -f)
_NO_ROOM = {errno.ENOSPC: "the device is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file-size limit is exceeded"}


def _out_of_room(error):
    """Why `error` (or an exception it was raised while handling: torch.save reports a full disk as
    a RuntimeError from its zip writer, with the OSError as context) means there is no room;
    else ''."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _NO_ROOM:
            return _NO_ROOM[error.errno]
        error = error.__cause__ or error.__context__
    return ""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# flock errors that mean "this file system does not do flock" (NFSv3 without lockd: ENOLCK; Lustre
# mounted without -o flock: ENOSYS or EOPNOTSUPP), not "another process holds the lock"
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
_HELD = {errno.EWOULDBLOCK, errno.EAGAIN}


class RunLock:
    """Exclusive, non-blocking lock on DIR/.lock (fcntl.flock); UsageError when another process
    holds it.

    On a file system without flock it falls back to an exclusive lock file, DIR/.lock.owner,
    created with O_CREAT | O_EXCL and holding host, pid and start time: a second process is
    refused naming them; one left by a dead process on this host (SIGKILL, a crash) is taken over
    with a one-line message; one from another host is refused (whether that process still runs
    cannot be seen from here). close() removes it."""

    NAME = ".lock"
    OWNER_NAME = ".lock.owner"

    def __init__(self, directory):
        import fcntl

        self.directory = directory
        self.path = os.path.join(directory, self.NAME)
        self.owner_path = None  # set when the lock is the lock file
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            self._file = None
            if e.errno in _NO_FLOCK:
                self._take_lock_file(os.strerror(e.errno))
                return
            if e.errno in _HELD:
                raise UsageError(
                    f"another process (pid {holder}) is writing into {directory!r}; wait for it "
                    "to finish or stop it, or choose another output directory"
                ) from None
            raise UsageError(f"cannot lock {self.path!r}: {os.strerror(e.errno)} "
                             f"(errno {e.errno})") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def _owner_record(self):
        import datetime
        import json
        import socket

        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": datetime.datetime.now().astimezone().isoformat(
                               timespec="seconds")}) + "\n"

    def _create_owner_file(self, path):
        """Create `path` exclusively with this process's record; False when it exists."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._record)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_lock_file(self, why):
        """The fallback lock: DIR/.lock.owner created exclusively; raises UsageError when another
        live process (or one on another host) holds it."""
        path = os.path.join(self.directory, self.OWNER_NAME)
        self._record = self._owner_record()
        if self._create_owner_file(path):
            self.owner_path = path
            return
        text, owner = _read_owner(path)
        if owner is None or not _dead_here(owner):
            raise UsageError(_held_message(self.directory, path, owner, why))
        # stale: its process died on this host. Take it over under a guard file, so that of two
        # processes that both found it stale one removes it and the other finds the new owner.
        guard = path + ".takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise UsageError(
                f"another process is taking over the stale lock file {path!r} of {self.directory!r}"
                f" (or one died doing so: then remove {guard!r})") from None
        try:
            if _read_owner(path)[0] == text:
                os.remove(path)
            taken = self._create_owner_file(path)
        finally:
            os.close(fd)
            os.remove(guard)
        if not taken:
            raise UsageError(_held_message(self.directory, path, _read_owner(path)[1], why))
        self.owner_path = path
        print(f"took over the stale lock file {path} of pid {owner['pid']} on {owner['host']} "
              f"(started {owner.get('started', '?')}; no such process any more)", flush=True)

    def close(self):
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None
        if self.owner_path is not None:
            with contextlib.suppress(FileNotFoundError):
                if _read_owner(self.owner_path)[0] == self._record:  # still ours
                    os.remove(self.owner_path)
            self.owner_path = None


def _read_owner(path):
    """(text, {host, pid, started}) of a lock file; (text, None) when it cannot be parsed (being
    written, or damaged)."""
    import json

    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None, None
    try:
        owner = json.loads(text)
        owner["pid"] = int(owner["pid"])
        owner["host"] = str(owner["host"])
    except (ValueError, TypeError, KeyError):
        return text, None
    return text, owner


def _dead_here(owner):
    """True when the lock file's process ran on this host and no longer exists."""
    import socket

    if owner["host"] != socket.gethostname():
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _held_message(directory, path, owner, why):
    import socket

    if owner is None:
        who = "another process"
        gone = f"if no run is writing there, remove {path!r}"
    else:
        who = (f"another process (pid {owner['pid']} on {owner['host']}, started "
               f"{owner.get('started', '?')})")
        gone = (f"if that process is gone, remove {path!r}" if owner["host"] != socket.gethostname()
                else "wait for it to finish or stop it")
    return (f"{who} is writing into {directory!r} (lock file {path}: no flock here, {why}); "
            f"{gone}, or choose another output directory")


def atomic_torch_save(obj, path):
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)


def check_input_file(path, what="file"):
    """A one-line UsageError unless `path` is a non-empty regular file: it does not exist, it is a
    directory, or it is empty (0 bytes)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} does not exist")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{what} {path!r} is empty (0 bytes)")
    return path


# globals whose presence in a refused checkpoint means it holds a whole pickled model (torch.save(
# model)) rather than its state dict
_MODULE_GLOBALS = ("torch.nn.modules.", "torch.nn.parallel.", "torchvision.models.", "timm.models.")


def _unsafe_globals(path):
    """The globals a refused zip checkpoint names, [] when torch cannot list them."""
    import torch

    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy (non-zip) file, truncated ...: the unpickler's error stands
        return []


def _pickle_globals(path):
    """The globals (module.name) a zip checkpoint's pickle refers to, in order; [] if it cannot be
    read (not a zip, no data.pkl, a broken pickle)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            data = archive.read(member)
        found, strings = [], []
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":  # protocol 2 (torch.save's): "module name"
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:  # protocol 4: two strings
                found.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        return found
    except Exception:  # noqa: BLE001 - whatever the file is, another message names it
        return []


def _first_global(path, names):
    """The first of `names` the checkpoint's pickle refers to (the class of the pickled object
    itself, e.g. torchvision.models.resnet.ResNet), None if it cannot be read."""
    return next((name for name in _pickle_globals(path) if name in names), None)


def _refusal(path, error):
    """One line for a checkpoint torch's weights-only unpickler refused: a pickled module says
    so and how to save the weights instead; anything else names the global."""
    names = _unsafe_globals(path)
    # torch lists no globals of a protocol-4 pickle (torch.save(..., pickle_protocol=4)): a
    # pickled module is still told by its classes
    classes = names or [n for n in _pickle_globals(path) if n.startswith(_MODULE_GLOBALS)]
    if any(name.startswith(_MODULE_GLOBALS) for name in classes):
        model = _first_global(path, classes) or classes[0]
        return (f"{path!r} holds a pickled module ({model}: code), not a state dict; save the "
                "weights with torch.save(model.state_dict(), PATH) and pass that file")
    operand = re.search(r"Unsupported operand (\d+)", str(error))
    if operand:  # a pickle opcode torch's weights-only unpickler does not read, whatever it builds
        return f"{path!r} {_unread_opcode(int(operand.group(1)))}; load it where you trust it " \
               "and save it again with torch.save's default protocol (2)"
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    found = match.group(1) if match else (names[0] if names else _first_line(error))
    return (f"refusing to load {path!r}: it holds objects outside torch's weights-only allow-list "
            "(a checkpoint must contain tensors, numbers, strings and containers only): "
            f"{found}")


def _unread_opcode(code):
    """Why torch's weights-only unpickler stopped at pickle opcode `code`."""
    import pickletools

    if code == 0x95:  # FRAME
        # every pickle of protocol 4 or later starts with it: a plain state dict is refused too
        return ("was saved with pickle protocol 4 or later (torch.save(..., pickle_protocol=4)), "
                "which torch's weights-only loader cannot read")
    name = pickletools.code2op.get(chr(code))
    return (f"uses pickle opcode {code} ({name.name if name else 'unknown'}), which torch's "
            "weights-only loader cannot read (pickle protocol 0 or 1?)")


def _first_line(error):
    """The first line of an exception's text, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True; unreadable or code-carrying files raise UsageError."""
    import torch

    path = check_input_file(path, "checkpoint")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (PK); the legacy format and plain pickles start with the
    # pickle PROTO opcode 0x80. Anything else (text, JSON, an image) is not a checkpoint: say so,
    # not "unsafe pickle".
    if head != b"PK" and head[:1] != b"\x80":
        raise UsageError(f"{path!r} is not a readable torch checkpoint: it is not a checkpoint at "
                         f"all (it starts with {head!r}; a torch.save file is a zip archive or a "
                         "pickle)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(_refusal(path, e)) from None
    # struct.error: a legacy (pre-zip) file cut inside a record's length field
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError,
            AttributeError, struct.error) as e:
        raise UsageError(f"{path!r} is not a readable torch checkpoint (truncated or another "
                         f"format?): {_first_line(e)}") from None


_NUMPY_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("_codecs", "encode"),  # numpy arrays pickled by protocol 2 carry their bytes this way
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_ALLOWED:
            return super().find_class(module, name)
        raise _ForbiddenGlobal(f"global '{module}.{name}' is not on the allow-list")


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (checkpoints are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_unpickle(path):
    """Load a .pkl of containers and numpy arrays; refuse anything that could run code."""
    path = check_input_file(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _AllowListUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise UsageError(
            f"refusing to load {path!r}: {e}. A weights .pkl may hold only dicts, lists, numbers, "
            "strings and numpy arrays"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError,
            AttributeError) as e:
        raise UsageError(f"{path!r} is not a readable pickle (truncated or another format?): "
                         f"{e}") from None
