"""Exact memory accounting: saved-activation counter, model state bytes, process peak RSS."""

from __future__ import annotations

import concurrent.futures
import multiprocessing

import numpy as np
import pytest
import torch
from torch import nn

from shoestring.measure import memory
from shoestring.measure.memory import PeakRSS, RunPeak, SavedActivationCounter, device_memory, model_state_bytes
from shoestring.models import ModelArgs, build_model

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128, max_seq_len=64)


# -- SavedActivationCounter ------------------------------------------------------------------

def test_counter_counts_saved_activations_not_weights():
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    with SavedActivationCounter() as c:
        y = torch.tanh(lin(x))  # linear saves x (and the weight); tanh saves its output
    assert c.bytes == x.nbytes + y.nbytes
    assert c.weight_bytes == lin.weight.nbytes
    assert c.tensors == 2
    y.sum().backward()  # counting never changes autograd
    assert x.grad is not None and lin.weight.grad is not None


def test_counter_dedupes_storages_and_counts_whole_storage():
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivationCounter() as c:
        a = x * 2  # multiplying by a Python scalar saves nothing
        b = a[:2] * a[:2]  # saves a view of `a` twice: its whole storage, counted once
        s = a.sin()  # saves `a` again
    assert c.bytes == a.nbytes
    assert c.tensors == 1
    (b.sum() + s.sum()).backward()


def test_counter_ignores_autocast_weight_casts():
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32, requires_grad=True)
    with SavedActivationCounter() as c, torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).float().sum()
    assert c.bytes == 8 * 32 * 2  # the bf16 cast of x
    assert c.weight_bytes == 16 * 32 * 2  # the bf16 copy of the weight


def test_counter_with_model_skips_buffers_and_first_input():
    torch.manual_seed(0)
    m = build_model(ARGS)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16))
    with SavedActivationCounter(m) as c:
        h = m(tokens)
    assert c.weight_bytes > 0 and c.bytes > 0
    with SavedActivationCounter() as c2:  # without the model: buffers found as history-less views
        m(tokens)
    assert c2.bytes == c.bytes
    assert h.requires_grad


def test_nested_counters_and_note_retained():
    x = torch.randn(16, requires_grad=True)
    kept = torch.randn(100)
    with SavedActivationCounter() as outer:
        y = x.sin()
        with SavedActivationCounter() as inner:
            z = y.exp()  # saves its output
            memory.note_retained(kept)
            memory.note_retained(kept)  # counted once
            memory.note_retained("not a tensor")
        w = z.cos()  # saves z again: already counted by outer
    assert inner.bytes == z.nbytes + kept.nbytes
    assert inner.retained_bytes == kept.nbytes
    assert outer.bytes == x.nbytes + z.nbytes + kept.nbytes
    assert not memory.counting()
    w.sum().backward()


# -- model_state_bytes -----------------------------------------------------------------------

def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_model_state_bytes_exact_after_adamw_step():
    torch.manual_seed(0)
    m = build_model(ARGS)
    before = model_state_bytes(m)
    n_params = sum(p.numel() for p in m.parameters())
    assert before == {"params": 4 * n_params, "grads": 0, "optimizer": 0}

    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16))
    m.logits(m(tokens)).float().square().mean().backward()
    opt.step()
    got = model_state_bytes(m, opt)
    n_tensors = len(list(m.parameters()))
    assert got["params"] == 4 * n_params
    assert got["grads"] == 4 * n_params
    # exp_avg + exp_avg_sq (fp32, like the params) + one fp32 scalar `step` tensor per param
    step_bytes = sum(_nbytes(s["step"]) for s in opt.state.values())
    assert step_bytes == 4 * n_tensors
    assert got["optimizer"] == 2 * 4 * n_params + step_bytes


def test_model_state_bytes_counts_tied_weights_once():
    args = ModelArgs(**{**ARGS.__dict__, "tie_embeddings": True})
    m = build_model(args)
    assert m.lm_head.weight is m.embed_tokens.weight
    n_unique = sum(p.numel() for p in m.parameters())  # parameters() de-duplicates
    assert model_state_bytes(m)["params"] == 4 * n_unique

    # Shared storage that is not the same Parameter object (views of one flat buffer).
    flat = torch.zeros(100)
    mod = nn.Module()
    mod.a = nn.Parameter(flat[:60])
    mod.b = nn.Parameter(flat[60:])
    assert model_state_bytes(mod)["params"] == flat.nbytes


# -- PeakRSS / device_memory ------------------------------------------------------------------

def _peak_rss_checks() -> str | None:
    """Runs in a fresh process: the test process's own RSS moves with whatever earlier tests
    left running (threads, allocator arenas), which is not what this test is about."""
    rss = PeakRSS()
    if not rss.reset():
        return f"cannot reset the high-water mark here: {rss.reset_error}"
    base_peak = rss.peak_bytes()
    assert base_peak >= rss.current_bytes() * 0.9 > 0
    size = 256 * 2**20
    buf = np.ones(size, dtype=np.uint8)  # touch every page
    assert rss.peak_bytes() >= base_peak + 0.9 * size
    del buf
    assert rss.reset() is True
    # after the reset the peak is back near the current RSS (the buffer is gone)
    assert rss.peak_bytes() < rss.current_bytes() + 0.5 * size
    assert rss.peak_bytes() < base_peak + 0.5 * size
    return None


def _run_peak_checks() -> str | None:
    """Fresh process, as above: a buffer that lives only inside an excluded window (the profiled
    step) is not the run's peak, one allocated outside it is."""
    if not PeakRSS().reset():
        return "cannot reset the high-water mark here"
    size = 256 * 2**20
    peak = RunPeak(torch.device("cpu"))
    with peak.excluding(True):
        buf = np.ones(size, dtype=np.uint8)
        del buf
    assert peak.bytes() < PeakRSS().current_bytes() + 0.5 * size
    buf = np.ones(size, dtype=np.uint8)
    assert peak.bytes() >= PeakRSS().current_bytes() >= size
    return None


@pytest.mark.parametrize("checks", [_peak_rss_checks, _run_peak_checks])
def test_peak_rss_sees_a_big_buffer_and_resets(checks):
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        skipped = pool.submit(checks).result(timeout=120)
    if skipped:
        pytest.skip(skipped)


def test_peak_rss_reset_failure_is_graceful(monkeypatch):
    def deny(*a, **k):
        raise PermissionError("denied")

    monkeypatch.setattr(memory.os, "open", deny)
    rss = PeakRSS()
    assert rss.reset() is False
    assert rss.reset_ok is False and "denied" in rss.reset_error
    assert rss.peak_bytes() > 0


def test_device_memory_cpu():
    out = device_memory("cpu")
    assert set(out) == {"peak_rss", "rss", "peak"}
    assert out["peak"] == out["peak_rss"] >= out["rss"] * 0.9 > 0
