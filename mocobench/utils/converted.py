"""A converted backbone .pkl: the file `mocobench convert` hands to transfer. One writer, one
reader, here.

    {"model": {detectron2 name: numpy array}, "__author__": source author,
     "matching_heuristics": True, "architecture": "ResNeXt-50 32x4d",
     "resnets": {DEPTH, NUM_GROUPS, WIDTH_PER_GROUP, RES2_OUT_CHANNELS, STRIDE_IN_1X1}}

The layout is the one MoCo's converter and detectron2's model-zoo files use, plus the architecture
it holds, so that transfer can build the matching ResNet. Loaded with the allow-list unpickler
(containers and numpy arrays only), never plain pickle.
"""
import pickle

import numpy as np

from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write, safe_unpickle

# the protocol MoCo's converter and detectron2's model zoo files use; any reader since Python 3.4
# takes it
PICKLE_PROTOCOL = 4


def write_converted(path, weights, author, architecture, resnets):
    """Write the .pkl atomically: `weights` {detectron2 name: numpy array}, `resnets` detectron2's
    MODEL.RESNETS values of that architecture."""
    payload = {"model": weights, "__author__": author, "matching_heuristics": True,
               "architecture": architecture, "resnets": resnets}
    with atomic_write(path) as f:
        pickle.dump(payload, f, protocol=PICKLE_PROTOCOL)


def read_converted(pkl_path):
    """The whole dict of a converted .pkl, checked for format (a 'model' dict of numpy arrays)."""
    data = safe_unpickle(pkl_path)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UsageError(f"{pkl_path!r} is not a converted backbone: expected a dict with a "
                         "'model' dict")
    for name, array in data["model"].items():
        if not isinstance(array, np.ndarray):
            raise UsageError(f"{pkl_path!r}: model[{name!r}] is a {type(array).__name__}, "
                             "expected a numpy array")
    return data


def recorded_resnets(path):
    """(MODEL.RESNETS values, architecture name) a .pkl records, or (None, None) for any other
    detectron2 .pkl (model zoo, Caffe2 blobs: only ours records "resnets")."""
    data = safe_unpickle(path)
    recorded = data.get("resnets") if isinstance(data, dict) else None
    if not isinstance(recorded, dict):
        return None, None
    return recorded, data.get("architecture")
