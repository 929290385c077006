"""Error types shared by the library, the CLI and the server.

``InputError`` is what a caller did wrong (a bad prompt, size, setting or file): the CLI prints it, the server answers
it with a 400. Anything else raised while generating is a bug or an environment failure (a 500 with a log line).
"""

from __future__ import annotations


class InputError(ValueError):
    """A request, argument or setting is invalid; the message says what was wrong and what would be right."""


class TrainingError(RuntimeError):
    """Training cannot continue (for example a non-finite loss); the last good checkpoint is kept."""
