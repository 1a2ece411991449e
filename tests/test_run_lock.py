"""One run per directory at a time (``bdlora/train/run_lock.py``), and a refused start that leaves the
run it refused as it was.

The lock's rules are checked in this process; real ``bdlora-train`` processes show two concurrent
starts, a lock held elsewhere refused on every rank, a SIGKILLed run's lock taken over, and a refused
resume. A run that must hold its lock while another starts reads its data from a FIFO: it waits
there, lock taken, until the test writes the data, so no test depends on timing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bdlora.train.run_lock import LOCK_FILE, Holder, RunDirLock, RunDirLocked
from tests.test_train import output_of, read_metrics, train, train_command, train_env

TINY = ["eval_every=0", "data.num_examples=200", "data.seq_len=32", "logger.progress=false"]
WAIT = 120  # seconds a test waits for a process or a file before failing


def write_lock(run_dir: Path, holder: Holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(asdict(holder)))
    return path


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: no process has this pid until the kernel hands it out again
    return child.pid


def refusal(run_dir: Path) -> str:
    with pytest.raises(RunDirLocked) as info:
        RunDirLock(run_dir).acquire()
    return str(info.value)


# --- the rules, in this process --------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_naming_the_holder_and_goes_on_release(tmp_path):
    with RunDirLock(tmp_path / "run"):
        message = refusal(tmp_path / "run")
    assert f"run directory {tmp_path / 'run'} is in use by another run" in message
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in message
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    RunDirLock(tmp_path / "run").acquire()  # released: the next one takes it


def test_a_dead_pid_on_this_host_is_taken_over_with_a_warning(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, replace(Holder.this_process(), pid=pid, pid_start=None))
    warnings = []
    lock = RunDirLock(tmp_path, warn=warnings.append)
    lock.acquire()
    assert len(warnings) == 1 and f"pid {pid} no longer runs on {socket.gethostname()}" in warnings[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    me = Holder.this_process()
    if me.pid_start is None:
        pytest.skip("no /proc: process start times are unknown")
    write_lock(tmp_path, replace(me, pid_start=me.pid_start - 1))  # this pid, once another process's
    warnings = []
    RunDirLock(tmp_path, warn=warnings.append).acquire()
    assert len(warnings) == 1 and f"pid {me.pid} no longer runs" in warnings[0]


@pytest.mark.parametrize(
    ("holder_job", "my_job", "taken"),
    [(None, None, False), ("41", None, False), ("41", "42", False), ("41", "41", True)],
)
def test_a_lock_from_another_host_is_respected_unless_it_is_this_slurm_job(
    tmp_path, monkeypatch, holder_job, my_job, taken
):
    """The same Slurm job id on another host is this job before a requeue, which Slurm has ended."""
    if my_job is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", my_job)
    holder = replace(Holder.this_process(), host="elsewhere", pid=1, slurm_job=holder_job)
    write_lock(tmp_path, holder)
    if not taken:
        message = refusal(tmp_path)
        assert f"host elsewhere, pid 1{f', Slurm job {holder_job}' if holder_job else ''}" in message
        assert f"delete {tmp_path / LOCK_FILE}" in message
        return
    warnings = []
    RunDirLock(tmp_path, warn=warnings.append).acquire()
    assert "an earlier run of this Slurm job (41)" in warnings[0]


def test_a_flock_held_lock_is_refused_whatever_its_file_says(tmp_path):
    """Where the filesystem has flock, a held one means a live holder, even one whose pid this
    host cannot see (another PID namespace under the same host name)."""
    import fcntl

    path = write_lock(tmp_path, replace(Holder.this_process(), pid=dead_pid(), pid_start=None))
    with open(path, "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert "is in use by another run" in refusal(tmp_path)
    RunDirLock(tmp_path, warn=lambda _: None).acquire()  # flock gone: the dead pid decides


def test_a_lock_file_that_does_not_parse_is_refused_naming_the_file(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{")
    assert f"If no run uses this directory, delete {tmp_path / LOCK_FILE}" in refusal(tmp_path)


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path):
    first = RunDirLock(tmp_path)
    first.acquire()
    (tmp_path / LOCK_FILE).unlink()  # a user deleted it
    with RunDirLock(tmp_path):
        first.release()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert "is in use" in refusal(tmp_path)


# --- real runs -------------------------------------------------------------------------------------


def start(*overrides: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        train_command(1, *overrides),
        cwd=cwd,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_file(path: Path, process: subprocess.Popen) -> None:
    """Poll until ``path`` exists; fail if ``process`` ends first or after ``WAIT`` seconds."""
    deadline = time.monotonic() + WAIT
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {path} appeared:\n{''.join(process.communicate())}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {WAIT} s")
        time.sleep(0.05)


def fifo_data(tmp_path: Path) -> Path:
    """A FIFO for ``data.source``: a run reading it waits, its directory locked, until ``feed``."""
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    return fifo


def feed(fifo: Path) -> threading.Thread:
    rows = [{"prompt": f"add {i} {i + 1}", "response": str(2 * i + 1)} for i in range(200)]
    writer = threading.Thread(
        target=fifo.write_text, args=("".join(json.dumps(r) + "\n" for r in rows),), daemon=True
    )
    writer.start()
    return writer


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("bdlora-train: error")]


@pytest.mark.slow
def test_two_runs_started_in_one_directory_at_once_train_once(tmp_path):
    """The second start finds the first holding the lock (waiting on its data): it exits 2 naming
    the first, which then trains every step once and releases the lock."""
    run_dir, fifo = tmp_path / "twin", fifo_data(tmp_path)
    args = [
        "data=jsonl",
        f"data.source={fifo}",
        *TINY,
        "steps=3",
        "checkpoint.resume=auto",
        f"run_dir={run_dir}",
    ]
    first = second = start(*args, cwd=tmp_path)
    try:
        wait_for_file(run_dir / LOCK_FILE, first)
        second = start(*args, cwd=tmp_path)
        _, second_err = second.communicate(timeout=WAIT)
        feed(fifo)
        first_out, first_err = first.communicate(timeout=WAIT)
    finally:
        first.kill()
        second.kill()
    assert second.returncode == 2, second_err
    (line,) = error_lines(second_err)
    assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}," in line
    assert first.returncode == 0, f"{first_out}\n{first_err}"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_held_lock_refuses_a_two_rank_run_on_every_rank_before_it_writes(tmp_path):
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        lock_text = (run_dir / LOCK_FILE).read_bytes()
        result = train(2, *TINY, "steps=2", "parallel.tp=2", f"run_dir={run_dir}", cwd=tmp_path)
        assert result.returncode != 0
        out = output_of(result)
        (line,) = error_lines(result.stderr)
        assert f"(host {socket.gethostname()}, pid {os.getpid()}," in line
        assert "Connection closed by peer" not in out and 'run_lock.py", line' not in out
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]
        assert (run_dir / LOCK_FILE).read_bytes() == lock_text


@pytest.mark.slow
def test_a_sigkilled_runs_lock_is_taken_over_and_an_error_exit_releases_the_lock(tmp_path):
    run_dir, fifo = tmp_path / "run", fifo_data(tmp_path)
    killed = start("data=jsonl", f"data.source={fifo}", *TINY, "steps=3", f"run_dir={run_dir}", cwd=tmp_path)
    wait_for_file(run_dir / LOCK_FILE, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=WAIT)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == killed.pid  # left behind

    result = train(1, *TINY, "steps=3", "checkpoint.every=1", f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    assert f"the lock of a run that ended (host {socket.gethostname()}, pid {killed.pid}," in result.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert not (run_dir / LOCK_FILE).exists()  # a normal exit releases it

    refused = train(1, *TINY, "steps=4", f"run_dir={run_dir}", cwd=tmp_path)  # resume=never: used dir
    assert refused.returncode == 2 and "already holds another run" in refused.stderr, output_of(refused)
    assert not (run_dir / LOCK_FILE).exists()  # and so does an error exit


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


RECORD = (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "plan.json")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("adapter.rank=4", "was saved with a different adapter config: rank=8 (now 4)"),
        ("data.seed=1", "loader state was saved with"),  # other data: the loader refuses it
    ],
)
def test_a_refused_resume_leaves_the_run_it_refused_as_it_was(tmp_path, change, message):
    run_dir = tmp_path / "run"
    args = [*TINY, "checkpoint.every=1", f"run_dir={run_dir}"]
    first = train(1, *args, "steps=2", cwd=tmp_path)
    assert first.returncode == 0, output_of(first)
    before = files_of(run_dir)
    assert set(RECORD) <= set(before)

    refused = train(1, *args, "steps=4", "checkpoint.resume=auto", change, cwd=tmp_path)
    assert refused.returncode == 2, output_of(refused)
    (line,) = error_lines(refused.stderr)
    assert message in line
    assert files_of(run_dir) == before  # .hydra/, plan.json, checkpoints, metrics: byte for byte
