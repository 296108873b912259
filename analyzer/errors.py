"""Errors the command line reports as one clear line (no traceback) and a non-zero exit."""


class InputError(Exception):
    """Bad input or configuration. The message names the file (or option) and the position."""
