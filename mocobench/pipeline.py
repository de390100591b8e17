"""`mocobench pipeline --config-file configs/pipeline/X.yaml [--dry-run] [--redo STAGE] [KEY VALUE ...]`.

    data (optional: generate) -> pretrain MoCo -> supervised baseline (train, or a given checkpoint)
    -> convert both (verified) -> transfer {moco, supervised, random} x seeds -> report

Each stage calls the same function as its own subcommand (`mocobench data synth`, `pretrain`,
`supervised`, `convert`, `transfer`, `report`); there is no second implementation here, only the wiring.

Before any stage runs (and alone with --dry-run) a preflight merges and validates every stage's config with
its OPTS (an error names the pipeline yaml and the list), checks that every input file exists, and prints the
plan: each stage, what it needs, what is missing, whether it is done, to run, to resume or to redo, and its
size and expected time: from this run's own measurements, else scaled from the same work measured by an
earlier pipeline on this machine (`stage_seconds.json` in $MOCOBENCH_CACHE, default ~/.cache/mocobench).
Relative sub-config paths resolve against the pipeline yaml's folder, then the shipped configs
(mocobench.utils.config.resolve_config_path), so a pipeline runs from any working directory.

The run directory's `manifest.json` records, per stage, its inputs (merged config, overrides, sha256 of
the checkpoints it reads), outputs, status, timings and the git commit that ran it, plus the software
versions. Re-running the same command skips stages that are done with unchanged inputs, resumes an
interrupted or failed one (pretraining from its last checkpoint, transfer from each seed's), and redoes a
stage whose inputs changed, or one named with --redo: its old outputs are moved to superseded/<time>/, never
deleted, and the stages after it see the new inputs and are redone in turn.

`--stage STAGE` runs one stage (those before it must be done). `--launcher slurm` (mocobench.launch) submits
one job per stage that is not done, each running `--stage STAGE` with the stage's own resources (NUM_NODES
nodes for pretrain, supervised and transfer) after the previous job succeeded; a stage that spans several nodes
gets this node's place as transfer's --num-machines / --machine-rank / --dist-url, and machine 0 writes the
manifest.
"""
import argparse
import json
import os
import subprocess
import time

from fvcore.common.config import CfgNode

from mocobench.utils.config import merge_config, resolve_config_path
from mocobench.utils.env import software_versions
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write, file_sha256

MANIFEST = "manifest.json"
CACHE_ENV = "MOCOBENCH_CACHE"
INITS = ("moco", "supervised", "random")
EARLIER = "an earlier stage"  # changed_inputs when they depend on a stage that has not run yet


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
    # processes for pretrain and supervised on each node: 0 = every visible GPU (1 on CPU); mocobench.launch
    cfg.PRETRAIN.NPROC_PER_NODE = 0
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
    cfg.TRANSFER.NUM_GPUS = 0  # 0 = every visible GPU when the detection config runs on CUDA, else 1 process
    cfg.TRANSFER.RANDOM_OPTS = []  # extra overrides for the random-init runs
    # nodes of the stages that train (pretrain, supervised, transfer_*); the others run on one. Several nodes need
    # a launcher that starts each stage on all of them: `mocobench pipeline --launcher slurm` (a job per stage)
    cfg.NUM_NODES = 1
    return cfg


