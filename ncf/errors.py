"""Domain errors: what the CLI prints as one line with exit code 1."""


class NcfError(Exception):
    """A user-facing problem (bad input, missing file, impossible setting)."""
