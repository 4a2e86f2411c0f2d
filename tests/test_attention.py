"""CPU attention with a dense blocked backward: the same gradients as SDPA, eagerly and compiled,
and in the compiled model with each checkpointing mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from shoestring.levers.checkpointing import apply_checkpointing
from shoestring.levers.compile import compile_blocks
from shoestring.models import ModelArgs, attention, build_model

FLASH_FWD = "aten::_scaled_dot_product_flash_attention_for_cpu"
FLASH_BWD = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"


def _qkv(b, h, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # q laid out as the model makes it: (batch, seq, heads, dim) memory, transposed
    q = torch.randn(b, s, h, d, generator=g).transpose(1, 2)
    k, v = (torch.randn(b, hkv, s, d, generator=g) for _ in range(2))
    do = torch.randn(b, h, s, d, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], do.to(dtype)


def _grads(fn, qkv, do):
    out = fn(*qkv)
    return (out, *torch.autograd.grad(out, qkv, do))


def _blocked(q, k, v):
    return attention.BlockedCausalAttention.apply(q, k, v, q.shape[-1] ** -0.5, 0, 0.0)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


# (batch, heads, kv_heads, seq, head_dim, queries per block): GQA and not, blocks that do not divide seq
SHAPES = [(2, 4, 2, 37, 16, 5), (2, 4, 4, 64, 16, 7), (3, 6, 2, 100, 32, 128), (1, 8, 1, 33, 8, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_same_gradients_as_sdpa_fp32(shape, monkeypatch):
    *dims, block = shape
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    qkv, do = _qkv(*dims, torch.float32)
    ours = _grads(_blocked, qkv, do)
    ref = _grads(_sdpa, qkv, do)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_bf16_error_is_sdpas(shape, monkeypatch):
    """In bf16, as far from the fp64 result as SDPA's own bf16 kernel is (give or take 2x)."""
    *dims, block = shape
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    qkv, do = _qkv(*dims, torch.bfloat16)
    exact = _grads(_sdpa, [t.detach().double().requires_grad_() for t in qkv], do.double())
    ours = _grads(_blocked, qkv, do)
    ref = _grads(_sdpa, qkv, do)
    for a, r, e in zip(ours, ref, exact):
        err, ref_err = ((x.double() - e).norm() / e.norm() for x in (a, r))
        assert err < max(2 * ref_err, 2e-3), (err, ref_err)


def _reference(q, k, v, scale, window, softcap):
    """Attention written out: scores, cap, causal (and window) mask, softmax, values."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)).float() * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    dist = torch.arange(q.shape[2])[:, None] - torch.arange(q.shape[2])
    s = s.masked_fill((dist < 0) | ((dist >= window) if window else False), float("-inf"))
    return (torch.softmax(s, -1).to(q.dtype) @ v)


# (scale, window, softcap): Gemma's query scale, a window shorter than the row, a cap that bites, all
VARIANTS = [(0.3, 0, None), (None, 5, None), (None, 0, 1.5), (0.2, 9, 2.0)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "scale{}-window{}-cap{}".format(*v))
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_windows_softcap_and_scale_equal_the_written_out_attention(shape, variant, monkeypatch):
    """Eagerly (the path windows and caps always take) and with small query blocks, so that a
    block's keys start inside the row."""
    *dims, block = shape
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    scale, window, softcap = variant
    qkv, do = _qkv(*dims, torch.float32)
    full_scale = scale or dims[-1] ** -0.5
    ours = _grads(lambda q, k, v: attention.causal_attention(q, k, v, scale, window, softcap), qkv, do)
    ref = _grads(lambda q, k, v: _reference(q, k, v, full_scale, window, softcap), qkv, do)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    plain = _grads(_sdpa, qkv, do)[0]
    assert (ours[0] - plain).abs().max() > 1e-3  # the variant changed the result: the test proves something


@pytest.mark.parametrize("variant", [(None, 6, None), (None, 6, 1.5)], ids=["window", "window-softcap"])
def test_compiled_window_and_softcap_without_graph_breaks(variant):
    """The two new paths under torch.compile: the flash kernel with a window mask, the blocked
    forward with a soft-cap (one custom op each way); gradients as eager."""
    torch._dynamo.reset()
    scale, window, softcap = variant
    qkv, do = _qkv(2, 4, 2, 40, 16, torch.float32)
    fn = lambda q, k, v: attention.causal_attention(q, k, v, scale, window, softcap)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    with profile() as prof:
        ours = _grads(compiled, qkv, do)
    names = {e.key for e in prof.key_averages()}
    assert FLASH_BWD not in names and (FLASH_FWD in names) == (softcap is None)
    for a, r in zip(ours, _grads(fn, qkv, do)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_query_block_bounds_the_transient():
    assert attention.query_block(16, 8, 256) == 128
    assert attention.query_block(2, 4, 64) == 64  # never more than seq
    b, h, s = 16, 32, 2048
    assert b * h * attention.query_block(b, h, s) * s <= max(attention.BLOCK_ELEMENTS, b * h * 16 * s)


def test_eager_calls_keep_sdpa():
    """Outside torch.compile the dense backward does not pay (unfused element-wise passes)."""
    qkv, do = _qkv(2, 4, 2, 16, 8, torch.float32)
    out = attention.causal_attention(*qkv)
    assert "BlockedCausalAttention" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, _sdpa(*qkv), rtol=0, atol=0)


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    qkv, do = _qkv(2, 4, 2, 40, 16, torch.float32)
    compiled = torch.compile(attention.causal_attention, fullgraph=True)
    with profile() as prof:
        ours = _grads(compiled, qkv, do)
    names = {e.key for e in prof.key_averages()}
    assert FLASH_FWD in names and FLASH_BWD not in names
    for a, r in zip(ours, _grads(_sdpa, qkv, do)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=128, max_seq_len=48)


@pytest.mark.slow
def test_compiled_model_in_every_checkpointing_mode():
    """Compiled blocks use the dense backward in each mode, with eager SDPA's gradients; selective
    checkpointing keeps the attention output (flash runs once per block), full recomputes it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = build_model(ARGS)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, ARGS.vocab_size, (2, 48), generator=g) for _ in range(2))

    def loss(m):
        return F.cross_entropy(m.logits(m(x)).flatten(0, 1), y.flatten())

    loss(base).backward()
    for mode, flash_calls in (("none", 1), ("selective", 1), ("full", 2)):
        m = copy.deepcopy(base)
        m.zero_grad(set_to_none=True)
        apply_checkpointing(m, mode)
        assert compile_blocks(m)
        loss(m).backward()  # compiles
        m.zero_grad(set_to_none=True)
        with profile() as prof:
            loss(m).backward()
        counts = {e.key: e.count for e in prof.key_averages()}
        assert FLASH_BWD not in counts, mode
        assert counts[FLASH_FWD] == flash_calls * ARGS.n_layers, mode
        for p, q in zip(base.parameters(), m.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5)
