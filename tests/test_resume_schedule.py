"""The lr schedule across a resume that changes ``steps``: ``optim.on_steps_change=stretch`` (the
default) stretches the rest of the cosine to the new total, ``keep`` keeps its saved end; neither
jumps, and rank 0 says what happened. Tier 1 drives the scheduler through a JSON round trip, as the
checkpoint stores it; the slow tests resume the real trainer with ``steps`` raised.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from bdlora.train.checkpoint import step_dir_name
from bdlora.train.config import OptimConfig
from bdlora.train.loop import build_scheduler
from tests.test_train import by_step, output_of, read_metrics, train

LR, MIN_RATIO, WARMUP = 2e-3, 0.1, 10


def scheduler(steps: int, state: dict | None = None, **optim):
    cfg = OptimConfig(lr=LR, min_lr_ratio=MIN_RATIO, warmup_steps=WARMUP, **optim)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, steps)
    if state is not None:  # as Checkpointer.restore does it, from trainer_state.json
        sched.load_state_dict(json.loads(json.dumps(state)))
        for group, lr in zip(opt.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    return sched


def run(sched, until: int) -> tuple[dict[int, float], dict]:
    """The lr of each step (1-based, as metrics.jsonl logs it) up to ``until``; the state after it."""
    lrs = {}
    for step in range(sched.last_epoch + 1, until + 1):
        lrs[step] = sched.optimizer.param_groups[0]["lr"]
        sched.optimizer.step()
        sched.step()
    return lrs, sched.state_dict()


def cosine(progress: float) -> float:
    return LR * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def max_change(lrs: dict[int, float], after: int) -> float:
    """The largest step-to-step change of the lr after step ``after`` (past the warmup)."""
    steps = sorted(s for s in lrs if s > after)
    return max(abs(lrs[b] - lrs[a]) for a, b in zip(steps, steps[1:]))


def test_an_unchanged_resume_continues_the_schedule_exactly():
    uninterrupted, _ = run(scheduler(200), 200)
    first, state = run(scheduler(200), 120)
    rest, _ = run(scheduler(200, state), 200)
    assert {**first, **rest} == uninterrupted
    assert scheduler(200, state).steps_change is None


def test_stretch_continues_the_cosine_from_the_resume_step_to_the_new_total():
    planned, _ = run(scheduler(200), 200)
    _, state = run(scheduler(200), 150)
    resumed = scheduler(400, state)
    lrs, _ = run(resumed, 400)
    assert lrs[151] == planned[151]  # the lr the saved run would have used: no jump
    p0 = (150 - WARMUP) / (200 - WARMUP)  # the cosine's progress at the resume (step index 150)
    for step, lr in lrs.items():
        assert lr == pytest.approx(cosine(p0 + (1 - p0) * (step - 1 - 150) / (400 - 150)), rel=1e-12)
    assert all(lrs[s + 1] <= lrs[s] for s in range(151, 400))
    assert lrs[400] == pytest.approx(LR * MIN_RATIO, rel=1e-3)
    assert max_change(lrs, 150) <= max_change(planned, WARMUP)  # gentler than the planned curve
    assert resumed.steps_change == (
        "steps 200 -> 400 on resume (optim.on_steps_change=stretch): the rest of the cosine is stretched "
        "to end at step 400; lr 4.90e-04 at step 151 -> 2.00e-04 at step 400"
    )


def test_keep_follows_the_saved_cosine_then_holds_the_minimum():
    planned, _ = run(scheduler(200), 200)
    _, state = run(scheduler(200), 150)
    resumed = scheduler(400, state, on_steps_change="keep")
    lrs, _ = run(resumed, 400)
    assert {s: lrs[s] for s in range(151, 201)} == {s: planned[s] for s in range(151, 201)}
    assert {lrs[s] for s in range(201, 401)} == {LR * MIN_RATIO}
    assert resumed.steps_change == (
        "steps 200 -> 400 on resume (optim.on_steps_change=keep): the cosine keeps its end at step 200, "
        "then min lr; lr 4.90e-04 at step 151 -> 2.00e-04 at step 400"
    )


@pytest.mark.parametrize("mode", ["stretch", "keep"])
def test_extending_a_finished_run_does_not_restart_the_cosine(mode):
    """The issue's case: 200 steps done, resumed with 400; the lr stays at min (was 1.13e-3 at 202)."""
    _, state = run(scheduler(200), 200)
    lrs, _ = run(scheduler(400, state, on_steps_change=mode), 400)
    assert list(lrs.values()) == pytest.approx([LR * MIN_RATIO] * 200, rel=1e-12)


def test_a_resume_in_the_warmup_with_stretch_is_the_schedule_planned_for_the_new_total():
    planned, _ = run(scheduler(400), 400)
    first, state = run(scheduler(200), 5)
    rest, _ = run(scheduler(400, state), 400)
    assert {**first, **rest} == pytest.approx(planned, rel=1e-12)


