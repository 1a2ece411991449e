"""``bdlora-train``: start the process group, compose the config (Hydra), run, close.

Every rank of a ``torchrun`` job runs ``main``. The process group starts before Hydra so that rank
0 can choose one time stamp for the job: Hydra's default run and sweep directories contain it, so
every rank resolves the same directory (``hydra.run.dir``, ``hydra.sweep.dir`` and
``hydra.sweep.subdir`` decide where a run writes; ``run_dir=`` overrides them). Expected failures
(bad settings, paths, data, damaged checkpoints) end with one ``bdlora-train: error: ...`` line and
exit code 2; ``BDLORA_TRACEBACK=1`` shows the traceback instead. So do the failures Hydra meets while
it composes the config (a bad override or config file) or creates the run directory: Hydra prints
those in several lines and exits 1 unless ``HYDRA_FULL_ERROR=1`` has it raise them, which ``main``
sets in order to say them in one line.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from contextlib import contextmanager

import hydra
import torch.distributed as dist
import yaml
from omegaconf import DictConfig, OmegaConf

from bdlora.parallel.comm import broadcast_object
from bdlora.parallel.mesh import MissingRanksError, RankFailed, init_distributed
from bdlora.train.config import (
    STAMP_ENV,
    describe_hydra_error,
    load_train_config,
    new_stamp,
    register_configs,
)
from bdlora.train.preemption import StoppedBySignal
from bdlora.train.run import run

EXPECTED_ERRORS = (ValueError, OSError, RankFailed, MissingRanksError)
# before Hydra creates any directory for this process: what it creates later changed after this
STARTED_NS = time.time_ns()
register_configs()


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """The console entry point (``bdlora-train``, ``python -m bdlora.train``), on every rank."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # unwind: finally blocks run, files stay whole
    _take_local_rank_argument()
    with process_group(), hydra_errors_in_one_line():
        os.environ[STAMP_ENV] = broadcast_object(os.environ.get(STAMP_ENV) or new_stamp())
        hydra_main()


@contextmanager
def hydra_errors_in_one_line():
    """Hydra's own failures (composing the config, creating the run directory) as one
    ``bdlora-train: error: ...`` line and exit code 2, for a single run and each job of a multirun.
    The job's own failures end inside ``hydra_main``; ``BDLORA_TRACEBACK=1`` or ``HYDRA_FULL_ERROR=1``
    shows the traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    traceback = bool(os.environ.get("BDLORA_TRACEBACK")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing and exiting 1
    try:
        yield
    except (HydraException, OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError, OSError) as err:
        if traceback:
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:  # every rank composed the same config
            print(f"bdlora-train: error: {describe_hydra_error(err)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


@contextmanager
def process_group():
    """The default process group for the block, started from the launcher's environment (torchrun,
    ``srun``, submitit) and destroyed after it; one already started is left as it is."""
    if dist.is_initialized():
        yield
        return
    init_distributed()
    try:
        yield
    finally:
        gc.collect()  # what still holds a group (an engine, a mesh) goes while the interpreter is whole
        dist.destroy_process_group()


@hydra.main(version_base="1.3", config_path="pkg://bdlora.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    """One job: a single run, or one job of a multirun (Hydra calls it once per job; under
    ``hydra/launcher=submitit_*`` in a new process per task, which starts its own group here)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    before = _record_stamp(hydra_cfg.runtime.output_dir)
    fresh = created_by_this_start(hydra_cfg.runtime.output_dir)
    with process_group():
        try:
            train_cfg = load_train_config(cfg)
            return run(
                train_cfg,
                run_dir=hydra_cfg.runtime.output_dir,
                overrides=list(hydra_cfg.overrides.task),
                hydra_yaml=OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
            )
        except StoppedBySignal as stopped:
            if dist.get_rank() == 0:
                print(f"bdlora-train: {stopped}", file=sys.stderr, flush=True)
            raise SystemExit(stopped.exit_code) from None
        except EXPECTED_ERRORS as err:
            wrote_record = _record_stamp(hydra_cfg.runtime.output_dir) != before
            job_overrides = list(hydra_cfg.overrides.task) if hydra_cfg.mode == RunMode.MULTIRUN else None
            _leave_run_dir(hydra_cfg.runtime.output_dir, err, wrote_record, fresh, job_overrides)
            if os.environ.get("BDLORA_TRACEBACK"):
                raise
            _report(err)
            raise SystemExit(2) from None


