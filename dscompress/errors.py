"""Known errors and their exit codes.

Every error a user can cause is a `DscompressError` with a one-line message; the CLI prints that line and exits
with the class's code. Anything else is a bug: exit code 1, with the traceback under `--debug`.

| code | meaning                                                                  |
|------|--------------------------------------------------------------------------|
| 0    | success: every stage passed (or was skipped by `on_fail: skip`)          |
| 1    | internal error (a bug): rerun with `--debug` and report the traceback    |
| 2    | bad input: recipe, model, data, paths, options; or the machine's state:  |
|      | no space left, no permission, read-only file system (cli.ENVIRONMENT_ERRNOS) |
| 3    | a gate failed with `on_fail: stop`; `out/latest` is the last passing one  |
| 4    | the output directory is locked by another running `dscompress run`       |
| 130  | interrupted (Ctrl-C); rerun the same command to resume                   |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_LOCKED = 4
EXIT_INTERRUPTED = 130


class DscompressError(Exception):
    """A known, user-facing failure. `str(err)` is a single line."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(DscompressError):
    """The recipe is malformed or asks for something impossible."""


class ModelSourceError(DscompressError):
    """The model path is missing, pickled, corrupt or of an unsupported architecture."""


class DataError(DscompressError):
    """The corpus is missing, empty or too short for the requested windows."""


class OutputPathError(DscompressError):
    """The output directory cannot be used."""


class GateFailed(DscompressError):
    """A stage's accuracy gate failed and its `on_fail` is `stop`."""

    exit_code = EXIT_GATE_FAILED


class RunLocked(DscompressError):
    """Another run holds the output directory's lock."""

    exit_code = EXIT_LOCKED
