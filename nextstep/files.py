"""Atomic file writes shared by images, weights and JSON: a temporary file beside the target, then a rename, so
a failed or interrupted write leaves nothing behind; the result gets the permissions the umask allows (a plain
``tempfile.mkstemp`` file would stay 0600). A write the machine refuses (disk full, no permission) raises
:class:`~nextstep.errors.WriteError` naming the file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import NextStepError, WriteError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_paths(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Yields one temporary path per target; when the block succeeds every target is replaced (mode 0666 minus the
    umask), otherwise none is and the temporaries are removed: all files or none. An ``OSError`` on the way (from
    this function or from the block writing the temporaries) becomes a :class:`WriteError` naming the file."""
    temps: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        mode = 0o666 & ~_current_umask()
        for tmp in temps:
            os.chmod(tmp, mode)
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, NextStepError):
            raise
        raise WriteError(f"cannot write {_target(e, paths, temps)}: {e.strerror or e}"
                         + (f" (nothing written of its {len(paths)} files)" if len(paths) > 1 else "")) from e
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def _target(e: OSError, paths: Sequence[Path], temps: list[Path]) -> Path:
    """The file a failed write was for: the target of the temporary the error names, else the first."""
    named = {str(t): p for t, p in zip(temps, paths)} | {str(p): p for p in paths}
    return named.get(str(e.filename), paths[0]) if paths else Path(str(e.filename))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """:func:`atomic_paths` for one file."""
    with atomic_paths([path]) as (tmp,):
        yield tmp
