"""The comparison with Hugging Face Trainer / plain FSDP2 / DeepSpeed at its smoke size: it runs,
and every system follows the same loss curve from the same weights and tokens."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("transformers")

from shoestring.bench import incumbents  # noqa: E402


def test_token_stream_is_deterministic_and_learnable():
    work = incumbents.SIZES["smoke"][0]
    a, b = incumbents.token_batches(work), incumbents.token_batches(work)
    assert a.shape == (work.total_steps, work.batch, work.seq_len + 1) and bool((a == b).all())
    # Each token has at most 4 distinct successors.
    pairs = {(int(p), int(n)) for s in a.flatten(0, 1) for p, n in zip(s[:-1], s[1:])}
    successors: dict[int, set[int]] = {}
    for p, n in pairs:
        successors.setdefault(p, set()).add(n)
    assert max(len(v) for v in successors.values()) <= 4


def _agree(rows: list[dict]) -> None:
    rows = [r for r in rows if "error" not in r]
    first = rows[0]["losses"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert len(r["losses"]) == len(first)
        assert max(abs(x - y) for x, y in zip(r["losses"], first)) < 0.02, (r["system"], r["losses"], first)


@pytest.mark.slow
def test_smoke_single_device():
    # every eager system, and HF Trainer's torch_compile (ours compiled is tested with the compile lever)
    cases = [s.case for s in incumbents.SINGLE if not s.compiled] + ["hf-trainer compiled"]
    rows = incumbents.run("smoke", parts=("single",), only=tuple(cases))
    assert sorted(r["case"] for r in rows) == sorted(cases) and not [r for r in rows if "error" in r]
    _agree(rows)
    text = incumbents.table(rows)
    assert "best against best: shoestring" in text and "| hf-trainer | 1 | full | eager |" in text
    from shoestring.bench.goals import MET, MISSED, MatmulPeaks, verdicts  # judged by `case`

    fast_bf16 = MatmulPeaks(fp32=1e11, bf16=4e11)
    assert [v.status in (MET, MISSED) for v in verdicts("incumbents", rows, fast_bf16)][:4] == [True] * 4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_smoke_two_ranks():
    cases = tuple(s.case for s in incumbents.DISTRIBUTED if not s.compiled)
    rows = incumbents.run("smoke", parts=("distributed",), only=cases)
    assert [r["case"] for r in rows] == list(cases)
    _agree(rows)
    assert "shoestring fsdp2 (eager) / deepspeed-zero3-hf" in incumbents.table(rows)
