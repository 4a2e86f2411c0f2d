"""The benchmark machinery measures what it says and `shoestring bench` writes its report
(smoke scale: figures are not asserted, only that they are there and judged)."""

import json

from shoestring.bench import goals, levers, report, suite
from shoestring.bench.runner import side_by_side
from shoestring.bench.step import StepSpec, measure
from shoestring.cli import main

MICRO = StepSpec(preset="micro", vocab_size=512, batch=2, seq_len=32, warmup=1, steps=1)


def test_measure_counts_memory_and_time():
    r = measure(MICRO)
    assert r["step_s"] > 0 and r["tokens_per_s"] > 0
    assert r["saved_activation_bytes"] >= r["estimated_block_activation_bytes"] > 0
    assert r["state_bytes"]["optimizer"] >= 2 * r["state_bytes"]["params"]


def test_side_by_side_takes_the_median_round():
    out = side_by_side({"a": MICRO}, rounds=3)
    assert len(out["a"]["step_s_all"]) == 3
    assert out["a"]["step_s"] == sorted(out["a"]["step_s_all"])[1]


def test_bench_cli_fills_the_report_and_keeps_the_prose(tmp_path, monkeypatch):
    monkeypatch.setattr(levers, "PRECISIONS", ("fp32", "bf16"))
    monkeypatch.setattr(levers, "CHECKPOINTING", ("none", "full"))
    (tmp_path / "benchmarks.md").write_text("# B\n\nWhy bf16 wins.\n\n<!-- bench:levers -->\nold figures\n<!-- /bench:levers -->\n\nMore prose.\n")
    assert main(["bench", "--size", "smoke", "--only", "levers", "--out", str(tmp_path)]) == 0
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "Why bf16 wins." in doc and "More prose." in doc and "old figures" not in doc
    assert "`shoestring bench --size smoke --only levers`" in doc and "torch " in doc and "cores" in doc
    assert "| full |" in doc and "bf16 autocast >= 2x fp32 tokens/s" in doc
    assert "![levers](img/levers.png)" in doc and (tmp_path / "img" / "checkpointing-frontier.png").stat().st_size > 0
    rows = json.loads((tmp_path / "benchmarks.json").read_text())["levers"]["rows"]
    assert {r["config"] for r in rows} == {"precision fp32", "precision bf16", "checkpointing full", levers.DEFAULT}


def test_a_missing_section_is_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(suite.SECTIONS, "ghost", ("shoestring.bench.no_such_section", "Ghost"))
    o = suite.run_section("ghost", "smoke", print)
    assert o.problem.startswith("not available: No module named") and not o.failed
    suite.write([o], "smoke", "shoestring bench --only ghost", tmp_path)
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "## Ghost" in doc and "Section ghost not available" in doc


def test_goals_say_met_missed_or_not_judged():
    def lever(precision, mode, tps, saved, preset="small"):
        return {"precision": precision, "checkpointing": mode, "tokens_per_s": tps, "step_s": 1 / tps,
                "saved_activation_bytes": saved, "mfu": 0.30, "matmul_peak_flops": 1e12, "spec": {"preset": preset}}

    rows = [lever("fp32", "none", 100, 10), lever("bf16", "none", 250, 10), lever("bf16", "full", 200, 1)]
    by_goal = {v.goal: v for v in goals.verdicts("levers", rows)}
    assert by_goal["bf16 autocast >= 2x fp32 tokens/s"].met is True
    assert "+25% vs the goal" in by_goal["bf16 autocast >= 2x fp32 tokens/s"].measured
    assert by_goal["`full` checkpointing keeps >= 70% fewer activation bytes"].met is True
    assert by_goal["`full` checkpointing costs < 30% extra step time"].met is True  # +25%
    assert by_goal["`selective` checkpointing costs < 10% extra step time"].met is None  # no row
    assert by_goal["MFU of the `small` preset in bf16 (the trainer's default) >= 35% of the measured bf16 matmul peak"].met is False
    assert goals.verdicts("strategies", [{"case": "fsdp2 reshard", "step_s": 2.0, "peak_bytes": 1},
                                         {"case": "zero3", "step_s": 1.0, "peak_bytes": 1}])[0].met is False


def test_fill_replaces_only_its_own_block_and_appends_new_ones():
    doc = "a\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nb\n"
    doc = report.fill(doc, "x", "X", "new")
    assert doc == "a\n<!-- bench:x -->\nnew\n<!-- /bench:x -->\nb\n"
    assert report.fill(doc, "y", "Why", "fresh").endswith("## Why\n\n<!-- bench:y -->\nfresh\n<!-- /bench:y -->\n")
