"""Causal attention, with the variants the supported families need: a softmax scale other than
1/sqrt(head_dim) (Gemma's `query_pre_attn_scalar`), a sliding window (Mistral, Phi-3, Gemma's
local layers) and tanh soft-capping of the scores (Gemma 2); and a document mask for packed rows
(several instruction examples in one row, `shoestring.data.instruct`): per row, a document id
for each position, and a query sees only the keys of its own document.

Plain causal attention is `F.scaled_dot_product_attention`, except on CPU inside
`torch.compile`. There PyTorch's flash-attention backward
(`_scaled_dot_product_flash_attention_for_cpu_backward`) runs the attention FLOPs at a small
fraction of the matmul rate: on the small preset in bf16 it was a quarter of a compiled training
step (docs/performance.md). Its forward is fast. So `BlockedCausalAttention` keeps the flash
forward (which saves only q, k, v, the output and the logsumexp, no `seq x seq` tensor) and
replaces the backward by the textbook one written with dense matmuls, recomputing the
probabilities from the saved logsumexp:

    S = Q K^T * scale (capped: c tanh(S / c))    P = exp(S - lse)  (causal, windowed)
    dV = P^T dO    dP = dO V^T    dS = P * (dP - rowsum(dO * O)) (capped: * (1 - tanh^2))
    dQ = dS K * scale    dK = dS^T Q * scale

It runs over blocks of queries so that the transient is `batch x heads x block x keys`, never
`seq x seq` for all queries at once; a block of queries needs only the keys from its first
query's window start to its end, which skips the masked part (most of it with a short window).
Under `torch.compile` of the blocks the element-wise work between those matmuls fuses into a
few kernels. Grouped-query attention is native: the query heads of a group are stacked along the
rows, so one matmul per group serves them all and dK, dV sum over the group for free.

Sliding windows, soft-capping and document masks always take `BlockedCausalAttention` (eager
or compiled, any device): SDPA has no soft-capping, and a window or documents as an SDPA mask
would be saved for backward (a `seq x seq` tensor per layer, per row for documents: the
backward rebuilds each block's mask from the document ids, `batch x seq` integers). Its forward
is `attention_forward`, one custom op: the CPU flash kernel with the window and documents as an
additive mask, or, with soft-capping or off the CPU, the same
blocked computation as the backward's in plain PyTorch. Being one opaque op, its mask and
scores are never saved (a compiled graph would keep the mask; selective checkpointing, which
keeps this op's outputs like the flash kernel's, would otherwise cache every block's scores).
Either way it saves q, k, v, out and lse. Eagerly, plain attention stays SDPA (the dense backward's element-wise
steps would be separate passes costing more than the flash backward saves), and so does
everything on the meta device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# Queries per block: with n blocks the causal backward computes (n + 1) / 2n of the `seq x seq`
# scores (the rest is masked); 128 keeps the matmuls large. Fewer for big batch x heads x seq,
# so that one `batch x heads x block x seq` transient stays within BLOCK_ELEMENTS (fp32: 16 MiB).
QUERY_BLOCK = 128
BLOCK_ELEMENTS = 1 << 22


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     window: int = 0, softcap: float | None = None, doc: torch.Tensor | None = None) -> torch.Tensor:
    """q (batch, heads, seq, head_dim); k, v (batch, kv_heads, seq, head_dim), kv_heads dividing
    heads -> (batch, heads, seq, head_dim). Causal, no dropout. `scale` defaults to
    1/sqrt(head_dim); `window` > 0 lets a query see itself and the `window - 1` keys before it;
    `softcap` caps the scaled scores at +-softcap with tanh; `doc` (batch, seq) integers lets a
    query see only the keys with its own id (a document of a packed row)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    window = window if 0 < window < q.shape[2] else 0  # a window as long as the row is no window
    blocked = window or softcap or doc is not None or (q.device.type == "cpu" and torch.compiler.is_compiling())
    if q.device.type != "meta" and blocked:
        return BlockedCausalAttention.apply(q, k, v, scale, window, softcap or 0.0, doc)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def query_block(batch: int, heads: int, seq: int) -> int:
    """Queries per block of the blocked forward and backward."""
    return min(seq, QUERY_BLOCK, max(16, BLOCK_ELEMENTS // (batch * heads * seq)))


def _keys(i0: int, i1: int, window: int) -> int:
    """First key any query in [i0, i1) may see."""
    return max(0, i0 - window + 1) if window else 0


def _visible(i0: int, i1: int, j0: int, window: int, device, doc: torch.Tensor | None = None) -> torch.Tensor:
    """(queries i0..i1) x (keys j0..i1): causal, and within the window when there is one; with
    documents, within the query's document: then (batch, 1, 1, queries, keys), the layout of the
    grouped scores (batch, kv_heads, group, queries, keys)."""
    dist = torch.arange(i0, i1, device=device)[:, None] - torch.arange(j0, i1, device=device)
    visible = (dist >= 0) & (dist < window) if window else dist >= 0
    if doc is None:
        return visible
    same = doc[:, i0:i1, None] == doc[:, None, j0:i1]
    return (visible & same)[:, None, None]


def _scores(qc: torch.Tensor, kc: torch.Tensor, scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scaled (and capped) scores of a query block, and tanh of the cap when capped."""
    s = torch.matmul(qc, kc.transpose(-1, -2)).float() * scale
    if not softcap:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, t


@torch.library.custom_op("shoestring::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int,
                      softcap: float, doc: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of windowed, soft-capped or document-masked causal attention: the CPU flash
    kernel with the window and documents as an additive mask when not capped, else
    `_blocked_forward`. One opaque op, so that neither the `seq x seq` mask nor a block's scores
    is ever saved for backward (the compiled graph would keep the mask; selective checkpointing
    would cache every block's scores)."""
    if q.device.type == "cpu" and not softcap:
        out, lse = _flash_forward(q, k, v, scale, window, doc)
        return out, lse.contiguous()  # the kernel's lse is laid out (batch, seq, heads): one layout for the fake
    return _blocked_forward(q, k, v, scale, window, softcap, doc)


def _blocked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int,
                     softcap: float, doc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse), one block of queries at a time (any device). `out` is laid out (batch, seq,
    heads, head_dim) in memory, like the flash kernel's, so that the model's transpose back to
    (batch, seq, heads x head_dim) is a view, not a copy."""
    b, h, s, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    qg = q.reshape(b, hkv, g, s, d)
    out, lse = _outputs(q)
    out_g, lse_g = out.view(b, hkv, g, s, d), lse.view(b, hkv, g, s)
    step = query_block(b, h, s)
    for i0 in range(0, s, step):
        i1 = min(s, i0 + step)
        c, j0 = i1 - i0, _keys(i0, i1, window)
        qc = qg[:, :, :, i0:i1].reshape(b, hkv, g * c, d)
        scores, _ = _scores(qc, k[:, :, j0:i1], scale, softcap)
        scores = scores.view(b, hkv, g, c, i1 - j0).masked_fill(~_visible(i0, i1, j0, window, q.device, doc), float("-inf"))
        m = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - m[..., None]).to(q.dtype).view(b, hkv, g * c, i1 - j0)
        out_g[:, :, :, i0:i1] = torch.matmul(p, v[:, :, j0:i1]).view(b, hkv, g, c, d)
        lse_g[:, :, :, i0:i1] = m
    return out, lse


def _outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, s, d = q.shape
    out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    return out, torch.empty(b, h, s, dtype=torch.float32, device=q.device)


@attention_forward.register_fake
def _(q, k, v, scale, window, softcap, doc):
    return _outputs(q)


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int,
                   doc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not window and doc is None:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    s = q.shape[2]
    visible = _visible(0, s, 0, window, q.device, doc)
    visible = visible if doc is None else visible[:, 0]  # (batch, 1, seq, seq): one mask for all heads
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, float("-inf"))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


class BlockedCausalAttention(torch.autograd.Function):
    """Flash (or blocked) forward, dense blocked backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int,
                softcap: float, doc: torch.Tensor | None = None) -> torch.Tensor:
        if q.device.type == "cpu" and not (window or softcap) and doc is None:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        else:
            out, lse = attention_forward(q, k, v, scale, window, softcap, doc)
        ctx.save_for_backward(q, k, v, out, lse, doc)
        ctx.scale, ctx.window, ctx.softcap = scale, window, softcap
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor):
        q, k, v, out, lse, doc = ctx.saved_tensors
        scale, window, softcap = ctx.scale, ctx.window, ctx.softcap
        b, h, s, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        d_out = d_out.to(q.dtype)
        # Rows of a group: (batch, kv_heads, group, seq, ...) so a query block folds into one matmul.
        qg, dog = q.reshape(b, hkv, g, s, d), d_out.reshape(b, hkv, g, s, d)
        lse_g = lse.reshape(b, hkv, g, s, 1)
        delta = (d_out.float() * out.float()).sum(-1).view(b, hkv, g, s, 1)
        dq_blocks = []
        dk = torch.zeros(b, hkv, s, d, dtype=torch.float32, device=q.device)
        dv = torch.zeros_like(dk)
        step = query_block(b, h, s)
        for i0 in range(0, s, step):
            i1 = min(s, i0 + step)
            c, j0 = i1 - i0, _keys(i0, i1, window)
            n = i1 - j0
            qc = qg[:, :, :, i0:i1].reshape(b, hkv, g * c, d)
            do_c = dog[:, :, :, i0:i1].reshape(b, hkv, g * c, d)
            kc, vc = k[:, :, j0:i1], v[:, :, j0:i1]
            scores, capped = _scores(qc, kc, scale, softcap)
            p = torch.where(_visible(i0, i1, j0, window, q.device, doc),
                            torch.exp(scores.view(b, hkv, g, c, n) - lse_g[:, :, :, i0:i1]), 0.0)
            dp = torch.matmul(do_c, vc.transpose(-1, -2)).view(b, hkv, g, c, n)
            p = p.to(q.dtype)  # rounded once: the matmuls take it in the compute dtype anyway
            ds = p * (dp.float() - delta[:, :, :, i0:i1])
            if capped is not None:
                ds = ds * (1 - capped.view(b, hkv, g, c, n).square())
            ds = (ds * scale).to(q.dtype).view(b, hkv, g * c, n)
            p = p.view(b, hkv, g * c, n)
            dv[:, :, j0:i1] += torch.matmul(p.transpose(-1, -2), do_c)
            dk[:, :, j0:i1] += torch.matmul(ds.transpose(-1, -2), qc)
            dq_blocks.append(torch.matmul(ds, kc).view(b, hkv, g, c, d))
        dq = torch.cat(dq_blocks, dim=3).view(b, h, s, d)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None
