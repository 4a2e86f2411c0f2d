"""A fine-tune before and after, side by side: greedy answers to the run's held-out prompts (its
data's validation split, never trained on) and the loss on the run's validation batches, from
the model it started from and from the tuned one (`shoestring compare RUN_DIR`).

"Before" is exact and free for a LoRA run: the same weights with the adapters switched off (B
starts at zero, so that is the source model). A full fine-tune keeps no copy of its start, so
its source is read again from `model.source`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from shoestring.data.instruct import formatter, pad_id, special_tokens
from shoestring.errors import UserError
from shoestring.export import RunModel, load_run
from shoestring.generate import sample
from shoestring.levers.lora import adapters_off, lora_modules
from shoestring.models.llama import Llama
from shoestring.models.loss import cross_entropy_from_hidden


@dataclass
class Answer:
    prompt: str
    expected: str
    before: str
    after: str


@dataclass
class Comparison:
    answers: list[Answer]
    val_loss_before: float
    val_loss_after: float
    val_examples: int


@contextlib.contextmanager
def starting_model(run: RunModel) -> Iterator[Llama]:
    """The model the run started from."""
    if lora_modules(run.model):
        with adapters_off(run.model):
            yield run.model
        return
    from shoestring.models.hf import load_llama, read_source

    yield load_llama(read_source(run.cfg.model.source)).eval()


class HeldOut:
    """A run's held-out prompts (the first `prompts` of its validation split) and its validation
    batches (the trainer's: `eval_batches` x `batch_size` rows)."""

    def __init__(self, run: RunModel, prompts: int):
        from shoestring.data.instruct import instruct_val_batches, load_instruct

        cfg = run.cfg
        if cfg.data.format != "instruct":
            raise UserError("the run did not fine-tune on instruction data", "compare applies to runs with data.format = 'instruct'")
        self.run, self.fmt = run, formatter(run.tokenizer, run.tokenizer_config)
        data = load_instruct(Path(cfg.data.corpus), self.fmt, cfg.data.seq_len, pad_id(run.tokenizer, run.tokenizer_config),
                             cfg.data.val_fraction, cfg.data.skip_malformed, cfg.data.packing)
        self.batches = instruct_val_batches(data.val, cfg.train.batch_size, cfg.train.eval_batches)
        self.examples = sum(len(n) for n in data.val.lengths[: sum(len(b[0]) for b in self.batches)])
        if not self.batches:
            raise UserError(f"{cfg.data.corpus}: no held-out example fits data.seq_len", "raise data.seq_len or data.val_fraction")
        self.turns = [_first_turn(c) for c in data.val_conversations[:prompts]]
        eos = special_tokens(run.tokenizer_config)["eos_token"]
        self.stop = frozenset({run.tokenizer.token_to_id(eos)} - {None}) if eos else frozenset()

    @torch.no_grad()
    def answers(self, model: Llama, max_new_tokens: int = 12) -> list[str]:
        """Greedy replies, first line."""
        out = []
        for messages, _ in self.turns:
            ids = self.fmt.encode(self.fmt.render(messages, add_generation_prompt=True))
            reply = self.run.tokenizer.decode(sample(model, ids, max_new_tokens, temperature=0, stop_ids=self.stop)[len(ids):])
            out.append(reply.split("\n")[0].strip())
        return out

    @torch.no_grad()
    def loss(self, model: Llama) -> float:
        """Mean of the per-batch losses, as the trainer's evaluation takes it (here in fp32)."""
        return sum(cross_entropy_from_hidden(model(x, *doc), model.lm_head.weight, y).item()
                   for x, y, *doc in self.batches) / len(self.batches)


def compare(run_dir: Path, prompts: int = 5, max_new_tokens: int = 12) -> Comparison:
    run = load_run(run_dir)
    held = HeldOut(run, prompts)
    after, loss_after = held.answers(run.model, max_new_tokens), held.loss(run.model)
    with starting_model(run) as start:
        before, loss_before = held.answers(start, max_new_tokens), held.loss(start)
    return Comparison([Answer(m[-1]["content"], expected, b, a) for (m, expected), b, a in zip(held.turns, before, after)],
                      loss_before, loss_after, held.examples)


def _first_turn(conversation: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """The messages before the first assistant turn, and that turn's text."""
    i = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:i], conversation[i]["content"]
