"""Model ids of the Hugging Face Hub ("stepfun-ai/NextStep-1.1") as model directories, through ``huggingface_hub``
(the ``hub`` extra), which owns the cache and its offline mode (``HF_HUB_OFFLINE=1``: the cache only)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import MissingFileError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(name_or_path: str | os.PathLike, what: str = "model") -> Path:
    """A local path as it is; else a hub repository id -> the local snapshot directory (downloaded on first use,
    unless offline). Anything else, or a repo the hub and the cache do not have, is a FileNotFoundError."""
    path = Path(name_or_path)
    if path.exists() or not REPO_ID.match(str(name_or_path)):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingFileError(f"{what} directory not found: {path} (to use hub ids like 'org/name', "
                                f"pip install 'nextstep[hub]')") from None
    try:
        return Path(snapshot_download(str(name_or_path)))
    except Exception as e:  # offline with nothing cached, unknown repo, no network: one clear message
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MissingFileError(f"{what} {str(name_or_path)!r} is neither a local directory nor available from the "
                                f"Hugging Face Hub or its cache ({type(e).__name__}: {first_line})") from None
