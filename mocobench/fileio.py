"""Checkpoint and file I/O that never tears a file and never runs code from one.

- `atomic_write`: write to a temp file in the same directory, fsync, then `os.replace`: a crash leaves
  either the old file or the new one, never half of one.
- `load_checkpoint`: `torch.load(weights_only=True)` with an error that names the file.
- `safe_unpickle`: an allow-list unpickler for .pkl files (detectron2 weights): plain containers and
  numpy arrays only; anything else (a `__reduce__` that calls os.system, say) is refused.
"""
import contextlib
import io
import os
import pickle
import tempfile

from mocobench.errors import UsageError


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Context manager yielding a file object; `path` appears only if the block finishes."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    import torch

    with atomic_write(path) as f:
        torch.save(obj, f)


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True; unreadable or code-carrying files raise UsageError."""
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(
            f"refusing to load {path!r}: it holds objects outside torch's weights-only allow-list "
            f"(a checkpoint must contain tensors, numbers, strings and containers only): {e}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{path!r} is not a readable torch checkpoint (truncated or another format?): {e}") from None


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


def safe_unpickle(path):
    """Load a .pkl of containers and numpy arrays; refuse anything that could run code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"file {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _AllowListUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise UsageError(
            f"refusing to load {path!r}: {e}. A weights .pkl may hold only dicts, lists, numbers, "
            "strings and numpy arrays"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{path!r} is not a readable pickle (truncated or another format?): {e}") from None
