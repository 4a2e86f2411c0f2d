"""The benchmark machinery measures what it says and `shoestring bench` writes its report
(smoke scale: figures are not asserted, only that they are there and judged)."""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from rich.console import Console

from shoestring.bench import goals, levers, report, suite
from shoestring.bench.step import StepSpec, measure, side_by_side
from shoestring.cli import main
from shoestring.plan import probe

MICRO = StepSpec(preset="micro", vocab_size=512, batch=2, seq_len=32, steps=1)


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
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the levers section re-probes: not the user's cache
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
    suite.write([o], "smoke", "shoestring bench --only ghost", tmp_path, suite.RunFacts(report.Provenance("box", "v"), FAST_BF16))
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "## Ghost" in doc and "Section ghost not available" in doc


# Two kinds of 2-core machine we have seen: AVX-512-BF16 (bf16 ~2.5x fp32) and AVX2-only (bf16 ~1%).
FAST_BF16, SLOW_BF16 = goals.MatmulPeaks(fp32=1.4e11, bf16=3.5e11), goals.MatmulPeaks(fp32=1.26e11, bf16=0.9e9)
MFU_GOAL = "MFU of the `small` preset in bf16 (the trainer's default) >= 35% of the measured bf16 matmul peak"


def _lever_rows(peaks: goals.MatmulPeaks, bf16_tps: float = 250) -> list[dict]:
    def lever(precision, mode, tps, saved):
        return {"precision": precision, "checkpointing": mode, "tokens_per_s": tps, "step_s": 1 / tps,
                "saved_activation_bytes": saved, "mfu": 0.30, "matmul_peak_flops": getattr(peaks, precision),
                "spec": {"preset": "small"}}

    return [lever("fp32", "none", 100, 10), lever("bf16", "none", bf16_tps, 10), lever("bf16", "full", 0.8 * bf16_tps, 1)]


def test_goals_say_met_missed_or_not_judged_where_bf16_is_fast():
    by_goal = {v.goal: v for v in goals.verdicts("levers", _lever_rows(FAST_BF16), SLOW_BF16)}  # the rows' peaks win
    assert by_goal["bf16 autocast >= 2x fp32 tokens/s"].status == goals.MET
    assert "+25% vs the goal" in by_goal["bf16 autocast >= 2x fp32 tokens/s"].measured
    assert by_goal["`full` checkpointing keeps >= 70% fewer activation bytes"].status == goals.MET
    assert by_goal["`full` checkpointing costs < 30% extra step time"].status == goals.MET  # +25%
    assert by_goal["`selective` checkpointing costs < 10% extra step time"].status == goals.NOT_JUDGED  # no row
    assert by_goal[MFU_GOAL].status == goals.MISSED
    assert by_goal[MFU_GOAL].line().startswith("- **missed**: MFU")
    assert goals.verdicts("strategies", [{"case": "fsdp2 reshard", "step_s": 2.0, "peak_bytes": 1, "precision": "bf16"},
                                         {"case": "zero3", "step_s": 1.0, "peak_bytes": 1, "precision": "bf16"}],
                          FAST_BF16)[0].status == goals.MISSED


def test_bf16_speed_goals_are_not_applicable_where_bf16_is_slow():
    # An AVX2-only CPU: bf16 1% of fp32, so bf16 "tokens/s" is far below fp32's; neither a miss nor a pass.
    by_goal = {v.goal: v for v in goals.verdicts("levers", _lever_rows(SLOW_BF16, bf16_tps=2), FAST_BF16)}
    speedup = by_goal["bf16 autocast >= 2x fp32 tokens/s"]
    assert speedup.status == goals.NOT_APPLICABLE
    assert speedup.line() == ("- not applicable here: bf16 autocast >= 2x fp32 tokens/s (no fast bf16: bf16 matmul "
                              "0.9 GFLOP/s vs fp32 126.0 here, 0.01x; bf16 pays from 1.5x; measured: 0.02x, -99% vs the goal)")
    assert by_goal["`full` checkpointing costs < 30% extra step time"].status == goals.NOT_APPLICABLE
    assert by_goal[MFU_GOAL].status == goals.NOT_APPLICABLE
    # Bytes do not depend on how fast bf16 is: still judged.
    assert by_goal["`full` checkpointing keeps >= 70% fewer activation bytes"].status == goals.MET


def test_speed_goals_measured_in_fp32_are_judged_where_bf16_is_slow():
    """A levers run that trained in the machine's own precision (fp32 there) and left bf16 out."""
    rows = [dict(r, precision="fp32", matmul_peak_flops=SLOW_BF16.fp32) for r in _lever_rows(SLOW_BF16)[::2]]
    ckpt_time = next(g for g in goals.GOALS["levers"] if g.text == "`full` checkpointing costs < 30% extra step time")
    assert SLOW_BF16.applies(ckpt_time, rows) and not SLOW_BF16.applies(ckpt_time, _lever_rows(SLOW_BF16))
    by_goal = {v.goal: v for v in goals.verdicts("levers", rows, SLOW_BF16)}
    speedup = by_goal["bf16 autocast >= 2x fp32 tokens/s"]  # no bf16 row, and bf16 is slow here
    assert speedup.status == goals.NOT_APPLICABLE and speedup.measured == "no rows for it in this run"


