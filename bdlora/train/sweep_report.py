"""One table for a Hydra multirun of ``bdlora-train``: which setting gave which loss, size and speed.

A sweep directory (``multirun/<experiment>/<stamp>``) holds one subdirectory per job, named by job
number; each job leaves these files, all of which may be missing when it failed early:

=========================  =========================================================================
``.hydra/overrides.yaml``  the job's Hydra overrides (written once its checks pass, or on failure)
``plan.json``              the resolved adapter: ``params`` is its parameter count
``metrics.jsonl``          one record per logged step; a killed job may leave a torn last line
``summary.json``           written only when the job finished: final train and eval metrics
``error.txt``              written only when the job failed: the error message
=========================  =========================================================================

``write_sweep_report`` writes ``sweep_report.md``, ``sweep_report.csv`` and ``sweep_report.png``
(final eval loss against adapter size). The report needs no process group and no torch.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bdlora.train.metrics import read_metrics

UNFINISHED = "no summary.json or error.txt (killed or still running: see its log)"
COLUMNS = (
    "job",
    "overrides",
    "adapter_params",
    "train_loss",
    "eval_loss",
    "tokens_per_s",
    "tp_collectives_per_step",
)
CSV_COLUMNS = ("job", "status", *COLUMNS[1:], "error")
FAILED_COLUMNS = ("job", "overrides", "error")
# one colour used by nothing else in the figure, so the markers can be found in the saved image
MARKER_COLOR = "#ff0000"
SWEEP_LAYOUT = (
    "a sweep directory is a Hydra multirun directory (multirun/<experiment>/<stamp>) holding one "
    "subdirectory per job named 0, 1, ... with .hydra/overrides.yaml, plan.json, metrics.jsonl and "
    "summary.json or error.txt"
)


class SweepDirError(ValueError):
    """A path that is not a sweep directory; the CLI reports it and exits 2."""


@dataclass
class SweepReport:
    """The report's rows (finished jobs, sorted by adapter size) and failed jobs, and its files."""

    rows: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    markdown_path: Path
    csv_path: Path
    png_path: Path
    markdown: str


def write_sweep_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> SweepReport:
    """Read every job of ``sweep_dir`` and write the Markdown, CSV and PNG report into ``out_dir``
    (default: ``sweep_dir``). Raises ``SweepDirError`` (a ``ValueError``) for a non-sweep path."""
    sweep_dir = Path(sweep_dir)
    jobs = [_read_job(d) for d in _job_dirs(sweep_dir)]
    _set_override_labels(jobs)
    rows = sorted((j for j in jobs if j["status"] == "ok"), key=_size_order)
    failed = [j for j in jobs if j["status"] == "failed"]
    out = Path(out_dir) if out_dir is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    report = SweepReport(
        rows,
        failed,
        out / "sweep_report.md",
        out / "sweep_report.csv",
        out / "sweep_report.png",
        _markdown(sweep_dir, rows, failed),
    )
    report.markdown_path.write_text(report.markdown)
    _write_csv(report.csv_path, rows + failed)
    _plot(report.png_path, rows, _title(sweep_dir))
    return report


def _job_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        raise SweepDirError(f"{sweep_dir}: no such directory; {SWEEP_LAYOUT}")
    jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and d.name.isdigit()]
    if not jobs:
        raise SweepDirError(f"{sweep_dir}: no job subdirectories (0, 1, ...); {SWEEP_LAYOUT}")
    return sorted(jobs, key=lambda d: int(d.name))


def _read_job(job_dir: Path) -> dict[str, Any]:
    """One job's row; a failed job keeps the last values it logged, which the CSV shows."""
    plan = _read_json(job_dir / "plan.json") or {}
    summary = _read_json(job_dir / "summary.json")
    records = read_metrics(job_dir / "metrics.jsonl")
    done = summary or {}
    return {
        "job": int(job_dir.name),
        "status": "ok" if summary is not None else "failed",
        "override_list": _read_overrides(job_dir / ".hydra" / "overrides.yaml"),
        "adapter_params": plan.get("params", done.get("adapter_params")),
        "train_loss": (done.get("final") or {}).get("loss", _last(records, "loss")),
        "eval_loss": (done.get("eval") or {}).get("eval_loss", _last(records, "eval_loss")),
        "tokens_per_s": _steady_throughput(records),
        "tp_collectives_per_step": _most_common(records, "tp_collectives"),
        "error": None if summary is not None else _error_of(job_dir),
    }


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_overrides(path: Path) -> list[str]:
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def _steady_throughput(records: list[dict]) -> float | None:
    """Median tokens/s without the first step, whose time includes warm-up (allocation, compilation)."""
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return statistics.median(rates[1:] or rates) if rates else None


