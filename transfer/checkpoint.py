"""detectron2's DetectionCheckpointer, loading without arbitrary unpickling and saving atomically.

detectron2 opens a .pkl with a bare pickle.load and fvcore writes checkpoints in place. Here a .pkl
goes through mocobench.utils.fileio.safe_unpickle (containers and numpy arrays only), a .pth through
torch.load(weights_only=True), and every checkpoint and the `last_checkpoint` tag are written to a
temp file and renamed, so an interrupted save never leaves a torn file for --resume to pick up.
"""
import os

from mocobench.utils import d2compat  # before any detectron2 import

# isort: split
from detectron2.checkpoint import DetectionCheckpointer

from mocobench.utils.fileio import atomic_torch_save, atomic_write, load_checkpoint, safe_unpickle


class SafeDetectionCheckpointer(DetectionCheckpointer):
    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = safe_unpickle(filename)
            if "model" in data and "__author__" in data:
                # detectron2 format (ours from `mocobench convert`, or detectron2's model zoo)
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            # Caffe2 / Detectron1 layout, e.g. the MSRA ImageNet R-50.pkl: blobs renamed by
            # detectron2's heuristics
            data = data.get("blobs", data)
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        loaded = load_checkpoint(filename)
        if filename.endswith(".pyth"):  # pycls
            state = {k: v for k, v in loaded["model_state"].items()
                     if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return loaded if "model" in loaded else {"model": loaded}

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)


# --------------------------------------------------------------------------------------------------
# No silent random init: every pretrained backbone tensor must come from MODEL.WEIGHTS.
#
# detectron2 loads converted weights by suffix matching (`matching_heuristics`) and skips, with a
# warning in a long log, every tensor whose name or shape does not fit: a ResNet-18 .pkl in a DEPTH
# 50 config trains a mostly random backbone and reports an AP for it. `inspect_weights` loads the
# file into the model exactly as training will and refuses the run when any backbone tensor did not
# come from it.

# ResNet stage depths (blocks in res2..res5) and block type -> depth (He et al., 2016, Table 1)
RESNET_DEPTHS = {((2, 2, 2, 2), "basic"): 18, ((3, 4, 6, 3), "basic"): 34,
                 ((3, 4, 6, 3), "bottleneck"): 50, ((3, 4, 23, 3), "bottleneck"): 101,
                 ((3, 8, 36, 3), "bottleneck"): 152}
SHOWN = 3  # mismatches named in the error


def backbone_keys(model) -> list:
    """state_dict keys of the pre-trained trunk: every detectron2 ResNet in the model, and for C4
    models the res5 blocks that live in the ROI head (not the extra norm transfer.heads appends,
    which is new)."""
    from detectron2.layers import CNNBlockBase
    from detectron2.modeling.backbone import ResNet

    keys = []
    for name, module in model.named_modules():
        if isinstance(module, ResNet):
            keys += [f"{name}.{k}" if name else k for k in module.state_dict()]
    res5 = getattr(getattr(model, "roi_heads", None), "res5", None)
    if res5 is not None:
        for child_name, child in res5.named_children():
            if isinstance(child, CNNBlockBase):
                keys += [f"roi_heads.res5.{child_name}.{k}" for k in child.state_dict()]
    # a BatchNorm's step counter: not in any converted file, and unused with detectron2's fixed
    # momentum
    return [k for k in keys if not k.endswith("num_batches_tracked")]


def resnet_architecture(keys) -> str:
    """'ResNet-18' (or 'a ResNet with 3-4-6-3 bottleneck blocks') from detectron2 key names, '' if
    no ResNet."""
    blocks, bottleneck = {}, False
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in ("res2", "res3", "res4", "res5") and parts[i + 1].isdigit():
                stage = int(part[3])
                blocks[stage] = max(blocks.get(stage, 0), int(parts[i + 1]) + 1)
                bottleneck |= "conv3" in parts[i + 2:]
                break
    if sorted(blocks) != [2, 3, 4, 5]:
        return ""
    layout = (tuple(blocks[s] for s in (2, 3, 4, 5)), "bottleneck" if bottleneck else "basic")
    depth = RESNET_DEPTHS.get(layout)
    return f"ResNet-{depth}" if depth \
        else f"a ResNet with {'-'.join(map(str, layout[0]))} {layout[1]} blocks"