def test_sections_without_their_own_peaks_are_judged_on_the_machines():
    def case(name, step_s, precision):
        return {"case": name, "step_s": step_s, "peak_bytes": 1, "precision": precision}

    bf16_rows = [case("yafsdp async", 1.0, "bf16"), case("fsdp2 reshard", 2.0, "bf16")]
    slow = {v.goal: v.status for v in goals.verdicts("strategies", bf16_rows, SLOW_BF16)}
    assert slow["yafsdp >= 1.1x fsdp2's tokens/s"] == goals.NOT_APPLICABLE
    assert slow["... at no more peak memory"] == goals.MET
    assert {v.goal: v.status for v in goals.verdicts("strategies", bf16_rows, FAST_BF16)}["yafsdp >= 1.1x fsdp2's tokens/s"] == goals.MET
    # Rows that ran in fp32 (the precision a slow-bf16 machine trains in) are judged there too.
    fp32_rows = [dict(r, precision="fp32") for r in bf16_rows]
    assert {v.goal: v.status for v in goals.verdicts("strategies", fp32_rows, SLOW_BF16)}["yafsdp >= 1.1x fsdp2's tokens/s"] == goals.MET
    # Incumbent rows say their precision in their work, or ran bf16 only.
    incumbents = [{"case": "shoestring compiled", "step_s": 1.0, "peak_bytes": 1},
                  {"case": "hf-trainer eager", "step_s": 1.5, "peak_bytes": 2},
                  {"case": "hf-trainer compiled", "step_s": 1.6, "peak_bytes": 2}]
    speedup = goals.GOALS["incumbents"][0].text
    assert {v.goal: v.status for v in goals.verdicts("incumbents", incumbents, SLOW_BF16)}[speedup] == goals.NOT_APPLICABLE
    in_fp32 = [dict(r, work={"precision": "fp32"}) for r in incumbents]
    assert {v.goal: v.status for v in goals.verdicts("incumbents", in_fp32, SLOW_BF16)}[speedup] == goals.MET


def test_the_threshold_is_the_precision_rules():
    assert goals.MatmulPeaks(fp32=1e11, bf16=1.5e11).bf16_fast and not goals.MatmulPeaks(fp32=1e11, bf16=1.49e11).bf16_fast


def test_fill_replaces_only_its_own_block_and_appends_new_ones():
    doc = "a\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nb\n"
    doc = report.fill(doc, "x", "X", "new")
    assert doc == "a\n<!-- bench:x -->\nnew\n<!-- /bench:x -->\nb\n"
    assert report.fill(doc, "y", "Why", "fresh").endswith("## Why\n\n<!-- bench:y -->\nfresh\n<!-- /bench:y -->\n")


def test_the_stamp_takes_the_commit_before_the_run_writes_into_the_tree(tmp_path, monkeypatch):
    """Charts go into the tracked docs/img before the stamp is written: read then, the commit
    would always say -dirty. It is read once, when the run starts."""
    states = iter(["abc1234", "abc1234-dirty"])
    monkeypatch.setattr(report, "git_commit", lambda: next(states))
    monkeypatch.setattr(goals.MatmulPeaks, "probed", classmethod(lambda cls: FAST_BF16))
    section = types.ModuleType("fake_section")
    section.run = lambda size: [{"x": 1}]
    section.table = lambda rows: "| x |"
    monkeypatch.setitem(sys.modules, "fake_section", section)
    monkeypatch.setitem(suite.SECTIONS, "fake", ("fake_section", "Fake"))
    suite.run_suite("smoke", ["fake"], tmp_path, "shoestring bench --only fake", Console(quiet=True))
    doc = (tmp_path / "benchmarks.md").read_text()
    assert "shoestring abc1234," in doc and "dirty" not in doc
    raw = json.loads((tmp_path / "benchmarks.json").read_text())["fake"]
    assert raw["matmul_peaks"] == {"fp32": FAST_BF16.fp32, "bf16": FAST_BF16.bf16} and "torch CPU kernels" in raw["machine"]


def test_the_machine_line_names_the_instruction_sets_and_torchs_kernels():
    flags = "fpu sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni"
    assert probe.cpu_isa(flags) == ["AVX2", "AVX-512F", "AVX-512-BF16"]
    assert probe.cpu_isa("fpu sse2 avx avx2 amx_bf16 amx_tile avx512f") == ["AVX2", "AVX-512F", "AMX-BF16", "AMX-TILE"]
    assert probe.cpu_isa("") == []
    assert f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}" in report.machine()


