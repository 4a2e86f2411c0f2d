"""The benchmark machinery measures what it says (smoke scale: figures are not asserted)."""

from shoestring.bench import levers
from shoestring.bench.runner import side_by_side
from shoestring.bench.step import StepSpec, measure

MICRO = StepSpec(preset="micro", vocab_size=512, batch=2, seq_len=32, warmup=1, steps=1)


def test_measure_counts_memory_and_time():
    r = measure(MICRO)
    assert r["step_s"] > 0 and r["tokens_per_s"] > 0
    assert r["saved_activation_bytes"] >= r["estimated_block_activation_bytes"] > 0
    assert r["state_bytes"]["optimizer"] >= 2 * r["state_bytes"]["params"]


def test_levers_report_runs_every_configuration_in_fresh_processes(monkeypatch):
    monkeypatch.setattr(levers, "PRECISIONS", ("fp32", "bf16"))
    monkeypatch.setattr(levers, "CHECKPOINTING", ("none", "full", "selective"))
    results = levers.run(MICRO, rounds=1)
    assert set(results) == {"precision fp32", "precision bf16", "checkpointing none",
                            "checkpointing full", "checkpointing selective"}
    text = levers.report(MICRO, results)
    assert "| full |" in text and "bf16 >= 2x fp32" in text


def test_side_by_side_takes_the_median_round():
    out = side_by_side({"a": MICRO}, rounds=3)
    assert len(out["a"]["step_s_all"]) == 3
    assert out["a"]["step_s"] == sorted(out["a"]["step_s_all"])[1]
