"""``bdlora-train``: start the process group, compose the config (Hydra), run, close.

Every rank of a ``torchrun`` job runs ``main``. The process group starts before Hydra so that rank
0 can choose one time stamp for the job: Hydra's default run and sweep directories contain it, so
every rank resolves the same directory (``hydra.run.dir``, ``hydra.sweep.dir`` and
``hydra.sweep.subdir`` decide where a run writes; ``run_dir=`` overrides them). Expected failures
(bad settings, paths, data, damaged checkpoints) end with one ``bdlora-train: error: ...`` line and
exit code 2; ``BDLORA_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from contextlib import contextmanager

import hydra
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from bdlora.parallel.comm import broadcast_object
from bdlora.parallel.mesh import MissingRanksError, RankFailed, init_distributed
from bdlora.train.config import STAMP_ENV, load_train_config, new_stamp, register_configs
from bdlora.train.preemption import StoppedBySignal
from bdlora.train.run import run

EXPECTED_ERRORS = (ValueError, OSError, RankFailed, MissingRanksError)
register_configs()


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    """The console entry point (``bdlora-train``, ``python -m bdlora.train``), on every rank."""
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # unwind: finally blocks run, files stay whole
    _take_local_rank_argument()
    with process_group():
        os.environ[STAMP_ENV] = broadcast_object(os.environ.get(STAMP_ENV) or new_stamp())
        hydra_main()


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

    hydra_cfg = HydraConfig.get()
    before = _record_stamp(hydra_cfg.runtime.output_dir)
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
            if _record_stamp(hydra_cfg.runtime.output_dir) != before:  # this start wrote its record
                _record_error(hydra_cfg.runtime.output_dir, err)
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


def _record_error(run_dir: str, err: BaseException) -> None:
    """The failure's message in the run directory (rank 0), so a sweep report can list the job.

    Called only when this start wrote the run's record: a start refused before that (a bad setting,
    a refused resume, another run holding the directory) leaves the directory as it was.
    """
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    # never beside a finished run: this job may have failed because the directory holds one
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        try:
            with open(os.path.join(run_dir, ERROR_FILE), "w") as f:
                f.write(f"{type(err).__name__}: {err}\n")
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
