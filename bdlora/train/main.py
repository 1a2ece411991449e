"""``bdlora-train``: parse (Hydra) -> build -> train -> close. ``torchrun ... bdlora-train key=value``."""

from __future__ import annotations

import signal
from pathlib import Path

import hydra
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from bdlora.parallel.mesh import init_distributed
from bdlora.train.config import TrainConfig, register_configs
from bdlora.train.run import run

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register_configs()


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    train_cfg: TrainConfig = OmegaConf.to_object(cfg)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # unwind: finally blocks run, files stay whole
    init_distributed()
    try:
        return run(train_cfg, overrides=_task_overrides())
    finally:
        dist.destroy_process_group()


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


if __name__ == "__main__":
    main()
