"""``bdlora-train parallel.engine=deepspeed`` in one plain process (no launcher, so no ``RANK``,
``LOCAL_RANK`` or ``WORLD_SIZE``): it trains, the same trajectory as the native engine in one process.
"""

from __future__ import annotations

import pytest

from tests.test_deepspeed import ARGS, assert_same_run
from tests.test_train import output_of, read_metrics, train

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")


@pytest.mark.slow
def test_deepspeed_trains_in_one_plain_process_as_the_native_engine(tmp_path, monkeypatch):
    for name in LAUNCHER_VARIABLES:  # the runs inherit this environment: none of a launcher's
        monkeypatch.delenv(name, raising=False)
    args = [*ARGS, "parallel.tp=1", "data.micro_batch_size=8"]
    native = train(1, *args, f"run_dir={tmp_path / 'native'}", cwd=tmp_path)
    assert native.returncode == 0, output_of(native)

    result = train(1, *args, "parallel.engine=deepspeed", f"run_dir={tmp_path / 'ds'}", cwd=tmp_path)

    assert result.returncode == 0, output_of(result)
    assert "mesh            dp=1 x tp=1" in result.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "ds")] == [1, 2, 3, 4]
    assert_same_run(tmp_path / "ds", tmp_path / "native", "one process")