def _take_local_rank_argument() -> None:
    """The ``deepspeed`` launcher passes ``--local_rank=N``, which Hydra would reject: move it to
    ``LOCAL_RANK`` (torchrun's variable) and off the command line."""
    args, kept = sys.argv[1:], [sys.argv[0]]
    while args:
        arg = args.pop(0)
        name, _, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            os.environ["LOCAL_RANK"] = value or args.pop(0)
        else:
            kept.append(arg)
    sys.argv[:] = kept


ERROR_FILE = "error.txt"


def _record_stamp(run_dir: str) -> int | None:
    """When the run's record (``.hydra/config.yaml``) was last written, None if it was not."""
    try:
        return os.stat(os.path.join(run_dir, ".hydra", "config.yaml")).st_mtime_ns
    except OSError:
        return None


def created_by_this_start(run_dir: str) -> bool:
    """Whether Hydra created ``run_dir`` for this start: it is empty and changed after this process
    began (Hydra's ``mkdir`` leaves a directory that existed as it was). Directory times come from
    the filesystem's clock: where a network filesystem's clock runs behind this host's, a new
    directory looks old and stays; ahead by N seconds, an empty directory made less than N seconds
    before the start looks new."""
    try:
        return os.stat(run_dir).st_ctime_ns >= STARTED_NS and not os.listdir(run_dir)
    except OSError:
        return False


def _leave_run_dir(
    run_dir: str, err: BaseException, wrote_record: bool, fresh: bool, job_overrides: list[str] | None
) -> None:
    """What a failed start leaves in its run directory.

    A start that wrote the run's record leaves ``error.txt`` beside it. A start refused before that
    (a bad setting, a refused resume, another run holding the directory) leaves a directory that
    existed as it was; one that Hydra created for it goes again, unless it is a multirun job's
    (``job_overrides`` given): that one keeps ``error.txt`` and the job's overrides, so the sweep
    report lists the job with its settings and its message.
    """
    if wrote_record or (fresh and job_overrides is not None):
        _record_error(run_dir, err, job_overrides)
    elif fresh:
        try:
            os.rmdir(run_dir)  # every rank: each removes the directory its own Hydra created
        except FileNotFoundError:
            pass  # another rank's
        except OSError:
            _record_error(run_dir, err)  # not empty: this start wrote there; say why it stopped


def _record_error(run_dir: str, err: BaseException, job_overrides: list[str] | None = None) -> None:
    """The failure's message in ``error.txt`` (rank 0), and a multirun job's overrides in
    ``.hydra/overrides.yaml`` where the job did not get to write its record."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    # never beside a finished run: this job may have failed because the directory holds one
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return
    try:
        with open(os.path.join(run_dir, ERROR_FILE), "w") as f:
            f.write(f"{type(err).__name__}: {err}\n")
        overrides_file = os.path.join(run_dir, ".hydra", "overrides.yaml")
        if job_overrides is not None and not os.path.exists(overrides_file):
            os.makedirs(os.path.dirname(overrides_file), exist_ok=True)
            with open(overrides_file, "w") as f:
                f.write(yaml.safe_dump(job_overrides))
    except OSError:
        pass  # a read-only run directory: the message still goes to stderr


def _report(err: BaseException) -> None:
    """One line on rank 0 (rank 0's message reaches every rank), or on the rank that failed."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 or not isinstance(err, RankFailed):
        where = f" (rank {rank})" if rank else ""
        print(f"bdlora-train: error{where}: {err}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