def test_torchs_cpu_capability_follows_aten_cpu_capability():
    """The stamp shows the kernels torch uses, which the environment can lower below the CPU's."""
    code = "from shoestring.bench.report import cpu_kernels; print(cpu_kernels())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "torch CPU kernels DEFAULT, oneDNN capped at AVX2" in out


# ---- the measuring harness every section uses ----------------------------------------------

def _rank_job(spec: dict) -> dict:
    """A job for the harness test: what each rank saw."""
    from shoestring import dist

    return {"rank": dist.rank(), "world": dist.world_size(), "threads": torch.get_num_threads(), "echo": spec["x"]}


def test_the_harness_starts_one_or_n_ranks_and_gathers_them():
    from shoestring.bench import harness

    one = harness.launch(harness.Job("tests.test_bench:_rank_job", {"x": 7}))
    assert one == [{"rank": 0, "world": 1, "threads": harness.threads(1), "echo": 7}]
    two = harness.launch(harness.Job("tests.test_bench:_rank_job", {"x": 8}, ranks=2))
    assert [(r["rank"], r["world"], r["echo"]) for r in two] == [(0, 2, 8), (1, 2, 8)]
    assert all(r["threads"] == harness.threads(2) for r in two)


def test_the_harness_warms_up_then_times_and_keeps_the_median_round():
    from shoestring.bench import harness

    calls = []
    timing = harness.timed_steps(lambda i: calls.append(i) or float(i), steps=3)
    assert calls == list(range(harness.WARMUP + 3)) and len(timing["steps_s"]) == 3
    assert timing["losses"] == [float(i) for i in calls]
    assert harness.steady([float(i) for i in range(harness.WARMUP + 2)]) == [float(harness.WARMUP), harness.WARMUP + 1.0]
    row = harness.median_round([{"step_s": 3.0}, {"step_s": 1.0}, {"error": "boom"}, {"step_s": 2.0}])
    assert row["step_s"] == 2.0 and row["step_s_all"] == [1.0, 2.0, 3.0]
    assert harness.spread([1.0, 2.0, 3.0]) == 1.0


def test_a_failed_job_is_a_row_with_its_error_when_asked():
    from shoestring.bench import harness

    bad = {"bad": harness.Job("tests.test_bench:no_such_job", {})}
    out = harness.interleaved(bad, rounds=1, keep_going=True)
    assert "error" in out["bad"][0][0]


def _turn_job(spec: dict) -> dict:
    """A job for the turn-taking test: each round's wall-clock start and end; `die_at`: the step
    at which the process dies."""
    import time

    from shoestring.bench import harness

    spans = []

    def step(i: int) -> None:
        if i == spec.get("die_at"):
            os._exit(3)
        t0 = time.time()
        time.sleep(0.02)
        spans.append((t0, time.time()))

    timing = harness.timed_steps(step, steps=2)
    timed = spans[harness.WARMUP:]
    return {**timing, "rounds": [{**r, "start": timed[2 * k][0], "end": timed[2 * k + 1][1]}
                                 for k, r in enumerate(timing["rounds"])]}


@pytest.mark.parametrize("timed_extras", [True, False])  # the jobs finish in turns, or together
def test_rounds_are_taken_in_turns_without_overlap(timed_extras):
    from shoestring.bench import harness

    jobs = {name: harness.Job("tests.test_bench:_turn_job", {}) for name in ("a", "b")}
    out = harness.interleaved(jobs, rounds=3, timed_extras=timed_extras)
    spans = sorted((rank[0]["start"], rank[0]["end"], name, r) for name, rs in out.items() for r, rank in enumerate(rs))
    assert [(name, r) for _, _, name, r in spans] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert all(end <= next_start for (_, end, *_), (next_start, *_) in zip(spans, spans[1:]))
    assert all(len(rank[0]["steps_s"]) == 2 and rank[0]["peak_rss_bytes"] > 0 for rs in out.values() for rank in rs)


def test_a_worker_that_dies_is_named_not_waited_for():
    import pytest

    from shoestring.bench import harness

    dying = {"ok": harness.Job("tests.test_bench:_turn_job", {}),
             "dies": harness.Job("tests.test_bench:_turn_job", {"die_at": harness.WARMUP + 2})}  # in its second round
    with pytest.raises(RuntimeError, match="'dies'.*ended \\(exit code 3\\) before done.1"):
        harness.interleaved(dying, rounds=2)
    out = harness.interleaved(dying, rounds=2, keep_going=True)
    assert "error" in out["dies"][0][0] and "error" not in out["ok"][1][0]
    never = {"plain": harness.Job("tests.test_bench:_rank_job", {"x": 1})}  # returns without taking turns
    with pytest.raises(RuntimeError, match="ended \\(exit code 0\\) before ready"):
        harness.interleaved(never, rounds=2)
