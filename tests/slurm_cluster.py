"""A real one-node Slurm cluster (slurmctld + slurmd + munged) under one scratch folder, for tests.

Usage::

    root = tempfile.mkdtemp(prefix="slurm-")  # keep it short: Slurm and munge put sockets in it
    with start_or_skip(root) as slurm:
        subprocess.run(["srun", "-n2", "hostname"], check=True, env=slurm.env, timeout=60)
        sbatch_wait("job.sh", "--output=out.txt", env=slurm.env, timeout=120)

Every daemon reads ``<root>/etc/slurm.conf``; clients find it through ``SLURM_CONF`` in
``LocalSlurm.env``. On exit the cluster cancels its jobs, shuts down through ``scontrol shutdown`` and
``munged --stop``, and waits for the PIDs from its own pid files; only those PIDs are ever signalled.
The recipe (config and its reasons) is measured in ``/work/shared/SLURM_LOCAL.md``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
REQUIRED_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "munged", "mungekey")
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes, the last a NUL
_POLL_S = 0.2


class SlurmStartError(RuntimeError):
    """The daemons did not come up; the message carries the daemon log tails."""


def _search_path() -> str:
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(dirs + [d for d in _SBIN_DIRS if d not in dirs])


def _which(program: str) -> str | None:
    return shutil.which(program, path=_search_path())


def _program(program: str) -> str:
    path = _which(program)
    if path is None:
        raise SlurmStartError(f"{program!r} is not installed; call ensure_slurm_installed() first")
    return path


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_slurm_installed(timeout: float = 900) -> str | None:
    """None when Slurm and munge are installed (installing them with apt-get as root if needed).

    Otherwise the reason they cannot be, fit for ``pytest.skip``.
    """
    missing = [p for p in REQUIRED_PROGRAMS if _which(p) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"Slurm programs missing ({', '.join(missing)}) and not root, so cannot apt-get install them"
    if shutil.which("apt-get") is None:
        return f"Slurm programs missing ({', '.join(missing)}) and no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES]
    for cmd in (["apt-get", "update"], install):
        try:
            proc = subprocess.run(
                cmd,
                check=False,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            return f"`{' '.join(cmd)}` timed out after {timeout:.0f} s:\n{_tail(out)}"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{_tail(proc.stdout)}"
    still_missing = [p for p in REQUIRED_PROGRAMS if _which(p) is None]
    if still_missing:
        return f"apt-get installed {' '.join(SLURM_PACKAGES)} but {', '.join(still_missing)} still missing"
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free now (all held open while picking, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _is_program(pid: int, program: str) -> bool:
    """Guards against PID reuse before a signal: is ``pid`` still running ``program``?"""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return False
    return Path(argv0).name == program


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Poll until every PID is gone or ``timeout`` passes; returns those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if pid_alive(p)]
    return alive


class LocalSlurm:
    """One-node Slurm under ``root``: ``with LocalSlurm(root) as slurm: ... slurm.env ...``.

    ``root`` should be short (say ``tempfile.mkdtemp(prefix="slurm-")``): munge's socket and slurmd's
    step sockets live under it and a Unix socket path holds at most 107 bytes. Every folder above
    ``root`` must be executable by all (munged checks; ``/tmp`` is); ``root`` itself is made so.
    The caller owns ``root`` and removes it after exit.
    """

    def __init__(self, root: str | os.PathLike, startup_timeout: float = 60.0, stop_timeout: float = 30.0):
        self.root = Path(root).resolve()
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.sock"
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cpus = os.cpu_count() or 1
        # Own ports, not 6817/6818, so a second cluster (or a system Slurm) cannot answer ours.
        self.ctld_port, self.slurmd_port = _free_ports(2)
        self.pids: dict[str, int] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files = {
            "slurmctld": self.root / "run" / "slurmctld.pid",
            "slurmd": self.root / "run" / "slurmd.pid",
            "munged": self.munge_dir / "munged.pid",
        }
        self._logs = {
            "slurmctld": self.root / "log" / "slurmctld.log",
            "slurmd": self.root / "log" / "slurmd.log",
            "munged": self.munge_dir / "munged.log",
        }

    def __enter__(self) -> LocalSlurm:
        if not self.pids:  # start_or_skip hands over a cluster that is already running
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Write the config, start munged, slurmctld and slurmd, and wait for the node to be idle."""
        self._check_root()
        try:
            self._write_config()
            self._start_munged()
            self._run_daemon("slurmctld", [_program("slurmctld"), "-f", str(self.conf)])
            # slurmd takes its node name from the host name unless told; the config names it localhost.
            self._run_daemon("slurmd", [_program("slurmd"), "-f", str(self.conf), "-N", "localhost"])
            self._wait_idle()
        except BaseException:
            self.stop()
            raise

    def _check_root(self) -> None:
        hint = "use a short folder such as tempfile.mkdtemp(prefix='slurm-')"
        longest = self.root / "spool" / "localhost_4294967294.4294967294"
        if len(str(longest)) > _SUN_PATH_MAX:
            raise ValueError(f"Slurm root {self.root} is too long for the Unix sockets under it; {hint}")
        for folder in self.root.parents:
            if folder.exists() and not folder.stat().st_mode & 0o001:
                raise ValueError(
                    f"{folder} (above Slurm root {self.root}) is not executable by all, so munged would "
                    f"refuse its socket; {hint}"
                )

    def _write_config(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket that not everyone can reach (mkdtemp makes the root 0700), and a
        # socket directory that others can write to.
        self.root.chmod(self.root.stat().st_mode | 0o111)
        self.munge_dir.chmod(0o755)
        self.conf.write_text(self.config_text())

    def config_text(self) -> str:
        r = self.root
        return f"""\
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self._pid_files["slurmctld"]}
SlurmdPidFile={self._pid_files["slurmd"]}
SlurmctldLogFile={self._logs["slurmctld"]}
SlurmdLogFile={self._logs["slurmd"]}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=4
MailProg=/bin/true
KillWait=5
NodeName=localhost CPUs={self.cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 \
RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _start_munged(self) -> None:
        key = self.munge_dir / "munge.key"
        if not key.exists():
            self._check_call([_program("mungekey"), "--create", f"--keyfile={key}"], "mungekey")
        cmd = [
            _program("munged"),
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={self._pid_files['munged']}",
            f"--log-file={self._logs['munged']}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        self._run_daemon("munged", cmd)

    def _run_daemon(self, name: str, cmd: list[str]) -> None:
        """Run a self-daemonizing program, then record the PID its pid file names."""
        self._check_call(cmd, name)
        deadline = time.monotonic() + self.startup_timeout
        while (pid := self._read_pid(name)) is None:
            if time.monotonic() > deadline:
                raise SlurmStartError(f"{name} wrote no pid file within {self.startup_timeout:.0f} s")
            time.sleep(_POLL_S)
        self.pids[name] = pid

    def _check_call(self, cmd: list[str], name: str) -> None:
        proc = subprocess.run(
            cmd,
            check=False,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise SlurmStartError(
                f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{_tail(proc.stdout)}\n{self.log_tails()}"
            )

    def _read_pid(self, name: str) -> int | None:
        try:
            text = self._pid_files[name].read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        state = ""
        while time.monotonic() < deadline:
            dead = [n for n, pid in self.pids.items() if not pid_alive(pid)]
            if dead:
                raise SlurmStartError(f"{', '.join(dead)} exited during start-up\n{self.log_tails()}")
            state = self._sinfo_state()
            if state == "idle":
                return
            time.sleep(_POLL_S)
        raise SlurmStartError(
            f"node not idle after {self.startup_timeout:.0f} s (sinfo says {state!r})\n{self.log_tails()}"
        )

    def _sinfo_state(self) -> str:
        try:
            proc = subprocess.run(
                [_program("sinfo"), "-h", "-o", "%t"],
                check=False,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except subprocess.TimeoutExpired:
            return "<sinfo timed out>"
        return proc.stdout.strip() if proc.returncode == 0 else f"<sinfo: {proc.stderr.strip()}>"

    def log_tails(self, lines: int = 20) -> str:
        """The last lines of every daemon's log, for error messages."""
        parts = []
        for name, log in self._logs.items():
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"--- {name} ({log}) ---\n{_tail(text, lines)}")
        return "\n".join(parts)

    # -- stop ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel jobs, shut the daemons down, and wait for their PIDs; signal only lingering ones."""
        slurm_pids = [self.pids[n] for n in ("slurmctld", "slurmd") if n in self.pids]
        if "slurmctld" in self.pids and pid_alive(self.pids["slurmctld"]):
            self._cancel_jobs()
            self._quiet([_program("scontrol"), "shutdown"])
        self._reap(slurm_pids)
        # munged last: slurmd and slurmctld authenticate through it while they shut down.
        if "munged" in self.pids and pid_alive(self.pids["munged"]):
            self._quiet([_program("munged"), f"--socket={self.munge_socket}", "--stop"])
            self._reap([self.pids["munged"]])

    def _cancel_jobs(self) -> None:
        """Jobs left running would keep their slurmstepd processes alive past the shutdown."""
        squeue = self._quiet([_program("squeue"), "-h", "-o", "%i"])
        if squeue is None or not squeue.stdout.split():
            return
        self._quiet([_program("scancel"), *squeue.stdout.split()])
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline:
            squeue = self._quiet([_program("squeue"), "-h", "-o", "%i"])
            if squeue is None or not squeue.stdout.split():
                return
            time.sleep(_POLL_S)

    def _quiet(self, cmd: list[str]) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(cmd, check=False, env=self.env, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return None

    def _reap(self, pids: list[int]) -> None:
        lingering = _wait_gone(pids, self.stop_timeout)
        names = {pid: name for name, pid in self.pids.items()}
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            for pid in lingering:
                if _is_program(pid, names[pid]):
                    os.kill(pid, sig)
            lingering = _wait_gone(lingering, wait)
        if lingering:
            raise RuntimeError(f"Slurm daemons {lingering} survived SIGKILL")


def sbatch_wait(
    script: str | os.PathLike,
    *args: str,
    script_args: Sequence[str] = (),
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """``sbatch --wait [args...] script [script_args...]``; its return code is the job's exit code.

    ``args`` are sbatch options (``"--output=out.txt"``, ``"--ntasks=2"``). ``script`` is a path, or
    the text of a batch script (it starts with ``#!``), which sbatch then reads from stdin. Pass
    ``LocalSlurm.env`` as ``env``. Raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds
    (the job keeps running until the cluster stops).
    """
    text = str(script)
    from_stdin = text.startswith("#!")
    if from_stdin and script_args:
        raise ValueError("script_args need a script file: sbatch passes no arguments to a script on stdin")
    cmd = [_program("sbatch"), "--wait", *args]
    if not from_stdin:
        cmd += [text, *script_args]
    return subprocess.run(
        cmd,
        check=False,
        input=text if from_stdin else None,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_or_skip(tmp_root: str | os.PathLike, **kwargs: float) -> LocalSlurm:
    """A started ``LocalSlurm`` under ``tmp_root``; skips the test if Slurm cannot be installed/started.

    Use it as a context manager (``with start_or_skip(root) as slurm:``) or call ``stop()``.
    """
    reason = ensure_slurm_installed()
    if reason is not None:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_root, **kwargs)
    try:
        cluster.start()
    except SlurmStartError as exc:
        pytest.skip(f"local Slurm cluster did not start: {exc}")
    return cluster
