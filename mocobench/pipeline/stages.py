"""How each stage is called, and what it reads and writes.

A stage calls the same function as its own subcommand (`mocobench data synth`, `pretrain`,
`supervised`, `convert`, `transfer`, `report`) with this run's paths and the outputs of the stages
before it: there is no second implementation here, only the wiring. A stage's inputs (its merged
config, the sha256 of the files it reads) are what a re-run compares to decide whether it is done.
"""
import dataclasses
import functools
import os
from typing import Callable, Optional

from mocobench.pipeline.config import stage_config, trains_classifier, transfer_config_file
from mocobench.pipeline.machines import ONE_MACHINE
from mocobench.utils.errors import CommandFailed, UsageError
from mocobench.utils.fileio import file_sha256


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    # () -> the stage's inputs, evaluated when the stage is reached (KeyError: they read the outputs
    # of an earlier stage that has not run yet); None: none to compare, the stage always runs
    inputs: Callable
    run: Callable  # () -> the stage's outputs, recorded in the manifest


@dataclasses.dataclass(frozen=True)
class Need:
    """A file or folder a stage reads; `produced`: an earlier stage of the pipeline writes it;
    `check`: () -> None, raising UsageError when the input is there but unusable (a dataset's
    layout, an empty class folder), run when it exists."""

    what: str
    path: str
    produced: bool
    check: Optional[Callable] = None

    @functools.cached_property
    def problem(self):
        """Why the stage cannot read it (None: it can, or an earlier stage writes it)."""
        exists = os.path.exists(self.path)
        if self.produced and not exists:
            return None
        if self.check is None:
            return None if exists else "does not exist"
        try:
            self.check()  # also when missing: it says what is missing, and the layout expected
        except UsageError as e:  # one line: the layout's lines joined
            return " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
        return None

    @property
    def missing(self):
        return self.problem is not None

    @property
    def state(self):
        if self.problem:
            return "MISSING" if self.problem == "does not exist" else f"BROKEN: {self.problem}"
        return "from an earlier stage" if self.produced and not os.path.exists(self.path) else "ok"