def load_pipeline_config(config_file, opts) -> CfgNode:
    """The pipeline config with every path made absolute: sub-configs found by resolve_config_path (relative
    to this yaml's folder first), data paths and OUTPUT_DIR relative to the working directory."""
    cfg = merge_config(get_pipeline_cfg(), config_file, opts)
    unknown = [i for i in cfg.TRANSFER.INITS if i not in INITS]
    if unknown or not cfg.TRANSFER.INITS:
        raise UsageError(f"TRANSFER.INITS {list(cfg.TRANSFER.INITS)}: expected a non-empty subset of {list(INITS)}")
    for key in ("PRETRAIN.CONFIG_FILE", "TRANSFER.CONFIG_FILE"):
        node, leaf = key.split(".")
        if not cfg[node][leaf]:
            raise UsageError(f"{config_file}: {key} is required")
    if cfg.TRANSFER.SEEDS < 1:
        raise UsageError(f"{config_file}: TRANSFER.SEEDS = {cfg.TRANSFER.SEEDS} must be >= 1")
    if cfg.NUM_NODES < 1:
        raise UsageError(f"{config_file}: NUM_NODES = {cfg.NUM_NODES} must be >= 1")
    here = os.path.dirname(os.path.abspath(config_file))
    for node in ("PRETRAIN", "SUPERVISED", "TRANSFER"):
        if cfg[node].CONFIG_FILE:
            cfg[node].CONFIG_FILE = resolve_config_path(cfg[node].CONFIG_FILE, here,
                                                        f"{config_file}: {node}.CONFIG_FILE")
    for init, path in cfg.TRANSFER.CONFIG_FILES.items():
        if path:
            cfg.TRANSFER.CONFIG_FILES[init] = resolve_config_path(path, here,
                                                                  f"{config_file}: TRANSFER.CONFIG_FILES.{init}")
    for node, key in (("DATA", "PRETRAIN_ROOT"), ("SUPERVISED", "WEIGHTS")):
        if cfg[node][key]:
            cfg[node][key] = os.path.abspath(cfg[node][key])
    cfg.OUTPUT_DIR = os.path.abspath(cfg.OUTPUT_DIR)
    cfg.freeze()
    return cfg


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

    def __init__(self, run_dir, writable=True):
        self.path = os.path.join(run_dir, MANIFEST)
        self.writable = writable  # False on the other machines of a multi-node stage: machine 0 records
        self.data = {"stages": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.data = json.load(f)

    def save(self):
        if not self.writable:
            return
        with atomic_write(self.path, "w") as f:
            json.dump(self.data, f, indent=2)
            f.write("\n")

    def stage(self, name):
        return self.data["stages"].get(name, {})

    def update(self, name, **fields):
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()


class Pipeline:
    def __init__(self, cfg, config_file, redo=(), only=None, num_machines=1, machine_rank=0, dist_url="auto"):
        """`only`: run this stage alone (the stages before it must be done): one job of `--launcher slurm`.
        `num_machines`, `machine_rank`, `dist_url`: this machine's place in a stage that spans NUM_NODES
        machines (transfer's --num-machines / --machine-rank / --dist-url); machine 0 writes the manifest."""
        self.cfg = cfg
        self.config_file = os.path.abspath(config_file)
        self.run_dir = os.path.abspath(cfg.OUTPUT_DIR)
        self.num_machines, self.machine_rank, self.dist_url = num_machines, machine_rank, dist_url
        # read only; written once the preflight has passed
        self.manifest = Manifest(self.run_dir, writable=machine_rank == 0)
        self.outputs = {}  # stage name -> outputs, for the stages after it
        self.redo = set(redo)
        self.only = only
        self.commit = git_commit()

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
    def trains(self, name):
        """Stages that train on many processes: they span NUM_NODES nodes with their GPUs; the others run on one
        node without a GPU (data generation, conversion, the report)."""
        return name in ("pretrain", "supervised") and not (name == "supervised" and self.cfg.SUPERVISED.WEIGHTS) \
            or name.startswith("transfer_")

    def stage_nodes(self, name):
        return self.cfg.NUM_NODES if self.trains(name) else 1

    def stage_gpus(self, name, gpus_per_node):
        """GPUs per node of the stage's job: its own process count (PRETRAIN.NPROC_PER_NODE, TRANSFER.NUM_GPUS),
        else `gpus_per_node` (the launcher's --gpus-per-node); 0 for the stages that do not train."""
        if not self.trains(name):
            return 0
        own = self.cfg.TRANSFER.NUM_GPUS if name.startswith("transfer_") else self.cfg.PRETRAIN.NPROC_PER_NODE
        return own or gpus_per_node

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
        name = [n for n in ("PRETRAIN", "SUPERVISED", "TRANSFER") if self.cfg[n] is node][0]
        return {"config_file": os.path.basename(node.CONFIG_FILE), "config": self.stage_config(name).dump(),
                "opts": list(node.OPTS)}

    def stage_config(self, name, init=None):
        """The merged, validated config of stage PRETRAIN / SUPERVISED / TRANSFER (of `init`, which may have its
        own CONFIG_FILES entry) with its OPTS (run paths left at their defaults: they are the pipeline's to set);
        errors name the pipeline yaml and the list."""
        node = self.cfg[name]
        source = f"{os.path.relpath(self.config_file)}: {name}.OPTS"
        if name == "TRANSFER":
            from transfer.config import add_mocobench_config, get_cfg  # detectron2's, after mocobench.utils.d2compat

            cfg = get_cfg()
            add_mocobench_config(cfg)
            config_file = self.transfer_config_file(init) if init else node.CONFIG_FILE
            return merge_config(cfg, config_file, list(node.OPTS), source)
        from pretrain.config import load_config

        return load_config(node.CONFIG_FILE, [*node.OPTS, "DATA.ROOT", "<pipeline>"], moco=name == "PRETRAIN",
                           opts_source=source)

    def _sha_or_error(self, path, what):
        if not os.path.isfile(path):
            raise UsageError(f"{what} {path!r} does not exist")
        return file_sha256(path)

    def _upstream_sha(self, init):
        ckpt = self.outputs[init if init == "supervised" else "pretrain"]["checkpoint"]
        return self._sha_or_error(ckpt, f"{init} checkpoint")

    def transfer_config_file(self, init):
        return self.cfg.TRANSFER.CONFIG_FILES[init.upper()] or self.cfg.TRANSFER.CONFIG_FILE

    def _transfer_inputs(self, init):
        config_file = self.transfer_config_file(init)
        with open(config_file) as f:
            text = f.read()
        inputs = {"config_file": os.path.basename(config_file), "config_text": text,
                  "config": self.stage_config("TRANSFER", init).dump(), "opts": list(self.cfg.TRANSFER.OPTS),
                  "seeds": self.cfg.TRANSFER.SEEDS}
        if init != "random":
            inputs["weights_sha256"] = self._sha_or_error(self.outputs[f"convert_{init}"]["pkl"], f"{init} .pkl")
        else:
            inputs["random_opts"] = list(self.cfg.TRANSFER.RANDOM_OPTS)
        return inputs

    def run_synth(self):
        from synth import cli as synth

        argv = ["synth", "--out", self.synth_root, "--preset", self.cfg.DATA.SYNTH_PRESET,
                "--seed", str(self.cfg.DATA.SYNTH_SEED), *self.cfg.DATA.SYNTH_OPTS]
        self._call(synth.main, argv, "mocobench data")
        return {"root": self.synth_root}

    def _train_classifier_stage(self, module, node, subdir, what):
        output_dir = self.path(subdir)
        argv = ["--config-file", node.CONFIG_FILE, "--resume", "auto",
                "OUTPUT_DIR", output_dir, "DATA.ROOT", self.pretrain_root, *node.OPTS]
        from mocobench import launch

        nproc = self.cfg.PRETRAIN.NPROC_PER_NODE or launch.default_nproc_per_node(list(node.OPTS))
        if self.num_machines == 1:
            self._call(lambda a: launch.run_on_this_node(module.__name__, a, nproc), argv, what)
        else:  # torchrun's multi-node rendezvous on machine 0's address
            endpoint = self.dist_url.removeprefix("tcp://")
            self._call(lambda a: launch.run_elastic(module.__name__, a, nproc, str(self.num_machines),
                                                    self.machine_rank, endpoint), argv, what)
        if self.machine_rank:  # this machine's share is done; machine 0 checks and records the outputs
            return {}
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
        from mocobench.utils.preempt import Preempted

        try:
            results = run_transfer(self.transfer_config_file(init), opts, num_gpus=t.NUM_GPUS, seeds=t.SEEDS,
                                   resume=True, init_name=init, synth_root=self.synth_root,
                                   num_machines=self.num_machines, machine_rank=self.machine_rank,
                                   dist_url=self.dist_url)
        except Preempted as e:  # as _call does for the other stages: the pipeline stops with the same code
            print(f"mocobench transfer ({init}) {e}; run the same pipeline command again to resume", flush=True)
            raise SystemExit(e.exit_code) from None
        if self.machine_rank:  # rank 0's machine writes the results (machine 0 checks and records them)
            return {"output_dir": output_dir}
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
        from mocobench.utils.preempt import EXIT_CODES

        rc = main(argv)
        if rc in EXIT_CODES.values():  # stopped by a signal after saving: the pipeline stops with the same code
            print(f"{what} stopped by a signal (exit {rc}); run the same pipeline command again to resume", flush=True)
            raise SystemExit(rc)
        if rc:
            raise UsageError(f"{what} {' '.join(argv)} exited with {rc}")

    # ---- preflight, plan, driver ---------------------------------------------------------------------------
    def stage_outputs(self, name):
        """The files and folders a stage writes (moved aside when it is redone)."""
        init = name.split("_", 1)[1] if "_" in name else None
        return {"data": [self.path("data")], "pretrain": [self.path("pretrain")],
                "supervised": [self.path("supervised")] if self.cfg.SUPERVISED.CONFIG_FILE and
                not self.cfg.SUPERVISED.WEIGHTS else [],
                "report": []}.get(name) or ([self.path("convert", f"{init}.pkl")] if name.startswith("convert_")
                                            else [self.path("transfer", init)] if name.startswith("transfer_") else [])

    def needs(self, name):
        """[(what, path, produced by an earlier stage?)] of the files a stage reads."""
        cfg = self.cfg
        if name in ("pretrain", "supervised") and not (name == "supervised" and cfg.SUPERVISED.WEIGHTS):
            return [(f"{name} config", cfg[name.upper()].CONFIG_FILE, False),
                    ("ImageFolder train/", os.path.join(self.pretrain_root, "train"), bool(cfg.DATA.SYNTH))]
        if name == "supervised":
            return [("SUPERVISED.WEIGHTS", cfg.SUPERVISED.WEIGHTS, False)]
        if name.startswith("convert_"):
            return [("checkpoint", f"last checkpoint of the {name.split('_')[1]} stage", True)]
        if name.startswith("transfer_"):
            init = name.split("_", 1)[1]
            needs = [("transfer config", self.transfer_config_file(init), False)]
            if init != "random":
                needs.append(("converted weights", self.path("convert", f"{init}.pkl"), True))
            if cfg.DATA.SYNTH:
                needs.append(("generated detection data", self.path("data"), True))
            return needs
        return []

    def size(self, name):
        """What the stage computes, in the units its time scales with."""
        cfg = self.cfg
        if name in ("pretrain", "supervised") and not (name == "supervised" and cfg.SUPERVISED.WEIGHTS):
            c = self.stage_config(name.upper())
            return f"{c.SOLVER.EPOCHS} epochs at batch {c.SOLVER.BATCH_SIZE}, {c.MODEL.ARCH} at {c.INPUT.SIZE} px"
        if name.startswith("transfer_"):
            c = self.stage_config("TRANSFER", name.split("_", 1)[1])
            return f"{cfg.TRANSFER.SEEDS} seeds x {c.SOLVER.MAX_ITER} iterations at {c.SOLVER.IMS_PER_BATCH} images"
        return ""

    def work(self, name):
        """(what a stage computes, except its length; its length in units its time scales with): two stages
        with the same first part run at the same seconds per unit on one machine."""
        cfg = self.cfg
        if name in ("pretrain", "supervised") and not (name == "supervised" and cfg.SUPERVISED.WEIGHTS):
            c = self.stage_config(name.upper())
            data = self.pretrain_root if not cfg.DATA.SYNTH else \
                f"synth {cfg.DATA.SYNTH_PRESET} {list(cfg.DATA.SYNTH_OPTS)}"
            return (f"{name} {c.MODEL.ARCH} {c.INPUT.SIZE} px, batch {c.SOLVER.BATCH_SIZE}, device "
                    f"{c.DEVICE or 'auto'} x {cfg.PRETRAIN.NPROC_PER_NODE} x {cfg.NUM_NODES} nodes, data {data}",
                    c.SOLVER.EPOCHS)
        if name.startswith("transfer_"):
            init = name.split("_", 1)[1]
            c = self.stage_config("TRANSFER", init)
            return (f"transfer {os.path.basename(self.transfer_config_file(init))} {c.MODEL.RESNETS.DEPTH}, "
                    f"{c.INPUT.MIN_SIZE_TRAIN} px, {c.SOLVER.IMS_PER_BATCH} images, device {c.MODEL.DEVICE} x "
                    f"{cfg.TRANSFER.NUM_GPUS} x {cfg.NUM_NODES} nodes, test {list(c.DATASETS.TEST)}",
                    cfg.TRANSFER.SEEDS * c.SOLVER.MAX_ITER)
        if name == "data":
            return f"data synth {cfg.DATA.SYNTH_PRESET} {list(cfg.DATA.SYNTH_OPTS)}", 1
        return name.split("_")[0], 1  # convert, report: about the same whatever the run

    @staticmethod
    def rates_file():
        root = os.environ.get(CACHE_ENV) or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mocobench")
        return os.path.join(root, "stage_seconds.json")

    @classmethod
    def read_rates(cls):
        try:
            with open(cls.rates_file()) as f:
                rates = json.load(f)
            return rates if isinstance(rates, dict) else {}
        except (OSError, ValueError):  # none yet, or unreadable: no estimates from it
            return {}

    def record_rate(self, name, seconds):
        """This machine's seconds per unit of the stage's work, for the estimates of later pipelines."""
        key, units = self.work(name)
        rates = self.read_rates()
        rates[key] = {"seconds_per_unit": seconds / max(units, 1), "measured": time.strftime("%Y-%m-%d")}
        try:
            with atomic_write(self.rates_file(), "w") as f:
                json.dump(rates, f, indent=1, sort_keys=True)
        except OSError:  # a read-only home: only the estimates are lost
            pass

    def expected_seconds(self, name, finished, rates):
        """An estimate from this run's own measurements: the stage's earlier run, else a finished stage of the
        same kind (transfer_*, convert_*); else the same work's rate measured by an earlier pipeline on this
        machine (`rates`, from read_rates) times this stage's length; else None."""
        previous = self.manifest.stage(name).get("seconds")
        if previous and self.manifest.stage(name).get("status") == "done":
            return previous
        kind = name.split("_")[0]
        same = [t for n, t in finished.items() if n.split("_")[0] == kind and "_" in n]
        if same:
            return sum(same) / len(same)
        key, units = self.work(name)
        rate = rates.get(key)
        return rate["seconds_per_unit"] * units if rate else None

    def time_left(self, names, measured):
        """' | expected left ...' for the stages `names` (this one included), from measured stage times."""
        rates = self.read_rates()
        known = [t for t in (self.expected_seconds(n, measured, rates) for n in names) if t]
        unknown = len(names) - len(known)
        if not known:
            return ""
        return f" | expected left ~{sum(known):.0f} s" + (f" + {unknown} stage(s) not measured yet" if unknown else "")

    def plan(self):
        """Preflight: every stage's config merged and validated, every input checked. Returns
        [(index, name, action, detail, missing, size, expected seconds)]; writes nothing."""
        stages = self.stages()
        names = [name for name, _, _ in stages]
        unknown = sorted(self.redo - set(names))
        if unknown:
            raise UsageError(f"--redo {', '.join(unknown)}: not a stage of this pipeline; stages: {', '.join(names)}")
        for name in ("PRETRAIN", "SUPERVISED"):
            if self.cfg[name].CONFIG_FILE and not (name == "SUPERVISED" and self.cfg.SUPERVISED.WEIGHTS):
                self.stage_config(name)  # raises naming the pipeline yaml and the list
        for init in self.cfg.TRANSFER.INITS:
            self.stage_config("TRANSFER", init)
        rates = self.read_rates()
        finished = {n: s.get("seconds") for n, s in self.manifest.data["stages"].items()
                    if s.get("status") == "done" and s.get("seconds")}
        rows = []
        for index, (name, inputs_fn, _) in enumerate(stages, 1):
            previous = self.manifest.stage(name)
            # a done stage's outputs are known, so are the inputs of the stages that read them
            changed = self.changed_inputs(name, inputs_fn) if previous.get("status") == "done" else []
            if name in self.redo:
                action = "redo (--redo)"
            elif changed == [EARLIER]:
                action = "check (its inputs are known once an earlier stage has run)"
            elif changed:
                action = f"redo (inputs changed: {', '.join(changed)})"
            elif previous.get("status") == "done" and name != "report":
                action = "done"
                self.outputs[name] = previous["outputs"]
            elif previous.get("status") in ("running", "failed"):
                error = previous.get("error")
                action = f"resume ({previous['status']}" + (f": {error}" if error else "") + ")"
            else:
                action = "run"
            missing = [f"{what} {path}" for what, path, produced in self.needs(name)
                       if not produced and not os.path.exists(path)]
            rows.append((index, name, action, self.needs(name), missing, self.size(name),
                         None if action == "done" else self.expected_seconds(name, finished, rates)))
        self.outputs = {}
        return rows

    def changed_inputs(self, name, inputs_fn):
        """The input keys that differ from what the stage recorded (it then has to be redone)."""
        try:
            inputs = inputs_fn()
        except KeyError:  # an earlier stage has no outputs yet (it runs first): this one's inputs are unknown
            return [EARLIER]
        return self.diff_inputs(name, inputs)

    def diff_inputs(self, name, inputs):
        recorded = self.manifest.stage(name).get("inputs")
        if inputs is None or recorded is None:
            return []
        return sorted(k for k in set(inputs) | set(recorded) if inputs.get(k) != recorded.get(k))

    def print_plan(self, rows):
        print(f"pipeline {self.config_file} -> {self.run_dir}")
        for index, name, action, needs, _, size, seconds in rows:
            eta = f"~{seconds:.0f} s" if seconds else "time unknown until it runs once on this machine"
            print(f"  [{index}/{len(rows)}] {name:<20} {action}" + (f" | {size}" if size else "")
                  + ("" if action == "done" else f" | {eta}"))
            for what, path, produced in needs:
                state = "MISSING" if not produced and not os.path.exists(path) else \
                    ("from an earlier stage" if produced and not os.path.exists(path) else "ok")
                print(f"        needs {what}: {path} [{state}]")
        missing = [m for row in rows for m in row[4]]
        known = [row[6] for row in rows if row[2] != "done"]
        if all(known):
            print(f"  expected time of the remaining stages: ~{sum(known):.0f} s")
        print(f"  missing inputs: {', '.join(missing)}" if missing else "  all inputs present", flush=True)
        return missing

    def move_aside(self, name, stamp):
        """Move a redone stage's old outputs to superseded/<stamp>/ (nothing is deleted)."""
        moved = []
        for path in self.stage_outputs(name):
            if os.path.exists(path):
                target = self.path("superseded", stamp, os.path.relpath(path, self.run_dir))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(path, target)
                moved.append(os.path.relpath(target, self.run_dir))
        return moved

    def check_machines(self):
        """Each stage this command runs is started on as many machines as it spans: NUM_NODES for the stages
        that train, one for the others. (`--launcher slurm` submits each stage as a job of that many nodes.)"""
        names = [name for name, _, _ in self.stages()]
        if self.only and self.only not in names:
            raise UsageError(f"--stage {self.only}: not a stage of this pipeline; stages: {', '.join(names)}")
        if self.only and self.redo - {self.only}:
            raise UsageError(f"--redo {', '.join(sorted(self.redo - {self.only}))} with --stage {self.only}: "
                             f"a single-stage run redoes only its own stage")
        for name in [self.only] if self.only else names:
            nodes = self.stage_nodes(name)
            if nodes != self.num_machines and self.num_machines == 1:
                raise UsageError(f"{self.config_file}: NUM_NODES {self.cfg.NUM_NODES}: stage {name} "
                                 f"spans {nodes} nodes, which needs a launcher that starts it on each: "
                                 f"mocobench pipeline --launcher slurm (a job per stage); on one node set NUM_NODES 1")
            if nodes != self.num_machines:
                raise UsageError(f"--num-machines {self.num_machines}: stage {name} runs on {nodes} machine(s) "
                                 f"(NUM_NODES {self.cfg.NUM_NODES} is for pretrain, supervised and transfer)")
        if self.num_machines > 1 and not self.dist_url.startswith("tcp://"):
            raise UsageError(f"--dist-url {self.dist_url} with --num-machines {self.num_machines}: expected "
                             f"tcp://HOST:PORT (HOST: machine 0)")

    def preflight(self):
        """plan(), printed; a missing input is an error before anything runs or is written."""
        rows = self.plan()
        missing = self.print_plan(rows)
        if missing:
            raise UsageError(f"{self.config_file}: missing input(s): {'; '.join(missing)} (nothing was run)")
        return rows

    def run(self, dry_run=False):
        self.check_machines()
        rows = self.preflight()
        if self.only:  # the stages before it are other runs' (jobs') to do
            for _, name, action, *_ in rows[:[row[1] for row in rows].index(self.only)]:
                if action != "done":
                    raise UsageError(f"--stage {self.only}: the earlier stage {name} is not done ({action}); "
                                     f"run the pipeline (or its --stage {name}) first")
        if dry_run:
            return None
        if self.manifest.writable:
            os.makedirs(self.run_dir, exist_ok=True)
        self.manifest.data.update(config_file=self.config_file, config=self.cfg.dump(), versions=software_versions(),
                                  git_commit=self.commit)
        self.manifest.save()
        stages = self.stages()
        start, stamp = time.time(), time.strftime("%Y%m%d-%H%M%S")
        measured = {}
        for index, (name, inputs_fn, run) in enumerate(stages, 1):
            if self.only and index > [n for n, _, _ in stages].index(self.only) + 1:
                break  # the stages after it: their own runs (jobs)
            inputs = inputs_fn()
            previous = self.manifest.stage(name)
            header = f"[{index}/{len(stages)}] {name}"
            changed = self.diff_inputs(name, inputs)
            if inputs is not None and previous.get("status") == "done" and not changed and name not in self.redo:
                print(f"\n=== {header}: done earlier ({previous.get('seconds', 0):.0f} s), skipped", flush=True)
                self.outputs[name] = previous["outputs"]
                continue
            why = "--redo" if name in self.redo else f"inputs changed: {', '.join(changed)}" if changed else None
            if why and self.manifest.writable:
                moved = self.move_aside(name, stamp)
                self.manifest.data["stages"].pop(name, None)
                print(f"\n=== {header}: redo ({why})" + (f"; old outputs moved to {', '.join(moved)}" if moved else ""))
            resumed = not why and previous.get("status") in ("running", "failed")
            left = self.time_left([n for n, _, _ in stages[index - 1:]], measured)
            print(f"\n=== {header}{' (resuming)' if resumed else ''} | pipeline elapsed "
                  f"{time.time() - start:.0f} s{left}", flush=True)
            t0 = time.time()
            self.manifest.update(name, status="running", inputs=inputs, started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 git_commit=self.commit)
            try:
                outputs = run()
            except BaseException as e:
                self.manifest.update(name, status="failed", error=f"{type(e).__name__}: {e}",
                                     seconds=time.time() - t0)
                raise
            self.outputs[name] = outputs
            measured[name] = time.time() - t0
            self.manifest.update(name, status="done", outputs=outputs, seconds=measured[name], error=None)
            if self.machine_rank == 0:
                self.record_rate(name, measured[name])
        what = f"stage {self.only}" if self.only else "pipeline"
        print(f"\n{what} finished in {time.time() - start:.0f} s: {self.run_dir}", flush=True)
        return self.outputs


def build_parser():
    parser = argparse.ArgumentParser(prog="mocobench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="configs/pipeline/*.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every stage, list the stages, their inputs (what is missing) and expected "
                             "times; run nothing, write nothing")
    parser.add_argument("--redo", action="append", default=[], metavar="STAGE",
                        help="run STAGE again even if it is done (its old outputs go to superseded/); repeatable")
    parser.add_argument("--stage", default=None, metavar="STAGE",
                        help="run STAGE alone; the stages before it must be done (what each job of --launcher "
                             "slurm runs)")
    group = parser.add_argument_group("machines of a stage that spans NUM_NODES nodes (set by --launcher slurm; "
                                      "transfer's meaning)")
    group.add_argument("--num-machines", type=int, default=1)
    group.add_argument("--machine-rank", type=int, default=0)
    group.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides (flags may come before or after)")
    return parser


def parse(argv):
    """(args, Pipeline) of a `mocobench pipeline` command line; the config is merged and validated."""
    args = build_parser().parse_intermixed_args(argv)
    args.config_file = resolve_config_path(args.config_file, os.getcwd(), "--config-file")
    cfg = load_pipeline_config(args.config_file, args.opts)
    if not 0 <= args.machine_rank < args.num_machines:
        raise UsageError(f"--machine-rank {args.machine_rank} with --num-machines {args.num_machines}: expected "
                         f"0 <= rank < machines")
    return args, Pipeline(cfg, args.config_file, redo=args.redo, only=args.stage, num_machines=args.num_machines,
                          machine_rank=args.machine_rank, dist_url=args.dist_url)


def stage_jobs(argv, gpus_per_node):
    """For `mocobench pipeline --launcher slurm ARGV`: the preflight (printed; a missing input is an error,
    nothing is submitted), then one job per stage that is not done, in order, as
    [(stage, nodes, GPUs per node, the job's `mocobench pipeline` argv)]; and whether it is a --dry-run.
    Each job runs `--stage STAGE` through the manifest, so a re-submitted pipeline continues where it stopped."""
    args, pipeline = parse(argv)
    if args.stage or args.num_machines != 1:
        raise UsageError("--stage / --num-machines with --launcher slurm: the launcher submits a job per stage and "
                         "sets them; submit the whole pipeline")
    rows = pipeline.preflight()
    jobs = []
    for _, name, action, *_ in rows:
        if action == "done":
            continue
        job_argv = ["--config-file", pipeline.config_file, "--stage", name,
                    *(["--redo", name] if name in pipeline.redo else []), *args.opts,
                    "OUTPUT_DIR", pipeline.run_dir]  # absolute: the same run wherever the job starts
        jobs.append((name, pipeline.stage_nodes(name), pipeline.stage_gpus(name, gpus_per_node), job_argv))
    return jobs, args.dry_run


def main(argv) -> int:
    args, pipeline = parse(argv)
    pipeline.run(dry_run=args.dry_run)
    return 0
