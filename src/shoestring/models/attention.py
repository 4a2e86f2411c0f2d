"""Causal attention with a backward that is fast on CPU.

PyTorch's CPU flash-attention backward (`_scaled_dot_product_flash_attention_for_cpu_backward`)
runs the attention FLOPs at a small fraction of the matmul rate: on the small preset in bf16 it
was a quarter of a compiled training step (docs/performance.md). Its forward is fast. So
`causal_attention` keeps the flash forward (which saves only q, k, v, the output and the
logsumexp, no `seq x seq` tensor) and replaces the backward by the textbook one written with
dense matmuls, recomputing the probabilities from the saved logsumexp:

    P = exp(Q K^T * scale - lse)  (causal)    dV = P^T dO    dP = dO V^T
    dS = P * (dP - rowsum(dO * O)) * scale    dQ = dS K    dK = dS^T Q

It runs over blocks of queries so that the transient is `batch x heads x block x seq`, never
`seq x seq` for all queries at once; a block of queries needs only the keys up to its end, which
also skips most of the masked half. Under `torch.compile` of the blocks the element-wise work
between those matmuls fuses into a few kernels. Grouped-query attention is native: the query
heads of a group are stacked along the rows, so one matmul per group serves them all and dK, dV
sum over the group for free.

It is used on CPU inside `torch.compile` (the compile lever compiles each block; the default for
bf16 on CPU). Eagerly, its element-wise steps would be separate passes over the probabilities,
costing more than the flash backward saves; there, and on CUDA (whose flash / efficient kernels
have fast backwards) and the meta device, this is plain `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Queries per block of the backward: with n blocks it computes (n + 1) / 2n of the `seq x seq`
# scores (the rest is masked); 128 keeps the matmuls large. Fewer for big batch x heads x seq,
# so that one `batch x heads x block x seq` transient stays within BLOCK_ELEMENTS (fp32: 16 MiB).
QUERY_BLOCK = 128
BLOCK_ELEMENTS = 1 << 22


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (batch, heads, seq, head_dim); k, v (batch, kv_heads, seq, head_dim), kv_heads dividing
    heads -> (batch, heads, seq, head_dim). Causal, scale 1/sqrt(head_dim), no dropout. The
    dense backward on CPU when compiling, SDPA otherwise (see the module docstring)."""
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        return CpuCausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def query_block(batch: int, heads: int, seq: int) -> int:
    """Queries per block of the dense backward."""
    return min(seq, QUERY_BLOCK, max(16, BLOCK_ELEMENTS // (batch * heads * seq)))


class CpuCausalAttention(torch.autograd.Function):
    """Flash forward, dense blocked backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, out, lse = ctx.saved_tensors
        b, h, s, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        scale = 1.0 / math.sqrt(d)
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
            c = i1 - i0
            qc = qg[:, :, :, i0:i1].reshape(b, hkv, g * c, d)
            doc = dog[:, :, :, i0:i1].reshape(b, hkv, g * c, d)
            kc, vc = k[:, :, :i1], v[:, :, :i1]
            scores = torch.matmul(qc, kc.transpose(-1, -2)).view(b, hkv, g, c, i1)
            causal = torch.arange(i0, i1, device=q.device)[:, None] >= torch.arange(i1, device=q.device)
            p = torch.where(causal, torch.exp(scores.float() * scale - lse_g[:, :, :, i0:i1]), 0.0)
            dp = torch.matmul(doc, vc.transpose(-1, -2)).view(b, hkv, g, c, i1)
            p = p.to(q.dtype)  # rounded once: the matmuls take it in the compute dtype anyway
            ds = (p * (dp.float() - delta[:, :, :, i0:i1]) * scale).to(q.dtype).view(b, hkv, g * c, i1)
            p = p.view(b, hkv, g * c, i1)
            dv[:, :, :i1] += torch.matmul(p.transpose(-1, -2), doc)
            dk[:, :, :i1] += torch.matmul(ds.transpose(-1, -2), qc)
            dq_blocks.append(torch.matmul(ds, kc).view(b, hkv, g, c, d))
        return torch.cat(dq_blocks, dim=3).view(b, h, s, d), dk.to(k.dtype), dv.to(v.dtype)