class Wiring:
    """The stages of one pipeline config, wired to its run directory. `outputs` (stage name ->
    outputs) holds what the stages before the current one produced."""

    def __init__(self, cfg, config_file, place=ONE_MACHINE):
        self.cfg = cfg
        self.config_file = os.path.abspath(config_file)
        self.run_dir = os.path.abspath(cfg.OUTPUT_DIR)
        self.place = place
        self.outputs = {}

    # ---- paths and configs ---------------------------------------------------------------------
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
        raise UsageError("set DATA.PRETRAIN_ROOT (an ImageFolder root with train/) or "
                         "DATA.SYNTH True")

    def stage_config(self, name, init=None):
        return stage_config(self.cfg, self.config_file, name, init)

    def transfer_config_file(self, init):
        return transfer_config_file(self.cfg, init)

    # ---- the stages, in order ------------------------------------------------------------------
    def stages(self):
        """[Stage] in the order they run."""
        cfg = self.cfg
        out = []
        if cfg.DATA.SYNTH:
            out.append(Stage("data", self.synth_inputs, self.run_synth))
        out.append(Stage("pretrain", lambda: self.classifier_inputs("PRETRAIN"), self.run_pretrain))
        if "supervised" in cfg.TRANSFER.INITS:
            out.append(self._supervised_stage())
        for init in ("moco", "supervised"):
            if init in cfg.TRANSFER.INITS:
                out.append(Stage(f"convert_{init}",
                                 lambda init=init: {"checkpoint_sha256": self._upstream_sha(init)},
                                 lambda init=init: self.run_convert(init)))
        for init in cfg.TRANSFER.INITS:
            out.append(Stage(f"transfer_{init}", lambda init=init: self.transfer_inputs(init),
                             lambda init=init: self.run_transfer(init)))
        out.append(Stage("report", lambda: None, self.run_report))  # cheap: always redone
        return out

    def _supervised_stage(self):
        cfg = self.cfg
        if cfg.SUPERVISED.WEIGHTS:
            return Stage("supervised", self.weights_inputs, self.use_supervised_weights)
        if cfg.SUPERVISED.CONFIG_FILE:
            return Stage("supervised", lambda: self.classifier_inputs("SUPERVISED"),
                         self.run_supervised)
        raise UsageError("TRANSFER.INITS has 'supervised': set SUPERVISED.WEIGHTS (a torchvision "
                         "checkpoint) or SUPERVISED.CONFIG_FILE (train one)")

    def stage_outputs(self, name):
        """The files and folders a stage writes (moved aside when it is redone)."""
        init = name.split("_", 1)[1] if "_" in name else None
        if name in ("data", "pretrain"):
            return [self.path(name)]
        if name == "supervised":
            trained = self.cfg.SUPERVISED.CONFIG_FILE and not self.cfg.SUPERVISED.WEIGHTS
            return [self.path("supervised")] if trained else []
        if name.startswith("convert_"):  # the weights and the converter's report beside them
            from convert.api import report_path

            pkl = self.path("convert", f"{init}.pkl")
            return [pkl, report_path(pkl)]
        if name.startswith("transfer_"):
            return [self.path("transfer", init)]
        return []

    def needs(self, name):
        """[Need] of the files a stage reads, each with the check of its content."""
        cfg = self.cfg
        if trains_classifier(cfg, name):
            train = os.path.join(self.pretrain_root, "train")
            return [Need(f"{name} config", cfg[name.upper()].CONFIG_FILE, False),
                    Need("ImageFolder train/", train, bool(cfg.DATA.SYNTH),
                         functools.partial(_check_image_folder, train))]
        if name == "supervised":
            weights = cfg.SUPERVISED.WEIGHTS
            return [Need("SUPERVISED.WEIGHTS", weights, False,
                         functools.partial(_check_weights_file, weights))]
        if name.startswith("convert_"):
            return [Need("checkpoint", f"last checkpoint of the {name.split('_')[1]} stage", True)]
        if name.startswith("transfer_"):
            init = name.split("_", 1)[1]
            needs = [Need("transfer config", self.transfer_config_file(init), False)]
            if init != "random":
                needs.append(Need("converted weights", self.path("convert", f"{init}.pkl"), True))
            if cfg.DATA.SYNTH:
                needs.append(Need("generated detection data", self.path("data"), True))
            return needs + self.dataset_needs(init)
        return []

    def dataset_needs(self, init):
        """A Need per dataset the transfer of `init` trains or tests on: detectron2's builtin names
        under $DETECTRON2_DATASETS (its own layout, down to the annotation files and one image that
        opens), generated ones under this run's data/ (written by the data stage) or their root."""
        from transfer.datasets import datasets_root, resolve_synth_root

        c = self.stage_config("TRANSFER", init)
        training = set(c.DATASETS.TRAIN)
        needs = []
        for dataset in dict.fromkeys([*c.DATASETS.TRAIN, *c.DATASETS.TEST]):
            if dataset.startswith("synth_"):
                root = self.synth_root or resolve_synth_root(c.MOCOBENCH.SYNTH_ROOT)
                where = "generated"
            else:
                root, where = os.path.abspath(datasets_root()), "DETECTRON2_DATASETS"
            needs.append(Need(f"dataset {dataset} ({where})", root, bool(self.synth_root),
                              functools.partial(_check_dataset, dataset, dataset in training,
                                                root if where == "generated" else None)))
        return needs

    # ---- inputs: what a re-run compares --------------------------------------------------------
    def synth_inputs(self):
        d = self.cfg.DATA
        return {"preset": d.SYNTH_PRESET, "seed": d.SYNTH_SEED, "opts": list(d.SYNTH_OPTS)}

    def classifier_inputs(self, name):
        node = self.cfg[name]
        return {"config_file": os.path.basename(node.CONFIG_FILE),
                "config": self.stage_config(name).dump(), "opts": list(node.OPTS),
                "data": self.pretrain_root}

    def weights_inputs(self):
        weights = self.cfg.SUPERVISED.WEIGHTS
        return {"weights": weights, "sha256": sha_or_error(weights, "SUPERVISED.WEIGHTS")}

    def _upstream_sha(self, init):
        ckpt = self.outputs[init if init == "supervised" else "pretrain"]["checkpoint"]
        return sha_or_error(ckpt, f"{init} checkpoint")

    def transfer_inputs(self, init):
        t = self.cfg.TRANSFER
        config_file = self.transfer_config_file(init)
        with open(config_file) as f:
            text = f.read()
        inputs = {"config_file": os.path.basename(config_file), "config_text": text,
                  "config": self.stage_config("TRANSFER", init).dump(), "opts": list(t.OPTS),
                  "seeds": t.SEEDS}
        if init != "random":
            pkl = self.outputs[f"convert_{init}"]["pkl"]
            inputs["weights_sha256"] = sha_or_error(pkl, f"{init} .pkl")
        else:
            inputs["random_opts"] = list(t.RANDOM_OPTS)
        return inputs

    # ---- runs: each stage's own command --------------------------------------------------------
    def run_synth(self):
        from synth import cli as synth

        argv = ["synth", "--out", self.synth_root, "--preset", self.cfg.DATA.SYNTH_PRESET,
                "--seed", str(self.cfg.DATA.SYNTH_SEED), *self.cfg.DATA.SYNTH_OPTS]
        call_stage(synth.main, argv, "mocobench data")
        return {"root": self.synth_root}

    def run_pretrain(self):
        from pretrain import train

        return self._train_classifier(train, self.cfg.PRETRAIN, "pretrain", "mocobench pretrain")

    def run_supervised(self):
        from pretrain import supervised

        return self._train_classifier(supervised, self.cfg.SUPERVISED, "supervised",
                                      "mocobench supervised")

    def _train_classifier(self, module, node, subdir, what):
        from mocobench import launch
        from pretrain.checkpoint import find_resume_path

        output_dir = self.path(subdir)
        argv = ["--config-file", node.CONFIG_FILE, "--resume", "auto",
                "OUTPUT_DIR", output_dir, "DATA.ROOT", self.pretrain_root, *node.OPTS]
        nproc = self.cfg.PRETRAIN.NPROC_PER_NODE or launch.default_nproc_per_node(list(node.OPTS))
        place = self.place
        if place.num_machines == 1:
            call_stage(lambda a: launch.run_on_this_node(module.__name__, a, nproc), argv, what)
        else:  # torchrun's multi-node rendezvous on machine 0's address
            endpoint = place.dist_url.removeprefix("tcp://")
            nodes = str(place.num_machines)
            call_stage(lambda a: launch.run_elastic(module.__name__, a, nproc, nodes,
                                                    place.machine_rank, endpoint), argv, what)
        if place.machine_rank:  # this machine's share is done; machine 0 checks and records
            return {}
        ckpt = find_resume_path(output_dir, "auto")
        if ckpt is None:
            raise UsageError(f"{what} finished but left no checkpoint in {output_dir} "
                             f"(no last_checkpoint file)")
        return {"checkpoint": ckpt, "output_dir": output_dir}

    def use_supervised_weights(self):
        return {"checkpoint": os.path.abspath(self.cfg.SUPERVISED.WEIGHTS)}

    def run_convert(self, init):
        from convert import convert_checkpoint

        ckpt = self.outputs[init if init == "supervised" else "pretrain"]["checkpoint"]
        if init == "supervised" and ckpt.endswith(".pkl"):
            # detectron2/Caffe2 weights (MSRA R-50.pkl): used as they are
            return {"pkl": ckpt, "source": "pkl (used as is)", "verified": 0, "max_rel_error": None}
        pkl = self.path("convert", f"{init}.pkl")
        # raises on a failed verification
        report = convert_checkpoint(ckpt, pkl, source="auto", verify=True)
        print(report.summary())
        return {"pkl": pkl, "source": report.source, "verified": report.verified,
                "max_rel_error": report.max_rel_error}

    def run_transfer(self, init, trials=None):
        """The trials of `init` (`trials`: these indices only, the others left to other processes);
        returns the stage's outputs."""
        from mocobench.utils.preempt import Preempted
        from transfer import run_transfer

        t, place = self.cfg.TRANSFER, self.place
        output_dir = self.path("transfer", init)
        weights = self.outputs[f"convert_{init}"]["pkl"] if init != "random" else ""
        opts = [*t.OPTS, "OUTPUT_DIR", output_dir, "MODEL.WEIGHTS", weights]
        if init == "random":
            opts += ["MOCOBENCH.REQUIRE_WEIGHTS", "False", *t.RANDOM_OPTS]
        try:
            results = run_transfer(self.transfer_config_file(init), opts, num_gpus=t.NUM_GPUS,
                                   seeds=t.SEEDS, resume=True, init_name=init,
                                   synth_root=self.synth_root, num_machines=place.num_machines,
                                   machine_rank=place.machine_rank, dist_url=place.dist_url,
                                   trials=trials)
        except Preempted as e:  # as call_stage does for the other stages: the same exit code
            raise CommandFailed(f"mocobench transfer ({init}) {e}; run the same pipeline command "
                                f"again to resume", e.exit_code, is_error=False) from None
        if place.machine_rank:  # rank 0's machine writes the results, machine 0 records them
            return {"output_dir": output_dir}
        if trials is not None:
            return self.trial_outputs(init, trials)
        if len(results) != t.SEEDS:
            raise UsageError(f"transfer of {init} produced {len(results)} results for {t.SEEDS} "
                             f"seeds: see the log.txt files under {output_dir}")
        return {"output_dir": output_dir, "results": [r.get("results") for r in results]}

    def trial_dir(self, init, index):
        return self.path("transfer", init, f"seed{index}")

    def trial_outputs(self, init, trials):
        """{"output_dir", "results"} of the finished trials `trials` of `init`, read from their
        results.json (UsageError naming the first one that has none)."""
        from transfer import record

        results = []
        for index in trials:
            path = os.path.join(self.trial_dir(init, index), record.RESULTS_FILE)
            if not os.path.isfile(path):
                raise UsageError(f"transfer of {init}: trial seed{index} left no {path}: see its "
                                 "log.txt")
            results.append(record.read_record(path).get("results"))
        return {"output_dir": self.path("transfer", init), "results": results}

    def close_transfer(self, init):
        """The outputs of transfer stage `init` once every trial has finished, read from their
        records, and the summary over all of them written (by whichever process ended last)."""
        from transfer.run import write_summary

        outputs = self.trial_outputs(init, range(self.cfg.TRANSFER.SEEDS))
        write_summary(outputs["output_dir"])
        return outputs

    def partial_report(self):
        """report.md over the trials finished so far (a failed seed hides none of the others),
        quietly; a courtesy: a failure is said in one line, the final report says the rest."""
        import contextlib
        import io

        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.run_report(partial=True)
        except Exception as e:  # noqa: BLE001
            print(f"partial report not written: {type(e).__name__}: {e}", flush=True)

    def run_report(self, partial=False):
        """report.md/.json/.csv and the plots; `partial`: while trials still run, over those
        finished, without the plots."""
        from transfer.report import write_report

        pretraining = [self.path(d) for d in ("pretrain", "supervised")
                       if os.path.isdir(self.path(d))]
        summary = write_report([self.path("transfer")] + pretraining, self.run_dir,
                               plots=not partial)
        print(summary["markdown"])
        return {"files": summary["files"]}


