"""Publishing saved adapters in one step, so readers never see half of one save and half of another.

``PeftModel.save_pretrained`` writes ``adapter_model.safetensors``, then ``adapter_config.json``, then the model card,
each straight into the target directory. A reader in between sees a new weights file with an old config (or none),
and two processes saving to one directory can leave the config of one with the weights of the other. Trainer saves,
resumed jobs and notebook re-runs make that happen in practice.

:func:`atomic_save` gives the saver a staging directory instead and publishes what was written there:

* when the target directory does not exist yet, the staging directory is created beside it and renamed to it: the
  whole adapter appears at once;
* when it exists (it may hold other files: a Trainer checkpoint, other adapters, a hand-written card), the staging
  directory is created inside it (hidden), and every file is moved into place with ``os.replace`` while the
  directory is locked exclusively (:func:`directory_lock`). Readers (:mod:`peft_hft.format.reader`) hold the shared
  lock while they read the config and open the weights, so they see one complete save. Concurrent writers take
  turns; the last one to publish wins, with a complete adapter.

The lock is ``flock`` on the directory itself (no lock file is left behind). Where the platform has no ``flock``
(Windows), each file is still replaced atomically, but a reader may pair files of two saves that overlap in time.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..utils import PathLike, staging_directory

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@contextlib.contextmanager
def directory_lock(directory: PathLike, exclusive: bool) -> Iterator[None]:
    """Hold ``flock`` on ``directory`` (shared for readers, exclusive for writers); a no-op where unsupported."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # missing or unreadable: the caller reports what it cannot read
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:  # a file system without flock (some network mounts)
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def atomic_save(directory: PathLike) -> Iterator[Path]:
    """Yield a staging directory; on success publish its files under ``directory`` (see the module docstring).

    On any error the staging directory is removed and ``directory`` is left exactly as it was.
    """
    target = Path(directory).expanduser().absolute()
    existed = target.is_dir()
    if target.exists() and not existed:
        raise NotADirectoryError(f"Cannot save an adapter into {target}: it is a file. Fix: choose a directory.")
    parent = target if existed else target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with staging_directory(target, inside=parent) as staging:
        yield staging
        if not existed:
            try:
                os.rename(staging, target)  # the whole adapter appears at once
                return
            except OSError:
                if not target.is_dir():  # pragma: no cover - e.g. the parent vanished
                    raise
                # another writer published first: fall through and replace its files under the lock
        _publish_files(staging, target)


def _publish_files(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` to the same relative path under ``target``, under the exclusive locks.

    Each adapter directory (the target for ``default``, a sub-directory for a named adapter) is locked while all of
    its files are replaced, since that is the directory its readers lock.
    """
    groups: dict[Path, list[Path]] = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        groups.setdefault((target / path.relative_to(staging)).parent, []).append(path)
    with directory_lock(target, exclusive=True):
        for folder, paths in groups.items():
            folder.mkdir(parents=True, exist_ok=True)
            lock = directory_lock(folder, exclusive=True) if folder != target else contextlib.nullcontext()
            with lock:
                for path in paths:
                    os.replace(path, target / path.relative_to(staging))


__all__ = ["atomic_save", "directory_lock"]
