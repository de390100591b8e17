"""Errors shared by every floor of the house (ground level: imports nothing from mocobench)."""


class UsageError(Exception):
    """Bad user input (file, key or value): printed without a traceback, exit code 2."""
