"""Packed fixed-length batches from a token array, as a pure function of the optimizer step.

The token stream is cut into windows of seq_len+1 tokens starting every seq_len tokens (x is a
window without its last token, y without its first; neighbours share one token, nothing is
padded or wasted). Each epoch visits the windows in a fresh permutation, and the epochs are laid
end to end into one stream. Optimizer step s takes the next `global_batch` entries of that stream,
and each rank and micro-step takes a fixed slice of them. Because a batch depends only on
(step, micro_step), resuming needs only the step — on any world size or accumulation split.
"""

from __future__ import annotations

import numpy as np
import torch

from shoestring.errors import UserError

Batch = tuple[torch.Tensor, ...]  # (x, y), or (x, y, doc) for packed instruction rows (data.instruct)


def n_windows(n_tokens: int, seq_len: int) -> int:
    """How many (seq_len+1)-token windows at offsets i*seq_len fit in n_tokens."""
    return max(0, (n_tokens - 1) // seq_len)


def _gather(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> Batch:
    idx = windows[:, None] * seq_len + np.arange(seq_len + 1)
    span = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    # Contiguous, so callers may .view() them.
    return span[:, :-1].contiguous(), span[:, 1:].contiguous()


class BatchSampler:
    """Deterministic, resumable, rank-aware batches: `batch(step, micro_step)` or `next_batch()`."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.global_batch, self.world_size = global_batch, world_size
        self.resplit(grad_accum)
        self.windows = self._count_windows(tokens, seq_len)
        if self.windows < global_batch:
            raise UserError(
                f"{len(tokens)} tokens hold {self.windows} sequences of {seq_len}+1 tokens, "
                f"fewer than one global batch of {global_batch}",
                "use a larger corpus, a smaller data.seq_len or a smaller train.batch_size",
            )
        self.tokens, self.seq_len, self.seed, self.rank = tokens, seq_len, seed, rank
        self.step, self.micro_step = 0, 0  # the position next_batch() serves
        self._perms: dict[int, np.ndarray] = {}

    def resplit(self, grad_accum: int) -> None:
        """Serve each step in `grad_accum` micro-steps per rank: the step's entries are the same
        (the same optimisation), only cut into other slices."""
        split = grad_accum * self.world_size
        if self.global_batch % split:
            raise UserError(
                f"global batch {self.global_batch} does not divide into grad_accum {grad_accum} × world size {self.world_size}",
                f"make train.batch_size a multiple of {split}",
            )
        self.grad_accum, self.micro_batch = grad_accum, self.global_batch // split

    def rewind(self, step: int) -> None:
        """Serve `step` from its first micro-step again (a discarded partial step is redone)."""
        self.step, self.micro_step = step, 0

    # Hooks: what the sampler draws from (token windows here; padded rows in data.instruct).
    def _count_windows(self, tokens: np.ndarray, seq_len: int) -> int:
        return n_windows(len(tokens), seq_len)

    def _gather_rows(self, ids: np.ndarray) -> Batch:
        return _gather(self.tokens, ids, self.seq_len)

    def documents(self, step: int) -> np.ndarray:
        """Lengths of what the global batch of optimizer step `step` computes as separate
        sequences, padding left out (here: every window, whole). Throughput and MFU count these."""
        return np.full(self.global_batch, self.seq_len, dtype=np.int64)

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.windows)
        return self._perms[epoch]

    def _entries(self, start: int, count: int) -> np.ndarray:
        """Window ids at positions [start, start+count) of the epoch-concatenated permuted stream."""
        pos = np.arange(start, start + count)
        epochs = pos // self.windows
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._perm(int(epoch))[pos[mask] % self.windows]
        return out

    def batch(self, step: int, micro_step: int = 0) -> Batch:
        """(x, y) int64 tensors of shape (micro_batch, seq_len) for this rank at this (step, micro_step)."""
        if step < 0 or not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"no batch at step {step}, micro-step {micro_step} (grad_accum {self.grad_accum})")
        start = step * self.global_batch + (micro_step * self.world_size + self.rank) * self.micro_batch
        return self._gather_rows(self._entries(start, self.micro_batch))

    def next_batch(self) -> Batch:
        """The batch at the current position, then advance one micro-step (and a step after the last)."""
        xy = self.batch(self.step, self.micro_step)
        self.micro_step += 1
        if self.micro_step == self.grad_accum:
            self.step, self.micro_step = self.step + 1, 0
        return xy

    def state_dict(self) -> dict[str, int]:
        """The position (next step to serve) plus what fixes the data order.

        World size and grad_accum are left out on purpose: a run may resume on another split.
        `windows` is kept so that resuming on different data is caught rather than silently reordered.
        """
        if self.micro_step:
            raise RuntimeError("sampler state is only defined between optimizer steps")
        keys = ("seed", "seq_len", "global_batch", "windows", "step")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len", "global_batch", "windows"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume: the checkpoint's data order has {key}={state[key]}, this run has {getattr(self, key)}",
                    "resume with the same data, data.seq_len, train.batch_size and train.seed",
                )
        self.step, self.micro_step = int(state["step"]), 0


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int) -> list[Batch]:
    """A fixed evaluation set: the first windows in order, so every eval of every run sees the same text.

    Clamped to the full batches that exist; when not even one fits, a single smaller batch.
    """
    available = n_windows(len(tokens), seq_len)
    if available == 0:
        raise UserError(
            f"the validation split has {len(tokens)} tokens, not enough for one sequence of {seq_len}+1",
            "raise data.val_fraction or lower data.seq_len",
        )
    n_batches = min(n_batches, available // batch_size)
    if n_batches == 0:
        return [_gather(tokens, np.arange(available), seq_len)]
    return [_gather(tokens, np.arange(i * batch_size, (i + 1) * batch_size), seq_len) for i in range(n_batches)]
