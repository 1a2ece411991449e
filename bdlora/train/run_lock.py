"""One run per directory at a time: rank 0 locks the run directory for the whole run.

``run.lock`` in the run directory names the run holding it (JSON): host, pid, the pid's start time
and the host's boot id (so a reused pid is not taken for the holder), Slurm job id, start time. The
file appears with its content in one step (written under a private name, then hard-linked under
its own, which fails when the name is taken, on NFS as on a local disk), and its holder keeps an
``flock`` on it wherever the filesystem has one. A start that finds the file decides:

=======================================  =========================================================
the ``flock`` is held                    refused: the holder runs, whatever the file says
holder on this host                      refused while its pid runs; a dead pid (or a reboot since)
                                         makes the lock stale: taken over, with a warning
holder on another host, this Slurm job   stale: an earlier run of this job (requeued), which Slurm
                                         ended before it started this one
holder on another host                   refused: nothing here tells whether it still runs; if it
                                         does not (its node was lost), delete the file
a file that does not parse               refused, naming the file to delete
=======================================  =========================================================

The lock goes (its file is deleted) when the run ends, however it ends. SIGKILL and a lost node
leave the file behind, and the next start judges it as above.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bdlora.parallel.mesh import on_all_ranks

LOCK_FILE = "run.lock"
TRIES = 5  # publish, or clear a stale lock and publish again; more only when other starts race us


class RunDirLocked(ValueError):
    """Another run holds the run directory; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to tell, from this host or another, whether it can still run."""

    host: str
    pid: int
    pid_start: int | None  # clock ticks after boot (Linux's /proc), None elsewhere
    boot_id: str | None
    slurm_job: str | None
    started: str

    @classmethod
    def this_process(cls) -> Holder:
        pid = os.getpid()
        stat = _proc_stat(pid)
        return cls(
            host=socket.gethostname(),
            pid=pid,
            pid_start=None if stat is None else stat[1],
            boot_id=_boot_id(),
            slurm_job=os.environ.get("SLURM_JOB_ID"),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
        )

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"

    def ended_because(self, me: Holder) -> str | None:
        """Why this holder cannot be running any more, seen from ``me``; None when it may be."""
        if self.host != me.host:
            if self.slurm_job is not None and self.slurm_job == me.slurm_job:
                return f"it is an earlier run of this Slurm job ({self.slurm_job}), requeued since"
            return None
        if self.boot_id and me.boot_id and self.boot_id != me.boot_id:
            return f"{self.host} has rebooted since"
        if not _runs(self.pid, self.pid_start):
            return f"pid {self.pid} no longer runs on {self.host}"
        return None


def _warn(message: str) -> None:
    print(f"bdlora-train: warning: {message}", file=sys.stderr, flush=True)


class RunDirLock:
    """The lock on one run directory, held by one process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: str | Path, warn: Callable[[str], None] = _warn) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.warn = warn
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (creating the directory), taking over a stale one with a warning; raise
        :class:`RunDirLocked` naming the holder when another run may still hold it."""
        me = Holder.this_process()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(TRIES):
            self._fd = self._publish(me)
            if self._fd is not None:
                return
            self._clear_if_stale(me)
        raise RunDirLocked(f"{self.path} changed hands {TRIES} times while this run tried to take it")

    def release(self) -> None:
        """Delete the lock file, if it is still this lock's, and drop the ``flock``."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # left behind, it is a dead pid's: the next start takes it
            if _names(self.path, self._fd):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def _publish(self, me: Holder) -> int | None:
        """The lock file under its name, content written and ``flock`` held before the name
        exists; its descriptor, or None when the name is taken."""
        text = json.dumps(asdict(me), indent=1).encode()
        private = self.path.with_name(f".{LOCK_FILE}.{me.host}.{me.pid}")
        fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _try_flock(fd)
            os.write(fd, text)
            os.fsync(fd)
            os.link(private, self.path)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return _create_exclusive(self.path, text)  # no hard links here (some FUSE filesystems)
        finally:
            private.unlink(missing_ok=True)
        return fd

    def _clear_if_stale(self, me: Holder) -> None:
        """Delete the lock file of a run that has ended (with a warning); raise for one that may
        still run; return when the file went or changed meanwhile (the caller tries again)."""
        fd = _open_existing(self.path)
        if fd is None:
            return
        try:
            holder = _read_holder(fd)
            if not _try_flock(fd):
                raise self._refusal(holder)
            if not _names(self.path, fd):
                return
            reason = None if holder is None else holder.ended_because(me)
            if reason is None:
                raise self._refusal(holder)
            self.warn(
                f"taking over {self.path}, the lock of a run that ended ({holder.describe()}): {reason}"
            )
            self.path.unlink()  # under our flock on it: no other start judges this file meanwhile
        finally:
            os.close(fd)

    def _refusal(self, holder: Holder | None) -> RunDirLocked:
        if holder is None:
            return RunDirLocked(
                f"run directory {self.path.parent} is locked by {self.path}, which does not say by whom "
                f"(damaged, or being written). If no run uses this directory, delete {self.path}"
            )
        return RunDirLocked(
            f"run directory {self.path.parent} is in use by another run ({holder.describe()}). Wait for "
            f"it to end, or start this run in a new directory (run_dir=... or hydra.run.dir=...). If that "
            f"run has ended without releasing its lock (its node was lost), delete {self.path}"
        )


@contextlib.contextmanager
def run_dir_locked(run_dir: Path, is_main: bool) -> Iterator[None]:
    """The block with ``run_dir`` locked by rank 0 (``is_main``), on every rank: a refusal raises on
    every rank with rank 0's message; the lock goes when the block ends, however it ends."""
    lock = RunDirLock(run_dir) if is_main else None
    on_all_ranks(lambda: lock.acquire() if lock else None)
    try:
        yield
    finally:
        if lock:
            lock.release()


def _try_flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd``; False only when another open file holds one."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # no flock on this filesystem (NFS without a lock daemon, Lustre without -o flock)
        pass
    return True


def _create_exclusive(path: Path, text: bytes) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return None
    _try_flock(fd)
    os.write(fd, text)
    os.fsync(fd)
    return fd


def _open_existing(path: Path) -> int | None:
    """``path`` opened to ``flock`` it (NFS wants it writable; another user's lock may not be)."""
    try:
        return os.open(path, os.O_RDWR)
    except PermissionError:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        named, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _read_holder(fd: int) -> Holder | None:
    try:
        return Holder(**json.loads(os.pread(fd, 1 << 16, 0)))
    except (ValueError, TypeError):
        return None


def _runs(pid: int, start: int | None) -> bool:
    """Whether ``pid`` on this host is still the process that started at ``start``."""
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        return state not in "ZX" and (start is None or started == start)  # a zombie has ended
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """State and start time of ``pid`` from ``/proc/<pid>/stat`` (Linux); None without one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5); the name before ")" may hold spaces


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
