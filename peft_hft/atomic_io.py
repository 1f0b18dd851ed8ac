"""Writing directories all at once: a reader (or a crashed run) never sees a half-written checkpoint."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Union


def write_directory_atomically(path: Union[str, os.PathLike], save: Callable[[Path], None]) -> Path:
    """Call ``save(staging)`` on a fresh temporary directory next to ``path``, then move it to ``path``.

    ``path`` must not exist or be an empty directory (it is replaced). On any failure the staging directory is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty directory; choose a new one.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        save(staging)
        if path.exists():
            path.rmdir()
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path
