"""The errors that mean "the input is wrong", as opposed to a bug in finercut.

Every error that a user can cause (a bad option, a missing or unusable file, an unsupported model) derives from
:class:`UserError`; the command line prints those as one line and exits with code 2. Anything else is a bug: it
exits with code 1 and keeps its traceback. The concrete classes also derive from the built-in type a Python
caller would expect (``ValueError``, ``FileNotFoundError``, ...), so library code can catch either.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, or a file or setting finercut cannot use; the message says what to do instead."""


class ConfigError(UserError, ValueError):
    """A setting is invalid; the message says which and what is allowed."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a data folder must hold) does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """The output file or folder to create exists already (and overwriting was not asked for)."""
