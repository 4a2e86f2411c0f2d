"""The planner prices interruptions: Young/Daly's save interval, the expected restarts and what
they add, a rate of 0 changing nothing, and `shoestring plan --interruptions-per-day`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from shoestring.plan.catalogue import get_device, interruptions_at
from shoestring.plan.interruptions import Interruptions, expected_loss, lost_seconds, save_interval
from shoestring.plan.memory import CHECKPOINTED, Levers, checkpoint_bytes, state_bytes
from shoestring.plan.model import full_trainable, model_info
from shoestring.errors import UserError
from shoestring.plan.search import Request, describe, search
from tests.test_plan import run_cli

HARDWARE = ("a100-80gb:16",)  # two nodes of eight
PLAN = ["plan", "--model", "1b", "--tokens", "2e9", "--hardware", HARDWARE[0], "--spot"]


@pytest.mark.parametrize("step_s,write_s,read_s,setup_s,mtbf,run_s", [
    (8.0, 80.0, 40.0, 600.0, 6 * 3600, 20 * 3600),  # a 7B-sized save every few minutes
    (0.5, 3.0, 1.0, 300.0, 3600, 5 * 3600),  # short steps, frequent interruptions: hundreds of steps
    (30.0, 0.5, 0.2, 60.0, 600, 3600),  # a save cheaper than a step: the clamp to 1 step
    (1.0, 2.0, 1.0, 0.0, 10 * 86400, 100 * 3600),  # rare interruptions: long intervals
])
def test_save_interval_minimises_the_expected_loss(step_s, write_s, read_s, setup_s, mtbf, run_s):
    def cost(every: int) -> float:
        return lost_seconds(every, step_s, run_s, write_s, read_s, setup_s, mtbf)

    every = save_interval(step_s, write_s, read_s, setup_s, mtbf, run_s)
    assert every >= 1
    grid = range(1, 4 * every + 50)
    assert cost(every) <= min(cost(k) for k in grid)
    assert cost(every) <= cost(every + 1) and (every == 1 or cost(every) <= cost(every - 1))


def test_the_expected_loss_follows_the_rate():
    """Twice the rate: twice the restarts, more time lost, a shorter interval (Young's sqrt)."""
    def loss(rate: float):
        return expected_loss(Interruptions(rate, 1.0, 2.0, 600.0), nodes=2, run_s=20 * 3600, step_s=8.0,
                             checkpoint_bytes=50 * 10**9, dollars_per_h=30.0)

    one, two = loss(1.0), loss(2.0)
    assert two.restarts == pytest.approx(2 * one.restarts, rel=0.05)
    assert one.restarts == pytest.approx(20 / 12)  # 2 nodes at 1 a day: one every 12 h, over 20 h
    assert two.lost_s > one.lost_s and two.save_every < one.save_every
    assert two.steps_redone == pytest.approx(two.restarts * two.save_every / 2)
    assert one.lost_usd == pytest.approx(one.lost_s / 3600 * 30.0)


def test_checkpoint_bytes_are_the_saved_state_per_node():
    """What a node writes: each rank's share of params, master weights and optimizer state (no
    gradients), at most one whole copy of each: the whole state replicated, half of it sharded
    flat across two nodes."""
    info = model_info("1b")
    trainable = full_trainable(info)

    def whole(levers: Levers) -> int:
        return sum(state_bytes(info, trainable, levers, 1)[k] for k in CHECKPOINTED)

    single = Levers("bf16-pure", "none", "single")
    ddp, fsdp2 = replace(single, strategy="ddp"), replace(single, strategy="fsdp2")
    assert whole(single) < sum(state_bytes(info, trainable, single, 1).values())  # gradients are not saved
    assert checkpoint_bytes(info, trainable, single, 1, 8) == whole(single)
    assert checkpoint_bytes(info, trainable, ddp, 16, 8) == whole(ddp) == whole(single)
    assert checkpoint_bytes(info, trainable, fsdp2, 16, 8) == pytest.approx(whole(fsdp2) / 2, rel=0.01)
    assert checkpoint_bytes(info, trainable, replace(fsdp2, shard_group=8), 16, 8) == pytest.approx(whole(fsdp2), rel=0.01)


def _plans(req: Request) -> dict[str, tuple[float, float]]:
    """Each plan's cost and wall time, best first."""
    return {describe(p): (p.cost, p.wall_h) for p in search(req).plans}


def test_a_zero_rate_changes_nothing_and_a_rate_is_priced_in():
    base = Request("1b", 2e9, hardware=HARDWARE, spot=True)
    plain = _plans(base)
    assert list(_plans(replace(base, interruptions=interruptions_at(0.0))).items()) == list(plain.items())
    priced = search(replace(base, interruptions=interruptions_at(2.0))).plans
    for p in priced:
        x = p.interrupted
        cost, wall = plain[describe(p)]
        assert x is not None and x.restarts > 0 and x.save_every >= 1
        assert p.wall_h == pytest.approx(wall + x.lost_s / 3600) and p.cost == pytest.approx(cost + x.lost_usd)
    # the deadline holds them too: the winner's uninterrupted wall time is met without, missed with them
    best = describe(priced[0])
    deadline = replace(base, deadline_h=priced[0].run_h)
    assert next(p for p in search(deadline).plans if describe(p) == best).meets_deadline
    late = search(replace(deadline, interruptions=interruptions_at(2.0))).plans
    assert not next(p for p in late if describe(p) == best).meets_deadline


def test_cli_prints_and_carries_the_interruptions(capsys):
    code, out = run_cli(capsys, *PLAN, "--interruptions-per-day", "2")
    assert code == 0, out
    text = " ".join(out.split())
    assert "restarts, lost" in text and "interruptions: 2 per node per day on 2 node(s)" in text
    assert "steps redone" in text and "run.save_every = " in text
    code, out = run_cli(capsys, *PLAN, "--interruptions-per-day", "2", "--restart-minutes", "5", "--json")
    data = json.loads(out)
    assert data["request"]["interruptions"]["per_node_day"] == 2 and data["request"]["interruptions"]["setup_s"] == 300
    for plan in data["plans"]:
        x = plan["interruptions"]
        assert x["restarts"] > 0 and x["steps_redone"] > 0 and x["lost_hours"] > 0 and x["lost_usd"] > 0
        assert x["save_every"] >= 1 and x["nodes"] == 2
        assert plan["wall_hours"] == pytest.approx(x["uninterrupted_hours"] + x["lost_hours"])


def test_spot_without_a_rate_says_it_is_not_priced(capsys):
    code, out = run_cli(capsys, *PLAN)
    assert code == 0 and "interruptions are not priced" in out and "--interruptions-per-day" in out
    code, out = run_cli(capsys, *PLAN, "--json")
    assert json.loads(out)["plans"][0]["interruptions"] is None


@pytest.mark.parametrize("flag,value,needle", [
    ("--interruptions-per-day", "-1", "--interruptions-per-day -1.0 is not a rate"),
    ("--checkpoint-write-gbs", "0", "--checkpoint-write-gbs 0.0 is not a transfer rate"),
    ("--restart-minutes", "-3", "--restart-minutes -3 is negative"),
])
def test_bad_interruption_figures_are_one_line(capsys, flag, value, needle):
    code, out = run_cli(capsys, *PLAN, "--interruptions-per-day", "1", flag, value)
    assert code == 2 and "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert needle in out, out


def test_the_catalogue_is_not_a_device():
    with pytest.raises(UserError, match="unknown device"):
        get_device("interruptions")
