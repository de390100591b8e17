"""`mocobench pipeline --config-file configs/pipeline/X.yaml [KEY VALUE ...]`: the whole experiment.

    data (optional: generate) -> pretrain MoCo -> supervised baseline (train, or a given checkpoint)
    -> convert both (verified) -> transfer {moco, supervised, random} x seeds -> report

Each stage calls the same function as its own subcommand (`mocobench data synth`, `pretrain`,
`supervised`, `convert`, `transfer`, `report`); there is no second implementation here, only the wiring.

The run directory's `manifest.json` records, per stage, its inputs (config text, overrides, sha256 of
the checkpoints it reads), outputs, status and timings, plus the software versions and the git commit.
Re-running the same command skips stages that are done with unchanged inputs, and resumes an
interrupted one (pretraining from its last checkpoint, transfer from each seed's last checkpoint).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

from fvcore.common.config import CfgNode

from mocobench.config import merge_config
from mocobench.errors import UsageError
from mocobench.fileio import atomic_write

MANIFEST = "manifest.json"
INITS = ("moco", "supervised", "random")


def get_pipeline_cfg() -> CfgNode:
    cfg = CfgNode()
    cfg.OUTPUT_DIR = "output/pipeline"
    cfg.DATA = CfgNode()
    cfg.DATA.SYNTH = False  # generate the datasets into OUTPUT_DIR/data (`mocobench data synth`)
    cfg.DATA.SYNTH_PRESET = "demo"
    cfg.DATA.SYNTH_SEED = 0
    cfg.DATA.SYNTH_OPTS = []  # extra `mocobench data synth` flags, e.g. ["--scenes", "64"]
    cfg.DATA.PRETRAIN_ROOT = ""  # ImageFolder root with train/ (and val/ for kNN); synth: data/imagenet
    cfg.PRETRAIN = CfgNode()
    cfg.PRETRAIN.CONFIG_FILE = ""
    cfg.PRETRAIN.OPTS = []
    cfg.SUPERVISED = CfgNode()
    cfg.SUPERVISED.CONFIG_FILE = ""  # train the supervised baseline on the same images with labels ...
    cfg.SUPERVISED.OPTS = []
    cfg.SUPERVISED.WEIGHTS = ""  # ... or use this torchvision checkpoint (resnet50-*.pth) or MSRA R-50.pkl
    cfg.TRANSFER = CfgNode()
    cfg.TRANSFER.CONFIG_FILE = ""
    # per init, the detection config to use instead of CONFIG_FILE ("" = CONFIG_FILE). The paper's supervised row:
    # SUPERVISED.WEIGHTS /path/R-50.pkl (MSRA, BGR, caffe-style; used as is, no conversion) with
    # CONFIG_FILES.SUPERVISED configs/detection/pascal_voc_R_50_C4_24k.yaml; torchvision weights need the _moco one.
    cfg.TRANSFER.CONFIG_FILES = CfgNode({init.upper(): "" for init in INITS})
    cfg.TRANSFER.OPTS = []
    cfg.TRANSFER.INITS = list(INITS)
    cfg.TRANSFER.SEEDS = 3
    cfg.TRANSFER.NUM_GPUS = 1
    cfg.TRANSFER.RANDOM_OPTS = []  # extra overrides for the random-init runs
    return cfg


def load_pipeline_config(config_file, opts) -> CfgNode:
    cfg = merge_config(get_pipeline_cfg(), config_file, opts)
    unknown = [i for i in cfg.TRANSFER.INITS if i not in INITS]
    if unknown or not cfg.TRANSFER.INITS:
        raise UsageError(f"TRANSFER.INITS {list(cfg.TRANSFER.INITS)}: expected a non-empty subset of {list(INITS)}")
    for key in ("PRETRAIN.CONFIG_FILE", "TRANSFER.CONFIG_FILE"):
        node, leaf = key.split(".")
        if not cfg[node][leaf]:
            raise UsageError(f"{config_file}: {key} is required")
    for init, path in cfg.TRANSFER.CONFIG_FILES.items():
        if path and not os.path.isfile(path):
            raise UsageError(f"TRANSFER.CONFIG_FILES.{init} {path!r} does not exist; expected a detection config")
    cfg.freeze()
    return cfg


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_text(path):
    with open(path) as f:
        return f.read()


def software_versions() -> dict:
    import importlib.metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "torchvision", "detectron2", "fvcore", "pycocotools", "mocobench"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("-dirty" if dirty else "")


class Manifest:
    """manifest.json in the run directory, rewritten atomically after every change."""

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, MANIFEST)
        self.data = {"stages": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)

    def save(self):
        with atomic_write(self.path, "w") as f:
            json.dump(self.data, f, indent=2)
            f.write("\n")

    def stage(self, name):
        return self.data["stages"].get(name, {})

    def update(self, name, **fields):
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()


class Pipeline:
    def __init__(self, cfg, config_file):
        self.cfg = cfg
        self.config_file = os.path.abspath(config_file)
        self.run_dir = os.path.abspath(cfg.OUTPUT_DIR)
        os.makedirs(self.run_dir, exist_ok=True)
        self.manifest = Manifest(self.run_dir)
        self.manifest.data.update(config_file=self.config_file, config=cfg.dump(), versions=software_versions(),
                                  git_commit=git_commit())
        self.manifest.save()
        self.outputs = {}  # stage name -> outputs, for the stages after it

    # ---- paths --------------------------------------------------------------------------------------------
    def path(self, *parts):
        return os.path.join(self.run_dir, *parts)

    @property
    def synth_root(self):
        return self.path("data") if self.cfg.DATA.SYNTH else None

    @property
    def pretrain_root(self):
        if self.cfg.DATA.PRETRAIN_ROOT:
            return self.cfg.DATA.PRETRAIN_ROOT
        if self.synth_root:
            return os.path.join(self.synth_root, "imagenet")
        raise UsageError("set DATA.PRETRAIN_ROOT (an ImageFolder root with train/) or DATA.SYNTH True")

    # ---- stages -------------------------------------------------------------------------------------------
    def stages(self):
        """(name, inputs, run) in order; inputs are evaluated when the stage is reached."""
        cfg = self.cfg
        out = []
        if cfg.DATA.SYNTH:
            out.append(("data", lambda: {"preset": cfg.DATA.SYNTH_PRESET, "seed": cfg.DATA.SYNTH_SEED,
                                         "opts": list(cfg.DATA.SYNTH_OPTS)}, self.run_synth))
        out.append(("pretrain", lambda: self._config_inputs(cfg.PRETRAIN) | {"data": self.pretrain_root},
                    self.run_pretrain))
        if "supervised" in cfg.TRANSFER.INITS:
            if cfg.SUPERVISED.WEIGHTS:
                out.append(("supervised", lambda: {"weights": cfg.SUPERVISED.WEIGHTS,
                                                   "sha256": self._sha_or_error(cfg.SUPERVISED.WEIGHTS,
                                                                                "SUPERVISED.WEIGHTS")},
                            self.use_supervised_weights))
            elif cfg.SUPERVISED.CONFIG_FILE:
                out.append(("supervised", lambda: self._config_inputs(cfg.SUPERVISED) | {"data": self.pretrain_root},
                            self.run_supervised))
            else:
                raise UsageError("TRANSFER.INITS has 'supervised': set SUPERVISED.WEIGHTS (a torchvision "
                                 "checkpoint) or SUPERVISED.CONFIG_FILE (train one)")
        for init in ("moco", "supervised"):
            if init in cfg.TRANSFER.INITS:
                out.append((f"convert_{init}", lambda init=init: {"checkpoint_sha256": self._upstream_sha(init)},
                            lambda init=init: self.run_convert(init)))
        for init in cfg.TRANSFER.INITS:
            out.append((f"transfer_{init}", lambda init=init: self._transfer_inputs(init),
                        lambda init=init: self.run_transfer(init)))
        out.append(("report", lambda: None, self.run_report))  # inputs None: cheap, always redone
        return out

    def _config_inputs(self, node):
        return {"config_file": node.CONFIG_FILE, "config_text": _file_text(node.CONFIG_FILE), "opts": list(node.OPTS)}

    def _sha_or_error(self, path, what):
        if not os.path.isfile(path):
            raise UsageError(f"{what} {path!r} does not exist")
        return sha256(path)

    def _upstream_sha(self, init):
        ckpt = self.outputs[init if init == "supervised" else "pretrain"]["checkpoint"]
        return self._sha_or_error(ckpt, f"{init} checkpoint")

    def transfer_config_file(self, init):
        return self.cfg.TRANSFER.CONFIG_FILES[init.upper()] or self.cfg.TRANSFER.CONFIG_FILE

    def _transfer_inputs(self, init):
        config_file = self.transfer_config_file(init)
        inputs = self._config_inputs(self.cfg.TRANSFER) | {"config_file": config_file, "config_text": _file_text(
            config_file), "seeds": self.cfg.TRANSFER.SEEDS}
        if init != "random":
            inputs["weights_sha256"] = self._sha_or_error(self.outputs[f"convert_{init}"]["pkl"], f"{init} .pkl")
        else:
            inputs["random_opts"] = list(self.cfg.TRANSFER.RANDOM_OPTS)
        return inputs

    def run_synth(self):
        from mocobench import synth

        argv = ["synth", "--out", self.synth_root, "--preset", self.cfg.DATA.SYNTH_PRESET,
                "--seed", str(self.cfg.DATA.SYNTH_SEED), *self.cfg.DATA.SYNTH_OPTS]
        self._call(synth.main, argv, "mocobench data")
        return {"root": self.synth_root}

    def _train_classifier_stage(self, module, node, subdir, what):
        output_dir = self.path(subdir)
        argv = ["--config-file", node.CONFIG_FILE, "--resume", "auto",
                "OUTPUT_DIR", output_dir, "DATA.ROOT", self.pretrain_root, *node.OPTS]
        self._call(module.main, argv, what)
        from pretrain.checkpoint import find_resume_path

        ckpt = find_resume_path(output_dir, "auto")
        if ckpt is None:
            raise UsageError(f"{what} finished but left no checkpoint in {output_dir} (no last_checkpoint file)")
        return {"checkpoint": ckpt, "output_dir": output_dir}

    def run_pretrain(self):
        from pretrain import train

        return self._train_classifier_stage(train, self.cfg.PRETRAIN, "pretrain", "mocobench pretrain")

    def run_supervised(self):
        from pretrain import supervised

        return self._train_classifier_stage(supervised, self.cfg.SUPERVISED, "supervised", "mocobench supervised")

    def use_supervised_weights(self):
        return {"checkpoint": os.path.abspath(self.cfg.SUPERVISED.WEIGHTS)}

    def run_convert(self, init):
        from convert import convert_checkpoint

        ckpt = self.outputs[init if init == "supervised" else "pretrain"]["checkpoint"]
        if init == "supervised" and ckpt.endswith(".pkl"):  # detectron2/Caffe2 weights (MSRA R-50.pkl): as they are
            return {"pkl": ckpt, "source": "pkl (used as is)", "verified": 0, "max_rel_error": None}
        pkl = self.path("convert", f"{init}.pkl")
        report = convert_checkpoint(ckpt, pkl, source="auto", verify=True)  # raises on failed verification
        print(report.summary())
        return {"pkl": pkl, "source": report.source, "verified": report.verified,
                "max_rel_error": report.max_rel_error}

    def run_transfer(self, init):
        from transfer import run_transfer

        t = self.cfg.TRANSFER
        output_dir = self.path("transfer", init)
        weights = self.outputs[f"convert_{init}"]["pkl"] if init != "random" else ""
        opts = [*t.OPTS, "OUTPUT_DIR", output_dir, "MODEL.WEIGHTS", weights]
        if init == "random":
            opts += ["MOCOBENCH.REQUIRE_WEIGHTS", "False", *t.RANDOM_OPTS]
        results = run_transfer(self.transfer_config_file(init), opts, num_gpus=t.NUM_GPUS, seeds=t.SEEDS, resume=True,
                               init_name=init, synth_root=self.synth_root)
        if len(results) != t.SEEDS:
            raise UsageError(f"transfer of {init} produced {len(results)} results for {t.SEEDS} seeds: "
                             f"see the log.txt files under {output_dir}")
        return {"output_dir": output_dir, "results": [r.get("results") for r in results]}

    def run_report(self):
        from transfer.report import write_report

        pretraining = [self.path(d) for d in ("pretrain", "supervised") if os.path.isdir(self.path(d))]
        dirs = [self.path("transfer")] + pretraining
        summary = write_report(dirs, self.run_dir)
        print(summary["markdown"])
        return {"files": summary["files"]}

    @staticmethod
    def _call(main, argv, what):
        rc = main(argv)
        if rc:
            raise UsageError(f"{what} {' '.join(argv)} exited with {rc}")

    # ---- driver -------------------------------------------------------------------------------------------
    def run(self):
        stages = self.stages()
        start = time.time()
        for index, (name, inputs_fn, run) in enumerate(stages, 1):
            inputs = inputs_fn()
            previous = self.manifest.stage(name)
            header = f"[{index}/{len(stages)}] {name}"
            if inputs is not None and previous.get("inputs") not in (None, inputs):
                changed = sorted(k for k in set(inputs) | set(previous["inputs"])
                                 if inputs.get(k) != previous["inputs"].get(k))
                raise UsageError(
                    f"stage {name!r} ran in {self.run_dir} with other inputs (changed: {', '.join(changed)}); "
                    "resuming would mix old and new results. Use a new OUTPUT_DIR, or delete that stage's "
                    f"outputs and its entry in {self.manifest.path} to redo it")
            if inputs is not None and previous.get("status") == "done":
                print(f"\n=== {header}: done earlier ({previous.get('seconds', 0):.0f} s), skipped", flush=True)
                self.outputs[name] = previous["outputs"]
                continue
            resumed = previous.get("status") in ("running", "failed")
            print(f"\n=== {header}{' (resuming)' if resumed else ''} | pipeline elapsed "
                  f"{time.time() - start:.0f} s", flush=True)
            t0 = time.time()
            self.manifest.update(name, status="running", inputs=inputs, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
            try:
                outputs = run()
            except BaseException as e:
                self.manifest.update(name, status="failed", error=f"{type(e).__name__}: {e}",
                                     seconds=time.time() - t0)
                raise
            self.outputs[name] = outputs
            self.manifest.update(name, status="done", outputs=outputs, seconds=time.time() - t0, error=None)
        print(f"\npipeline finished in {time.time() - start:.0f} s: {self.run_dir}", flush=True)
        return self.outputs


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="mocobench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="configs/pipeline/*.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        raise UsageError(f"overrides must come in KEY VALUE pairs, got {args.opts}")
    cfg = load_pipeline_config(args.config_file, args.opts)
    Pipeline(cfg, args.config_file).run()
    return 0
