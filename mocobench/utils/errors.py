"""The errors a command ends with, and the one mapping from them to exit codes (mocobench.cli
applies it)."""

# bad input: a one-line error naming the file / key / value, no traceback, nothing written
EXIT_USAGE = 2
# stdout was a pipe whose reader closed it (`| head`): Python's own exit code on EPIPE
EXIT_BROKEN_PIPE = 1


class UsageError(Exception):
    """Bad user input (file, key or value): printed without a traceback, exit code 2."""

    exit_code = EXIT_USAGE
    # the same on every rank (each validates the same input): under a launcher rank 0 alone says
    # it. False: this rank's own (e.g. its shard of the data): the rank that raised it says it
    every_rank = True


class CommandFailed(Exception):
    """A command that ran and then failed or stopped (not bad input); str() is its one-line reason.
    exit_code: 1 failed (e.g. training diverged), 128 + N stopped by signal N after saving (143
    SIGTERM, 138 SIGUSR1, 130 SIGINT: mocobench.utils.preempt), or the exit code of a stage that
    failed."""

    every_rank = True  # stops and divergence are agreed by every rank (see UsageError)

    def __init__(self, message, exit_code=1, is_error=True):
        super().__init__(message)
        self.exit_code = int(exit_code)
        self.is_error = is_error  # False: a clean stop after saving (printed without "error:")


def run_main(prog, main, argv):
    """main(argv) -> exit code, and the one place where the errors above become exit codes: bad
    input prints `PROG: error: MESSAGE` (exit 2), a failed or stopped command
    `PROG: [error: ]MESSAGE` with its own code, a closed stdout pipe nothing (exit 1); no
    traceback. Under a multi-process launcher rank 0 prints an error that every rank raises alike;
    one that is a rank's own (`every_rank` False) is printed by that rank, with its rank: the other
    ranks never see it (error_line)."""
    import os
    import sys

    try:
        code = int(main(argv) or 0)
        if sys.stdout is not None:
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except BrokenPipeError:
        # stdout's reader went away (`mocobench configs | head -1`): stop quietly, as the Python
        # docs recommend (library/signal.html, "Note on SIGPIPE"): point stdout at devnull so the
        # flush at exit cannot fail again, and exit 1 as Python does on EPIPE
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # stdout is no file (captured, replaced)
            pass
        return EXIT_BROKEN_PIPE
    except (UsageError, CommandFailed) as e:
        rank = int(os.environ.get("RANK", 0))
        if rank == 0 or not e.every_rank:
            print(error_line(prog, e, rank), file=sys.stderr, flush=True)
        return e.exit_code


def error_line(prog, error, rank=0):
    """`PROG: error: MESSAGE` (a clean stop: without "error:"); a rank other than 0 says which it
    is: `PROG (rank R): error: MESSAGE`."""
    label = "error: " if getattr(error, "is_error", True) else ""  # UsageError: always
    where = f" (rank {rank})" if rank else ""
    return f"{prog}{where}: {label}{error}"
