"""File locks for files that several processes, nodes or queued experiments share.

A work folder is shared by every experiment with the same work key (a queue with
`-j 2`, two nodes on one file system), so a shard or cache file is written only
by the process that holds its lock. Lock files live in a `locks/` folder beside
what they guard and are never deleted (deleting a lock file races with its next
taker). They rely on the file system's POSIX locks, which local disks and NFSv4
honour.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout


def lock_path(path: Path) -> Path:
    return path.parent / "locks" / f"{path.name}.lock"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold `path`'s lock for the block, waiting for it as long as it takes."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):
        yield


def try_lock(path: Path, wait: bool = False) -> FileLock | None:
    """`path`'s lock, held (release with `.release()`); without `wait`, None at once if another
    process holds it, with `wait`, once its holder lets go."""
    lock_file = lock_path(path)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        return None
    return lock
