"""The errors a command ends with, and the one mapping from them to exit codes (mocobench.cli applies it)."""

EXIT_USAGE = 2  # bad input: a one-line error naming the file / key / value, no traceback, nothing written


class UsageError(Exception):
    """Bad user input (file, key or value): printed without a traceback, exit code 2."""

    exit_code = EXIT_USAGE


class CommandFailed(Exception):
    """A command that ran and then failed or stopped (not bad input); str() is its one-line reason.
    exit_code: 1 failed (e.g. training diverged), 128 + N stopped by signal N after saving (143 SIGTERM,
    138 SIGUSR1, 130 SIGINT: mocobench.utils.preempt), or the exit code of a stage that failed."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = int(exit_code)