def _file_key(model_key, file_keys, heuristics):
    if not heuristics:
        return model_key if model_key in file_keys else None
    # detectron2's rule
    matches = [k for k in file_keys if model_key == k or model_key.endswith("." + k)]
    return max(matches, key=len) if matches else None


def converter_report(weights_path):
    """The JSON report `mocobench convert` leaves beside its output, when there is one (read
    defensively)."""
    import json

    for path in (weights_path + ".json", os.path.splitext(weights_path)[0] + ".json"):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {"path": path, "error": "unreadable"}
        if isinstance(data, dict):
            return {"path": os.path.abspath(path), **_small_fields(data)}
    return None


def _small_fields(data: dict) -> dict:
    """The scalar entries of a metadata dict, and its small dicts of scalars (source, architecture,
    verification)."""
    def scalar(v):
        return v is None or isinstance(v, (str, int, float, bool))

    return {str(k): v for k, v in data.items()
            if scalar(v)
            or (isinstance(v, dict) and len(v) <= 20 and all(scalar(x) for x in v.values()))}


def inspect_weights(cfg) -> dict:
    """Load cfg.MODEL.WEIGHTS into cfg's model (built on CPU) as training does; UsageError unless
    every backbone tensor came from the file with its shape. Returns what was loaded, for the run
    record."""
    import numpy as np
    from detectron2.modeling import build_model

    from mocobench.utils.errors import UsageError
    from mocobench.utils.fileio import file_sha256

    weights = cfg.MODEL.WEIGHTS
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    checkpointer = SafeDetectionCheckpointer(model)
    local = checkpointer.path_manager.get_local_path(weights)
    # the mismatch account is ours below; training logs detectron2's own again
    with d2compat.quiet_checkpoint_logs("transfer.checkpoint"):
        data = checkpointer._load_file(local)
        if not isinstance(data.get("model"), dict):
            raise UsageError(f"MODEL.WEIGHTS {weights!r} holds no model state (expected a .pkl "
                             "from `mocobench convert` or a detectron2 checkpoint)")
        named = data["model"]
        # MSRA/Detectron1 blob names, renamed as detectron2 will
        if data.get("__author__") == "Caffe2":
            from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names

            named = convert_c2_detectron_names(dict(named))[0]
        file_shapes = {k: tuple(np.shape(v)) for k, v in named.items()}
        heuristics = bool(data.get("matching_heuristics", False))
        metadata = _small_fields({k: v for k, v in data.items() if k != "model"})
        incompatible = checkpointer._load_model(data)

    trunk = backbone_keys(model)
    not_loaded = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
    missing = [k for k in trunk if k in not_loaded]
    if missing:
        model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: _file_key(k, file_shapes, heuristics) for k in missing}
        first = sorted(missing, key=lambda k: found[k] is None)[:SHOWN]  # shape mismatches first
        shown = [f"{k} (file {file_shapes[found[k]]}, model {model_shapes[k]})" if found[k]
                 else f"{k} (not in the file)" for k in first]
        in_file, in_model = resnet_architecture(file_shapes), f"ResNet-{cfg.MODEL.RESNETS.DEPTH}"
        hint = (f"the file holds a {in_file} and the config builds MODEL.RESNETS.DEPTH "
                f"{cfg.MODEL.RESNETS.DEPTH}: a {in_file} checkpoint in a DEPTH "
                f"{cfg.MODEL.RESNETS.DEPTH} config?"
                if in_file and in_file != in_model else
                "is it a backbone converted by `mocobench convert` for this MODEL.RESNETS setting?")
        raise UsageError(
            f"MODEL.WEIGHTS {weights!r}: {len(missing)} of {len(trunk)} backbone tensors would not "
            f"come from the file and start from random init instead: {'; '.join(shown)}"
            f"{f'; and {len(missing) - SHOWN} more' if len(missing) > SHOWN else ''}. "
            f"{hint[0].upper()}{hint[1:]} Nothing was trained."
        )
    loaded = [k for k in model.state_dict()
              if k not in not_loaded and not k.endswith("num_batches_tracked")]
    return {
        "path": os.path.abspath(local),
        "sha256": file_sha256(local),
        "bytes": os.path.getsize(local),
        "author": data.get("__author__"),
        "metadata": metadata,
        "architecture": resnet_architecture(file_shapes) or None,
        "backbone_tensors": len(trunk),
        "backbone_loaded": len(trunk),
        "other_tensors_loaded": len(loaded) - len(trunk),
        "file_tensors_unused": len(incompatible.unexpected_keys),
        "converter_report": converter_report(local),
    }
