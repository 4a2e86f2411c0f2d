"""Next-token cross-entropy straight from hidden states, without the full logits tensor.

For a small model with a large vocabulary the `tokens x vocab` float32 logits (and their
gradient) are the largest activation of the step: tiny preset, 16x256 tokens, vocab 4096 is
64 MiB, more than all its transformer blocks keep. We walk the tokens in chunks; for each chunk
we form its logits, take the loss, and compute the gradients w.r.t. the hidden states and the
head weight right away (the loss is a scalar, so its upstream gradient is a single number
applied in backward). What stays alive until backward is `grad_hidden` (tokens x dim) and
`grad_weight` (vocab x dim; not computed for a frozen head, as under LoRA) instead of the logits.

A final-logit soft-cap (Gemma 2: logits -> c tanh(logits / c)) is applied per chunk; its
derivative (1 - tanh^2) multiplies the softmax gradient before it reaches hidden and weight.

The pass over each chunk's `chunk x vocab` logits (`softmax_grad`: log-sum-exp, the loss, the
gradient softmax - onehot) is element-wise work and reductions; with `compiled=True` (what the
compile lever asks for) it runs as one compiled kernel instead of eager passes over the chunk.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_CHUNK = 1024  # tokens whose logits exist at once (the planner counts one chunk's buffers)


def softmax_grad(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, softcap: float,
                 dtype: torch.dtype, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss and its gradient w.r.t. the logits, softmax - onehot(target) (0 on
    ignored rows, times the soft-cap's derivative where there is one), in `dtype`. `fused`: the
    one-hot as a comparison with the column index, so that under compile the whole gradient is
    one element-wise pass; eagerly an indexed subtraction, which touches only the targets, is
    cheaper. The one-hot is subtracted here, in fp32, before the matmuls: after them, a confident
    row's `probs @ W` and `W[target]` nearly cancel, and in bf16 the difference would be noise."""
    logits = logits.float()
    if softcap:
        tanh = torch.tanh(logits.div_(softcap))
        logits = torch.mul(tanh, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)
    loss = ((lse - target_logit) * valid).sum()
    g = logits.sub_(lse[:, None]).exp_()
    if fused:
        g = g - (torch.arange(g.shape[1], device=g.device) == targets[:, None]).to(g.dtype)
    else:
        g[torch.arange(len(targets), device=g.device), targets] -= 1.0
    g.mul_(valid[:, None])
    if softcap:
        g.mul_(1 - tanh.square_())
    return loss, g.to(dtype)


@functools.cache
def _compiled_softmax_grad():
    return torch.compile(functools.partial(softmax_grad, fused=True))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                softcap: float, compiled: bool) -> torch.Tensor:
        needs_grad = hidden.requires_grad or weight.requires_grad
        head_trains = weight.requires_grad  # a frozen head (LoRA) needs no vocab x dim gradient
        kernel = _compiled_softmax_grad() if compiled else softmax_grad
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().clamp(min=1)
        weights = valid.float()  # 0 on ignored rows
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if head_trains else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk].clamp(min=0)
            chunk_loss, g = kernel(h @ weight.T, t, weights[start : start + chunk], softcap, h.dtype)
            loss += chunk_loss
            if needs_grad:
                grad_hidden[start : start + chunk] = g @ weight
                if head_trains:
                    grad_weight += (g.T @ h).float()
        loss = loss / n_valid
        if needs_grad:
            grad_hidden.div_(n_valid)
            grad_weight = grad_weight.div_(n_valid).to(weight.dtype) if head_trains else None
            ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else grad_weight * grad_out.to(grad_weight.dtype)
        return grad_hidden * grad_out.to(grad_hidden.dtype), grad_weight, None, None, None, None


def cross_entropy_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = LOSS_CHUNK, softcap: float | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (soft-capped at `softcap` when given) against
    `targets` (IGNORE_INDEX rows skipped).

    hidden (..., dim), weight (vocab, dim), targets (...). Under autocast the matmuls run in the
    autocast dtype, like an `nn.Linear` would; the softmax is always fp32. `compiled`: the pass
    over the logits runs as one compiled kernel (`softmax_grad`).
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = weight.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(h, w, targets.reshape(-1), chunk, softcap or 0.0, compiled)


def reference_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            softcap: float | None = None) -> torch.Tensor:
    """The plain version (full logits), for tests and comparison."""
    logits = hidden @ weight.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
