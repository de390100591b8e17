"""What a training run tells the user while it runs: log.txt, metrics.json (one JSON object per
line, detectron2 style), TensorBoard events, optional Weights & Biases logging and a progress
display. Main process only; other ranks stay quiet. docs/logging.md describes the files."""
import importlib.util
import json
import logging
import os
import secrets
import sys

from mocobench.utils import comm
from mocobench.utils.errors import UsageError
from mocobench.utils.fileio import atomic_write


def setup_logging(logger, output_dir, tag):
    """Log lines "[time tag] message" to stdout and OUTPUT_DIR/log.txt, on the main process only."""
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    if comm.is_main_process():
        fmt = logging.Formatter(f"[%(asctime)s {tag}] %(message)s", "%m/%d %H:%M:%S")
        log_file = os.path.join(output_dir, "log.txt")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(log_file)):
            handler.setFormatter(fmt)
            logger.addHandler(handler)


def log_to_file_only(logger, level, line):
    """Write `line` into the log files of `logger` but not to the console (the caller prints it
    itself)."""
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logger.makeRecord(logger.name, level, __file__, 0, line, None, None))


WANDB_RUN_ID_FILE = "wandb_run_id.txt"


def check_wandb(key):
    """UsageError (before anything is written) when the config key `key` turns W&B logging on but
    wandb is not installed."""
    if importlib.util.find_spec("wandb") is None:
        raise UsageError(f"{key} is True but wandb is not installed: pip install -e '.[wandb]' "
                         "(or set it to False)")


class WandbRun:
    """Optional Weights & Biases logging (the `wandb` extra): the scalars of metrics.json under the
    same keys, at step = iteration, and `config` (the run's merged config) as the W&B run's config.
    Main process only. The W&B files go under $WANDB_DIR if set, else OUTPUT_DIR; WANDB_MODE=offline
    keeps them local (`wandb sync` uploads them later). The run id is kept in
    OUTPUT_DIR/wandb_run_id.txt, so a resumed run continues the same W&B run; iterations W&B already
    holds are not sent again."""

    def __init__(self, output_dir, project, name, config):
        import wandb

        id_file = os.path.join(output_dir, WANDB_RUN_ID_FILE)
        run_id = open(id_file).read().strip() if os.path.isfile(id_file) else None
        if not run_id:
            run_id = secrets.token_hex(4)  # W&B ids: [a-z0-9_-]
            with atomic_write(id_file, "w") as f:
                f.write(run_id + "\n")
        self.run = wandb.init(project=project, name=name or os.path.basename(
                                  os.path.abspath(output_dir)),
                              dir=os.environ.get("WANDB_DIR") or output_dir, config=config,
                              id=run_id, resume="allow")

    def log(self, step, scalars):
        if step < self.run.step:
            return  # W&B refuses steps below its current one (a resumed run logs them again)
        self.run.log(dict(scalars), step=step)

    def update_config(self, values):
        self.run.config.update(values, allow_val_change=True)

    def finish(self):
        self.run.finish()


def open_wandb(output_dir, settings):
    """A WandbRun on the main process when `settings` (dict: project, name, config) is given, else
    None."""
    if not settings or not comm.is_main_process():
        return None
    return WandbRun(output_dir, **settings)


class MetricsWriter:
    """metrics.json and TensorBoard (and W&B when `wandb` holds its settings: see WandbRun), the
    same scalars in each. A run resumed at iteration N first drops the records after N (they are
    about to be written again) and a line a kill cut in half; TensorBoard purges its events after N
    the same way (purge_step)."""

    def __init__(self, output_dir, start_iteration=0, wandb=None):
        self.enabled = comm.is_main_process()
        self.tb = self.wandb = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = os.path.join(output_dir, "metrics.json")
            self._truncate(path, start_iteration)
            self.json = open(path, "a")
            purge = start_iteration + 1 if start_iteration else None
            self.tb = SummaryWriter(log_dir=output_dir, purge_step=purge)
            self.wandb = open_wandb(output_dir, wandb)

    @staticmethod
    def _truncate(path, start_iteration):
        if not os.path.exists(path):
            return
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # half a line: the process was killed while writing it
                if isinstance(record, dict) and record.get("iteration", 0) <= start_iteration:
                    kept.append(json.dumps(record) + "\n")
        with atomic_write(path, "w") as f:
            f.writelines(kept)

    def write(self, iteration, **scalars):
        if not self.enabled:
            return
        rounded = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in scalars.items()}
        self.json.write(json.dumps({"iteration": iteration, **rounded}) + "\n")
        self.json.flush()
        for key, value in scalars.items():
            if key != "epoch":
                self.tb.add_scalar(key, value, iteration)
        if self.wandb is not None:
            self.wandb.log(iteration, scalars)

    def close(self):
        if self.enabled:
            self.json.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()