def _last(records: list[dict], key: str) -> Any:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def _most_common(records: list[dict], key: str) -> Any:
    """The usual per-step count: steps that also sync gradients or gather differ from the rest."""
    counts = Counter(r[key] for r in records if key in r).most_common(1)
    return counts[0][0] if counts else None


def _error_of(job_dir: Path) -> str:
    path = job_dir / "error.txt"
    if not path.is_file():
        return UNFINISHED
    return path.read_text().strip() or "error.txt is empty"


def _set_override_labels(jobs: list[dict[str, Any]]) -> None:
    """Each job's ``overrides``: only the settings that differ between jobs, since the ones every job
    shares say nothing about the differences in the table (all of them when none differ). A job
    whose overrides are unknown (killed before it wrote them) differs in nothing."""
    parsed = [dict(o.partition("=")[::2] for o in job["override_list"]) for job in jobs]
    known = [p for p in parsed if p]
    keys = list(dict.fromkeys(k for p in known for k in p))
    varying = [k for k in keys if len({p.get(k) for p in known}) > 1] or keys
    for job, settings in zip(jobs, parsed):
        job["overrides"] = " ".join(f"{k}={settings[k]}" for k in varying if k in settings)
        del job["override_list"]


def _size_order(row: dict[str, Any]) -> tuple:
    params = row["adapter_params"]
    return (params is None, params or 0, row["job"])


def _markdown(sweep_dir: Path, rows: list[dict], failed: list[dict]) -> str:
    lines = [f"# Sweep report: {sweep_dir}", "", f"{len(rows)} finished, {len(failed)} failed.", ""]
    lines += _md_table(COLUMNS, rows) if rows else ["No finished runs."]
    if failed:
        lines += ["", "## Failed runs", "", *_md_table(FAILED_COLUMNS, failed)]
    return "\n".join(lines) + "\n"


def _md_table(columns: tuple[str, ...], rows: list[dict]) -> list[str]:
    text_columns = ("overrides", "error")
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" if c in text_columns else "---:" for c in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_cell(row[c]) for c in columns) + " |")
    return lines


def _md_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _title(sweep_dir: Path) -> str:
    return "/".join(sweep_dir.resolve().parts[-2:])


def _plot(path: Path, rows: list[dict], title: str) -> None:
    """Final eval loss against adapter size, one pure-red marker per finished run with an eval loss.

    Built on a bare ``Figure`` with the Agg canvas and the default style, so it neither touches
    pyplot's global state nor inherits a user's matplotlibrc colours.
    """
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    points = [r for r in rows if r["eval_loss"] is not None and r["adapter_params"] is not None]
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(7, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_title(f"{title}: final eval loss by adapter size")
        ax.set_xlabel("adapter parameters")
        ax.set_ylabel("final eval loss (nats/token)")
        ax.grid(color="0.85", zorder=0)
        if points:
            _plot_points(ax, points)
        else:
            ax.text(0.5, 0.5, "no finished run has an eval loss", ha="center", transform=ax.transAxes)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        fig.tight_layout()
        fig.savefig(path, dpi=100)


def _plot_points(ax, points: list[dict]) -> None:
    xs = [p["adapter_params"] for p in points]
    ys = [p["eval_loss"] for p in points]
    if max(xs) >= 10 * min(xs) > 0:  # rank sweeps double the size: even spacing on a log axis
        ax.set_xscale("log")
    # no edge and no antialiasing: every marker pixel is exactly MARKER_COLOR
    ax.scatter(xs, ys, s=64, c=MARKER_COLOR, edgecolors="none", antialiased=False, zorder=3)
    ax.margins(x=0.15, y=0.2)
    middle = (min(xs) + max(xs)) / 2
    for p, x, y in zip(points, xs, ys):
        right = x > middle  # labels of the right-hand points go left, inside the figure
        label = " ".join(o.removeprefix("adapter.") for o in p["overrides"].split()) or f"job {p['job']}"
        ax.annotate(
            label,
            (x, y),
            xytext=(-7 if right else 7, 7),
            textcoords="offset points",
            ha="right" if right else "left",
            fontsize=8,
            color="black",
        )
