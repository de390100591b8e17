"""What a training run tells the user while it runs: log.txt, metrics.json (one JSON object per
line, detectron2 style), TensorBoard events and a progress display. Main process only; other ranks
stay quiet."""
import json
import logging
import os
import sys

from mocobench.utils import comm
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


class MetricsWriter:
    """metrics.json and TensorBoard. A run resumed at iteration N first drops the records after N
    (they are about to be written again) and a line a kill cut in half; TensorBoard purges its
    events after N the same way (purge_step)."""

    def __init__(self, output_dir, start_iteration=0):
        self.enabled = comm.is_main_process()
        self.tb = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = os.path.join(output_dir, "metrics.json")
            self._truncate(path, start_iteration)
            self.json = open(path, "a")
            purge = start_iteration + 1 if start_iteration else None
            self.tb = SummaryWriter(log_dir=output_dir, purge_step=purge)

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

    def close(self):
        if self.enabled:
            self.json.close()
            self.tb.close()


class Progress:
    """A tqdm bar on a terminal; plain log lines every `log_period` iterations otherwise."""

    def __init__(self, logger, total, epoch, epochs, log_period):
        self.enabled = comm.is_main_process()
        self.logger, self.bar = logger, None
        self.total, self.epoch, self.epochs, self.log_period = total, epoch, epochs, log_period
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            desc = f"epoch {epoch + 1}/{epochs}"
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)

    def update(self, i, **stats):
        if not self.enabled:
            return
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in stats.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif (i + 1) % self.log_period == 0 or i + 1 == self.total:
            self.logger.info(f"epoch {self.epoch + 1}/{self.epochs} iter {i + 1}/{self.total}"
                             f"  {text}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
