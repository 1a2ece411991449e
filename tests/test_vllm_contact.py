"""One test per point where bdlora's vLLM plugin touches vLLM's internals (``CONTACT_POINTS``),
run in the serving venv by ``tests/vllm_contact.py``: a vLLM release that moves one fails here by
name."""

from __future__ import annotations

import json
import subprocess

import pytest

from bdlora import BDLoraConfig, apply_bdlora, save_adapter
from bdlora.serve.vllm_plugin import CONTACT_POINTS
from tests.conftest import tiny_model
from tests.serving import ROOT, require_serve_venv, serve_env


@pytest.fixture(scope="module")
def contact(tmp_path_factory) -> dict:
    python = require_serve_venv()
    adapter = tmp_path_factory.mktemp("contact") / "nb2"
    save_adapter(apply_bdlora(tiny_model(), BDLoraConfig(rank=8, nblocks=2)), adapter)
    proc = subprocess.run(
        [str(python), str(ROOT / "tests" / "vllm_contact.py"), str(adapter)],
        env=serve_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("point", CONTACT_POINTS)
def test_contact_point(contact, point):
    assert contact[point] == "ok", contact[point]
