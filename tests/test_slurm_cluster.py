"""The local Slurm helper runs real jobs and leaves no daemon behind."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.slurm_cluster import pid_alive, sbatch_wait, start_or_skip

SRUN_RANKS = """#!/bin/bash
#SBATCH --ntasks=2
srun -n2 bash -c 'echo $SLURM_PROCID'
"""


@pytest.fixture
def short_root():
    """Slurm and munge put Unix sockets under the root, so it lives under /tmp with a short name."""
    root = Path(tempfile.mkdtemp(prefix="slurm-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_local_slurm_runs_jobs_and_stops(short_root: Path) -> None:
    jobs = short_root / "jobs"
    jobs.mkdir()
    with start_or_skip(short_root) as slurm:
        pids = dict(slurm.pids)
        assert set(pids) == {"munged", "slurmctld", "slurmd"}

        srun = subprocess.run(
            ["srun", "-N1", "-n2", "hostname"],
            check=False,
            env=slurm.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert srun.returncode == 0, srun.stderr
        assert len(srun.stdout.splitlines()) == 2

        (jobs / "ranks.sh").write_text(SRUN_RANKS)
        ok = sbatch_wait("ranks.sh", "--output=ranks.out", cwd=jobs, env=slurm.env, timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert sorted((jobs / "ranks.out").read_text().split()) == ["0", "1"]

        failed = sbatch_wait(
            "#!/bin/bash\nexit 3\n", "--output=/dev/null", cwd=jobs, env=slurm.env, timeout=120
        )
        assert failed.returncode == 3, failed.stderr  # sbatch --wait exits with the job's code

    assert not [name for name, pid in pids.items() if pid_alive(pid)]