def test_lowering_steps_compresses_with_stretch_and_stops_early_with_keep():
    planned, _ = run(scheduler(400), 400)
    _, state = run(scheduler(400), 100)
    stretched, _ = run(scheduler(300, state), 300)
    kept, _ = run(scheduler(300, state, on_steps_change="keep"), 300)
    assert stretched[101] == kept[101] == planned[101]
    assert stretched[300] == pytest.approx(LR * MIN_RATIO, rel=1e-3)
    assert kept == {s: planned[s] for s in range(101, 301)}


def test_the_course_is_saved_so_later_resumes_continue_it():
    """200 -> 400 at step 150, resumed again at 300 with 400 (no change), then 400 -> 600 at 350."""
    _, state = run(scheduler(200), 150)
    once, _ = run(scheduler(400, state), 600)  # reference: the one stretched course, run past its end
    lrs, state = run(scheduler(400, state), 300)
    again = scheduler(400, state)
    assert again.steps_change is None
    more, state = run(again, 350)
    last, _ = run(scheduler(600, state), 600)
    assert {**lrs, **more} == {s: once[s] for s in range(151, 351)}
    assert last[351] == once[351]  # continuous across the second change too
    assert last[600] == pytest.approx(LR * MIN_RATIO, rel=1e-3)


def test_a_state_saved_before_courses_were_saved_still_resumes():
    """trainer_state.json from a LambdaLR: its keys, and ``lr_lambdas``; no ``steps`` or ``course``."""
    planned, _ = run(scheduler(200), 200)
    _, state = run(scheduler(200), 120)
    old = {k: v for k, v in state.items() if k not in ("steps", "course")} | {"lr_lambdas": [None]}
    resumed = scheduler(200, old)
    lrs, _ = run(resumed, 200)
    assert lrs == {s: planned[s] for s in range(121, 201)}
    assert resumed.steps_change is None


def test_a_constant_schedule_says_steps_do_not_matter():
    _, state = run(scheduler(200, schedule="constant"), 150)
    resumed = scheduler(400, state, schedule="constant")
    lrs, _ = run(resumed, 400)
    assert set(lrs.values()) == {LR}
    assert "optim.schedule=constant does not depend on steps" in resumed.steps_change


def test_a_bad_setting_names_the_key():
    with pytest.raises(ValueError, match=r"optim.on_steps_change='restart'; valid: stretch, keep"):
        scheduler(10, on_steps_change="restart")


# --- the trainer, resumed with steps raised ---------------------------------------------------------

ARGS = [
    "steps=6",
    "eval_every=0",
    "data.num_examples=200",
    "data.seq_len=32",
    "data.micro_batch_size=4",
    "logger.progress=false",
    f"optim.lr={LR}",
    f"optim.min_lr_ratio={MIN_RATIO}",
    "optim.warmup_steps=2",
    "checkpoint.every=3",
    "checkpoint.keep_last=0",
]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A 6-step run (lr: 2 warmup steps, then the cosine), checkpointed at step 3."""
    tmp = tmp_path_factory.mktemp("six")
    result = train(1, *ARGS, f"run_dir={tmp / 'run'}", cwd=tmp)
    assert result.returncode == 0, output_of(result)
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stretch", "keep"])
def test_the_trainer_resumed_with_more_steps_keeps_the_lr_continuous(six_steps, tmp_path, mode):
    run_dir = tmp_path / "run"
    saved = step_dir_name(3)
    shutil.copytree(six_steps / "checkpoints" / saved, run_dir / "checkpoints" / saved)
    extra = [] if mode == "stretch" else ["optim.on_steps_change=keep"]  # stretch: the default
    args = [*ARGS, "steps=12", *extra, "checkpoint.resume=auto", f"run_dir={run_dir}"]
    result = train(1, *args, cwd=tmp_path)
    assert result.returncode == 0, output_of(result)
    line = f"steps 6 -> 12 on resume (optim.on_steps_change={mode}): "
    assert result.stdout.count(line) == 1, result.stdout
    planned, lrs = by_step(read_metrics(six_steps), "lr"), by_step(read_metrics(run_dir), "lr")
    assert sorted(lrs) == list(range(4, 13))
    assert lrs[4] == planned[4]  # no jump at the resume
    if mode == "stretch":  # progress 1/4 at step index 3, then linearly to 1 at 12
        expected = {s: cosine(0.25 + 0.75 * (s - 1 - 3) / (12 - 3)) for s in lrs}
    else:  # the 6-step cosine, then its minimum
        expected = {s: planned[s] if s <= 6 else LR * MIN_RATIO for s in lrs}
    assert lrs == pytest.approx(expected, rel=1e-9)
