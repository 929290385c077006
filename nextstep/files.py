"""Atomic file writes shared by images, weights and JSON: a temporary file beside the target, then a rename, so
a failed or interrupted write leaves nothing behind; the result gets the permissions the umask allows (a plain
``tempfile.mkstemp`` file would stay 0600)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_paths(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Yields one temporary path per target; when the block succeeds every target is replaced (mode 0666 minus the
    umask), otherwise none is and the temporaries are removed: all files or none."""
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
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """:func:`atomic_paths` for one file."""
    with atomic_paths([path]) as (tmp,):
        yield tmp