class Progress:
    """A tqdm bar on a terminal, showing the last metrics line's means (the loop reads its numbers
    from the device once per line) and the `update` values of the last iteration; the metrics line
    (`log`) is the one metrics.json records: window means, in log.txt and, without a bar, on
    stdout."""

    def __init__(self, logger, total, epoch, epochs, log_period):
        import time

        self.enabled = comm.is_main_process()
        self.logger, self.bar = logger, None
        self.last_means = ""  # the bar shows the last metrics line's means
        self.total, self.epoch, self.epochs, self.log_period = total, epoch, epochs, log_period
        self.clock = time.perf_counter
        self.start, self.first_i = self.clock(), None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            desc = f"epoch {epoch + 1}/{epochs}"
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, i, **stats):
        """The bar's postfix: one iteration's values."""
        if self.first_i is None:  # the epoch's first iteration here (a resumed epoch: not 0)
            self.first_i = i
        if self.bar is None:
            return
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in stats.items())
        self.bar.set_postfix_str(f"{self.last_means}this iteration: {text}", refresh=False)
        self.bar.update(1)

    def log(self, i, iteration, means, now):
        """The metrics line of iteration `iteration` (the i-th of the epoch, 0-based): `means` over
        the iterations since the previous line, `now` at this iteration."""
        if not self.enabled:
            return
        n = means.pop("n")
        first = iteration - n + 1
        span = f"iteration {iteration}" if n == 1 else f"iterations {first}-{iteration}"
        line = (f"epoch {self.epoch + 1}/{self.epochs} iter {i + 1}/{self.total}  "
                f"mean of {n} ({span}): " + "  ".join(format_scalar(k, v) for k, v in means.items())
                + "  | at iteration " + f"{iteration}: "
                + "  ".join(format_scalar(k, v) for k, v in now.items()))
        if self.bar is None:
            self.logger.info(line)
            # no bar (stdout is a file or a pipe: a SLURM log): how long this epoch and the run
            # still take, in detectron2's `eta:` style, after each metrics line
            self.logger.info(self.eta_line(i, now.get("lr")))
        else:
            log_to_file_only(self.logger, logging.INFO, line)
            self.last_means = (f"mean of {n}: "
                               + "  ".join(format_scalar(k, v) for k, v in means.items()) + " | ")

    def eta_line(self, i, lr=None):
        """'eta: 0:01:02 (epoch 2/5)  eta run: 0:04:10  iter 12/40  0.52 s/it': from the mean time
        of this epoch's iterations so far (those of this process: a resumed epoch counts from where
        it resumed)."""
        import datetime

        if self.first_i is None:
            self.first_i = 0
        done = i + 1 - self.first_i
        per_iter = (self.clock() - self.start) / max(done, 1)
        epoch_left = (self.total - i - 1) * per_iter
        run_left = epoch_left + (self.epochs - self.epoch - 1) * self.total * per_iter

        def hms(seconds):
            return str(datetime.timedelta(seconds=int(seconds)))

        return (f"eta: {hms(epoch_left)} (epoch {self.epoch + 1}/{self.epochs})  eta run: "
                f"{hms(run_left)}  iter {i + 1}/{self.total}  {per_iter:.3f} s/it")

    def close(self):
        if self.bar is not None:
            self.bar.close()


# printed decimals of the metrics line (metrics.json keeps 6)
DECIMALS = {"loss": 4, "acc1": 2, "data_time": 4, "img_per_s": 1, "queue_fill": 4}


def format_scalar(key, value):
    if isinstance(value, float):
        return f"{key} {value:.{DECIMALS[key]}f}" if key in DECIMALS else f"{key} {value:.6g}"
    return f"{key} {value}"
