"""Which launcher started a process: torchrun, srun (Slurm) or submitit, read from the environment."""

import pytest

from bdlora.parallel.launcher_env import PORT_BASE, PORT_SPAN, detect, first_host, port_for_job

SLURM_TASK = {
    "SLURM_JOB_ID": "4711",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node1", "node1"),
        ("node1,node2", "node1"),
        ("gpu[003-005,010],cpu1", "gpu003"),
        ("gpu[7,9]", "gpu7"),
        ("a-b-c[01-02]", "a-b-c01"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_an_empty_node_list_is_an_error():
    with pytest.raises(ValueError, match="node list"):
        first_host("")


def test_the_port_follows_the_job_and_stays_in_range():
    ports = {port_for_job(str(job)) for job in range(100, 110)}
    assert len(ports) == 10  # consecutive jobs on one node never share a port
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert port_for_job("4711") == port_for_job("4711")
    assert port_for_job("4711_3") != port_for_job("4711_4")  # array tasks
    with pytest.raises(ValueError, match="no digits"):
        port_for_job("abc")


def test_torchrun_variables_win_over_slurm():
    env = {
        **SLURM_TASK,
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
    }
    launch = detect(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 1, 2, 1)
    assert (launch.master_addr, launch.master_port) == ("h", 1234)


def test_a_slurm_task_reads_its_rank_and_the_first_node():
    launch = detect(dict(SLURM_TASK))
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 3, 4, 1)
    assert launch.master_addr == "gpu007"
    assert launch.master_port == port_for_job("4711")
    pinned = detect({**SLURM_TASK, "MASTER_PORT": "29511"})
    assert pinned.master_port == 29511


def test_a_slurm_step_of_one_task_is_a_single_process():
    # a batch script or an salloc shell running python itself: the job may have more tasks
    assert detect({**SLURM_TASK, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}).launcher == "single"
    env = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert detect(env).launcher == "single"


def test_submitit_local_tasks():
    env = {
        "SUBMITIT_LOCAL_NTASKS": "2",
        "SUBMITIT_LOCAL_GLOBALID": "1",
        "SUBMITIT_LOCAL_LOCALID": "1",
        "SUBMITIT_LOCAL_JOB_ID": "98765",
    }
    launch = detect(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("submitit-local", 1, 2, 1)
    assert (launch.master_addr, launch.master_port) == ("127.0.0.1", port_for_job("98765"))
    assert detect({**env, "SUBMITIT_LOCAL_NTASKS": "1"}).launcher == "single"


def test_a_non_integer_rank_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        detect({**SLURM_TASK, "SLURM_PROCID": "x"})


def test_nothing_set_is_a_single_process():
    launch = detect({})
    assert (launch.launcher, launch.world_size) == ("single", 1)
