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
    assert a.shape == (work.steps, work.batch, work.seq_len + 1) and bool((a == b).all())
    # Each token has at most 4 distinct successors.
    pairs = {(int(p), int(n)) for s in a.flatten(0, 1) for p, n in zip(s[:-1], s[1:])}
    successors: dict[int, set[int]] = {}
    for p, n in pairs:
        successors.setdefault(p, set()).add(n)
    assert max(len(v) for v in successors.values()) <= 4


def _agree(rows: list[dict]) -> None:
    first = rows[0]["losses"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert len(r["losses"]) == len(first)
        assert max(abs(x - y) for x, y in zip(r["losses"], first)) < 0.02, (r["system"], r["losses"], first)


@pytest.mark.slow
def test_smoke_single_device():
    rows = incumbents.run("smoke", parts=("single",))
    assert [(r["system"], r["checkpointing"]) for r in rows] == list(incumbents.SINGLE)
    _agree(rows)
    text = incumbents.table(rows)
    assert "shoestring / HF Trainer" in text and "| hf-trainer | 1 | full |" in text
    from shoestring.bench.goals import MET, MISSED, MatmulPeaks, verdicts  # judged by `case`

    fast_bf16 = MatmulPeaks(fp32=1e11, bf16=4e11)
    assert [v.status in (MET, MISSED) for v in verdicts("incumbents", rows, fast_bf16)][:4] == [True] * 4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_smoke_two_ranks():
    rows = incumbents.run("smoke", parts=("distributed",))
    assert [r["system"] for r in rows] == list(incumbents.DISTRIBUTED)
    _agree(rows)
    assert "shoestring fsdp2 / deepspeed-zero3-hf" in incumbents.table(rows)
