"""detectron2's DetectionCheckpointer, loading without arbitrary unpickling and saving atomically.

detectron2 opens a .pkl with a bare pickle.load and fvcore writes checkpoints in place. Here a .pkl goes
through mocobench.fileio.safe_unpickle (containers and numpy arrays only), a .pth through
torch.load(weights_only=True), and every checkpoint and the `last_checkpoint` tag are written to a temp
file and renamed, so an interrupted save never leaves a torn file for --resume to pick up.
"""
import os

from mocobench import d2compat  # noqa: F401  (before any detectron2 import)

# isort: split
from detectron2.checkpoint import DetectionCheckpointer

from mocobench.fileio import atomic_torch_save, atomic_write, load_checkpoint, safe_unpickle


class SafeDetectionCheckpointer(DetectionCheckpointer):
    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = safe_unpickle(filename)
            if "model" in data and "__author__" in data:
                # detectron2 format (ours from `mocobench convert`, or detectron2's model zoo)
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            # Caffe2 / Detectron1 layout, e.g. the MSRA ImageNet R-50.pkl: blobs renamed by detectron2's heuristics
            data = data.get("blobs", data)
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        loaded = load_checkpoint(filename)
        if filename.endswith(".pyth"):  # pycls
            state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
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
