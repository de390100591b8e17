"""Clean stops on SIGTERM / SIGUSR1 / SIGINT: finish the iteration, save exactly, exit with a known
code.

Contract (the SLURM requeue logic and every training loop build on it):

    with Preemption() as stop:              # installs handlers for SIGTERM, SIGUSR1, SIGINT;
        for i, batch in ...:                # restores the old ones on exit
            step(batch)
            if stop.agreed(device):         # collective under torch.distributed: every rank calls
                save_exact_checkpoint()     # it after every iteration and all get the same answer
                raise Preempted(stop.signum, where, resume_command)   # (all_reduce MAX of the
                                                                      # requested signal number)

- pretrain.engine polls less often: it folds the stop request into its one vote every LOG_PERIOD
  iterations (with the NaN check), so it reads `stop.requested` and all-reduces it itself.
- `stop.requested` is the signal number received by this process (None when none was). A second
  SIGINT while a stop is pending raises KeyboardInterrupt at once (the user insists; nothing more is
  saved).
- `Preempted.exit_code` is EXIT_CODES[signum] = 128 + signum, the shell's convention for
  "killed by": SIGINT 130, SIGTERM 143, SIGUSR1 138 (Linux numbering). REQUEUE_EXIT_CODES (SIGTERM,
  SIGUSR1) are the codes after which a scheduler should requeue the job with `--resume auto`; 130
  (Ctrl-C) means the user stopped it.
- `ignore_in_worker()` makes a DataLoader worker ignore these signals, and submitit's warning signal
  (`--launcher slurm`: SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another; a forked worker
  inherits the main process's handler for it, which exits): SLURM, Kubernetes and a terminal's
  Ctrl-C signal the whole process group, and a worker killed by one would make the main process fail
  with "DataLoader worker exited unexpectedly" instead of saving. The main process ends its workers
  itself when it exits.
- Only the main process writes the checkpoint; the training loop decides what "exact" means
  (pretrain.train: model, optimizer, scaler, queue, RNG states and the data-loader position).
"""
import os
import signal

import torch

from mocobench.utils import comm
from mocobench.utils.errors import CommandFailed

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_CODES = {int(s): 128 + int(s) for s in SIGNALS}  # SIGINT 130, SIGTERM 143, SIGUSR1 138
REQUEUE_EXIT_CODES = (EXIT_CODES[int(signal.SIGTERM)], EXIT_CODES[int(signal.SIGUSR1)])


class Preempted(CommandFailed):
    """Training stopped cleanly on a signal after writing a checkpoint; str() is the one-line
    message."""

    def __init__(self, signum, message):
        super().__init__(message, EXIT_CODES.get(int(signum), 1), is_error=False)
        self.signum = int(signum)


def signal_name(signum):
    return signal.Signals(signum).name


class SignalHandlers:
    """Context manager: `_handle(signum, frame)` receives `signals` while inside (handlers live in
    the main thread; elsewhere nothing is installed); the previous handlers come back on exit."""

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self._previous = {}

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False


class Preemption(SignalHandlers):
    """Context manager: records the first SIGTERM / SIGUSR1 / SIGINT instead of dying; see the
    module doc."""

    def __init__(self, signals=SIGNALS):
        super().__init__(signals)
        self.requested = None

    def _handle(self, signum, frame):
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        if self.requested is None:
            self.requested = int(signum)

    def agreed(self, device=None):
        """The signal number to stop for, or None; identical on every rank (a collective call under
        DDP: every rank must call it at the same point)."""
        if not comm.is_dist():
            return self.requested
        flag = torch.tensor([self.requested or 0], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


def submitit_warning_signal():
    """The signal submitit sends before a timeout or preemption: SIGUSR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another (submitit.JobEnvironment._usr_sig, read here without
    importing submitit); None for a name that is no signal (submitit refuses it)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def ignore_in_worker():
    """Called in each DataLoader worker: leave the stop to the main process (see the module doc)."""
    for s in {*SIGNALS, submitit_warning_signal()} - {None}:
        signal.signal(s, signal.SIG_IGN)