def _check_image_folder(root):
    from pretrain.data import check_image_folder

    check_image_folder(root)


def _check_weights_file(path):
    if not os.path.exists(path):
        raise UsageError("does not exist")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise UsageError("is not a non-empty file (expected a torchvision .pth or a detectron2 "
                         ".pkl)")


def _check_dataset(name, training, synth_root):
    from transfer.datasets import check_dataset, register_synth_datasets

    if synth_root:  # the synth_* names of this tree
        register_synth_datasets(synth_root)
    check_dataset(name, training=training)


def sha_or_error(path, what):
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} does not exist")
    return file_sha256(path)


def call_stage(main, argv, what):
    """main(argv) of a stage's command; a stage stopped by a signal after saving stops the pipeline
    with the same exit code (CommandFailed), any other failure is an error naming the command."""
    from mocobench.utils.preempt import EXIT_CODES

    try:
        rc, reason = main(argv), ""
    except CommandFailed as e:  # an in-process command ends by raising (mocobench.utils.errors)
        rc, reason = e.exit_code, f": {e}"
    if rc in EXIT_CODES.values():
        raise CommandFailed(f"{what} stopped by a signal (exit {rc}); run the same pipeline "
                            f"command again to resume", rc, is_error=False)
    if rc:
        raise UsageError(f"{what} {' '.join(argv)} exited with {rc}{reason}")
