"""Every error a user can fix, under one base: :class:`NextStepError`.

The CLI prints a ``NextStepError`` as one line and exits 2 (a :class:`WriteError`: 1); the server answers an
:class:`InputError` with a 400.
Anything else (a ``ValueError`` from a shape check, a ``RuntimeError`` from torch) is a bug or an environment failure:
the CLI lets its traceback show, the server answers 500 and logs it. Each class also derives from the builtin a caller
would catch without knowing this module (``ValueError``, ``FileNotFoundError``, ``RuntimeError``).
"""

from __future__ import annotations


class NextStepError(Exception):
    """Base of the errors whose message tells the user what was wrong and what would be right."""


class InputError(NextStepError, ValueError):
    """A request, argument or setting is invalid (a bad prompt, size, setting or file)."""


class SettingError(InputError):
    """An invalid sampling setting: ``field`` is its ``Settings`` name and ``problem`` the rest of the message, so the
    CLI and the server can name it as their users typed it (a flag, a request field)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


class UsageError(NextStepError):
    """A bad command line, or an environment the command cannot run in."""


class ConfigError(NextStepError, ValueError):
    """A configuration file or training recipe is invalid."""


class CheckpointError(NextStepError, ValueError):
    """Model files cannot be read as what they claim to be, or do not fit together."""


class WriteError(NextStepError, OSError):
    """A file could not be written (disk full, no permission, a read-only file system): the request was right, the
    machine refused it. Atomic writes raise it with nothing left behind."""


class MissingFileError(NextStepError, FileNotFoundError):
    """A file or directory that was named does not exist, or is not a directory where one is needed."""


class DataError(NextStepError, ValueError):
    """A dataset cannot be used: empty, unreadable, or without the kinds of samples asked for."""


class SampleError(DataError):
    """One sample cannot be read; data loaders skip it and count it."""


class RewardError(NextStepError, ValueError):
    """A reward function is unknown or returned something that is not a reward."""


class TrainingError(NextStepError, RuntimeError):
    """Training cannot continue (for example a non-finite loss); the last good checkpoint is kept."""


class NextStepWarning(UserWarning):
    """Base of the warnings about a request that runs but may not give what was asked."""


class SizeWarning(NextStepWarning):
    """An image size the model was not trained at (``SamplingConfig.trained_sizes``): it may draw noise there."""
