"""How builders of one cache take turns: an exclusive lock tried by rank 0, private partial folders renamed into
place, and marker files by which a build's ranks follow each other without waiting in a collective."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from core.distributed import DistEnv, from_main
from core.processes import pid_alive
from harness.teachers.cache_key import TeacherCacheError

# -- building ------------------------------------------------------------------------------------------------------
POLL_SECONDS = 0.5


def _try_lock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def exclusive(lock_path: Path, env: DistEnv) -> Iterator[None]:
    """The builders' lock, held by rank 0 for all ranks. It is tried, not waited for: while another job builds,
    the ranks meet in a short broadcast every POLL_SECONDS rather than waiting in one collective for as long as
    that build takes (an NCCL or gloo group times out)."""
    handle = None
    if env.is_main:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a")
    try:
        while not from_main(handle is not None and _try_lock(handle)):
            time.sleep(POLL_SECONDS)
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


OWNER = ".owner.json"  # in a partial folder: the builder's host and pid; its mtime is the builder's heartbeat


STALE_SECONDS = 15 * 60  # a builder on another host is gone when it has not written for this long


def partial_name(folder: Path) -> str:
    return f"{folder.name}.partial-{socket.gethostname()}-{os.getpid()}"


def claim(partial: Path) -> None:
    partial.mkdir(parents=True)
    (partial / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def _abandoned(partial: Path) -> bool:
    """Whether a partial folder's builder is gone: on this host its process has ended; on another, it has not
    written for STALE_SECONDS. A lock that works keeps other live builders out anyway; this keeps a builder on a
    filesystem whose lock does nothing (some NFS mounts) from deleting the folder another one is filling."""
    owner = partial / OWNER
    try:
        facts, age = json.loads(owner.read_text()), time.time() - owner.stat().st_mtime
    except (OSError, ValueError):  # a folder a builder has just made (or a pre-owner-file one): by its age
        return time.time() - partial.stat().st_mtime > STALE_SECONDS
    if facts.get("host") == socket.gethostname():
        return not pid_alive(int(facts["pid"]))
    return age > STALE_SECONDS


def remove_abandoned(folder: Path) -> None:
    """Partial folders of builders that died mid-build."""
    for partial in folder.parent.glob(f"{folder.name}.partial-*"):
        with contextlib.suppress(FileNotFoundError):
            if _abandoned(partial):
                shutil.rmtree(partial, ignore_errors=True)


def meet(env: DistEnv) -> None:
    if env.distributed:
        import torch.distributed as dist

        dist.barrier()


def publish(partial: Path, folder: Path) -> None:
    try:
        os.rename(partial, folder)  # atomic: readers see no folder or a whole one
    except OSError:  # a concurrent builder published first (no working lock): keep its copy
        shutil.rmtree(partial, ignore_errors=True)


class Marks:
    """Files in a partial cache folder by which its builders' ranks follow each other's progress (arrays
    created, a rank's share embedded, a rank failed) without waiting inside a collective."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, name: str) -> Path:
        return self.folder / f".mark-{name}"

    def set(self, name: str, text: str = "") -> None:
        self._path(name).write_text(text)

    def wait(self, names: list[str]) -> None:
        """Until every mark in ``names`` is set; a failed rank's mark raises here."""
        while True:
            failed = sorted(self.folder.glob(".mark-failed-*"))
            if failed:
                raise TeacherCacheError(f"building {self.folder}: {failed[0].name.removeprefix('.mark-')}: "
                                        f"{failed[0].read_text()}")
            if all(self._path(name).is_file() for name in names):
                return
            time.sleep(POLL_SECONDS)

    def read(self, name: str) -> str:
        return self._path(name).read_text()

    def clear(self) -> None:
        for mark in self.folder.glob(".mark-*"):
            mark.unlink()
