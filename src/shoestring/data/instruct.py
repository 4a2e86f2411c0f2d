"""Instruction data: .jsonl -> chat-templated token rows whose loss covers the responses only.

Each line is `{"prompt": str, "response": str}` or `{"messages": [{"role", "content"}, ...]}`
with at least one assistant message. A prompt/response pair is the chat `[user, assistant]`, so
both forms go through one path: the tokenizer's chat template (or `DEFAULT_TEMPLATE` when it has
none) renders the conversation, and every assistant turn is a target span. Text is tokenised
span by span at the template's own boundaries, so the prompt tokens are exactly those a
generation prompt (`add_generation_prompt=True`) gives at inference time.

An example of L tokens takes L - 1 positions of a row: its tokens but the last as inputs, its
tokens but the first as targets (IGNORE_INDEX outside the responses). Rows are built once, at
load time, in one of two ways:
* packed (`data.packing = true`, the default): several examples per row, placed best-fit
  decreasing (each example, longest first, into the fullest row it still fits), the tail
  padded; rows in the order of their first example. Each row carries a document id per
  position (`doc`), which the model turns into a document mask and RoPE positions that restart
  at each example (models/llama.py), so every example is computed exactly as if alone in its
  row. A target never crosses from one example into the next: each example's targets are its
  own tokens.
* padded: one example per row, right-padded. Under the causal mask, padding after the real
  tokens leaves their outputs exactly as without it; no document ids are needed.

`InstructSampler` is `BatchSampler` over those rows (same order, resume and rank semantics);
`documents(step)` gives the lengths of the examples a step computes, so that throughput and MFU
count real tokens, not padding.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from shoestring.data.loader import Batch, BatchSampler
from shoestring.errors import UserError
from shoestring.models.loss import IGNORE_INDEX

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token")


class MalformedLine(ValueError):
    pass


def parse_line(text: str) -> list[dict[str, str]]:
    """One jsonl line -> messages; raises MalformedLine saying what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise MalformedLine(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise MalformedLine(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise MalformedLine("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise MalformedLine(f"messages[{i}] needs a 'role' ({'/'.join(ROLES)}) and a string 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise MalformedLine("no assistant message: nothing to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    missing = [k for k in ("prompt", "response") if not isinstance(obj.get(k), str)]
    if missing:
        raise MalformedLine(f"needs string fields 'prompt' and 'response' (or 'messages'); bad or missing: {', '.join(missing)}")
    return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]


def read_jsonl(path: Path, skip_malformed: bool) -> tuple[list[list[dict[str, str]]], int]:
    """(conversations, number of malformed lines skipped). Blank lines are ignored."""
    if not path.is_file():
        raise UserError(f"instruction data {path} not found", "set data.corpus to a .jsonl file")
    out, skipped = [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse_line(line))
            except MalformedLine as err:
                if not skip_malformed:
                    raise UserError(f"{path}:{lineno}: {err}", "fix the line, or set data.skip_malformed = true to skip and count such lines") from None
                skipped += 1
    if not out:
        raise UserError(f"{path}: no usable examples ({skipped} malformed)")
    return out, skipped


class ChatFormatter:
    """Renders conversations with a chat template and tokenises them span by span."""

    def __init__(self, tokenizer: Tokenizer, template: str | None, special: dict[str, str]):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template or DEFAULT_TEMPLATE)
        self.tokenizer, self.special = tokenizer, special

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tokens(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """(ids, is_target): each assistant turn's text after its generation prompt is a target."""
        ids: list[int] = []
        target: list[bool] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise UserError("the chat template does not render conversations as growing prefixes",
                                "use a template whose rendering of a longer conversation extends the shorter one")
            for text, is_target in ((prompt[len(done):], False), (full[len(prompt):], True)):
                piece = self.encode(text)
                ids += piece
                target += [is_target] * len(piece)
            done = full
        return ids, target


def special_tokens(tok_cfg: dict) -> dict[str, str]:
    """bos/eos/pad strings for the chat template (tokenizer_config may hold them as dicts)."""
    out = {}
    for name in SPECIAL_TOKENS:
        v = tok_cfg.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        out[name] = v or ""
    return out


def formatter(tokenizer: Tokenizer, tok_cfg: dict) -> ChatFormatter:
    return ChatFormatter(tokenizer, tok_cfg.get("chat_template"), special_tokens(tok_cfg))


def pad_id(tokenizer: Tokenizer, tok_cfg: dict) -> int:
    """Padding never reaches the loss (targets are ignored there); any valid id will do."""
    for name in ("pad_token", "eos_token"):
        token = special_tokens(tok_cfg)[name]
        if token and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0


def _raise(message: str) -> None:
    raise UserError(f"chat template: {message}")


@dataclass
class InstructRows:
    """x/y int64 arrays (n, seq_len), y IGNORE_INDEX outside the responses; `doc` (n, seq_len)
    int64 document ids of packed rows (the padding tail its own document), None for padded rows;
    `lengths[i]`: the positions each example takes in row i (the rest is padding)."""

    x: np.ndarray
    y: np.ndarray
    too_long: int  # examples dropped because prompt + response exceed seq_len + 1 tokens
    lengths: list[list[int]]
    doc: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def target_tokens(self) -> np.ndarray:
        return self.y[self.y != IGNORE_INDEX]

    def batch(self, ids: np.ndarray | slice) -> Batch:
        """(x, y), and the document ids when packed, of rows `ids`."""
        tensors = (self.x[ids], self.y[ids]) + (() if self.doc is None else (self.doc[ids],))
        return tuple(torch.from_numpy(t) for t in tensors)


def encode_examples(conversations: list[list[dict[str, str]]], fmt: ChatFormatter,
                    seq_len: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Each example as (inputs, targets) of L - 1 positions; and how many were dropped for
    exceeding seq_len + 1 tokens."""
    out, too_long = [], 0
    for messages in conversations:
        ids, target = fmt.tokens(messages)
        if len(ids) > seq_len + 1:
            too_long += 1
            continue
        ids = np.asarray(ids, dtype=np.int64)
        out.append((ids[:-1], np.where(np.asarray(target[1:], dtype=bool), ids[1:], IGNORE_INDEX)))
    return out, too_long


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of `lengths` per row, each row's sum at most `capacity`.
    The longest example first, each into the row with the least room that still holds it (a new
    row when none does): rows come out nearly full when short examples remain to fill gaps.
    Rows are then put in the order of their first example, each in file order, so that rows of
    one example each are exactly the padded rows (and the first rows hold the first examples)."""
    rows: list[list[int]] = []
    room: dict[int, list[int]] = {}  # free positions -> rows with exactly that many
    free: list[int] = []  # sorted keys of `room` with rows
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, lengths[i])
        if at == len(free):
            r, left = len(rows), capacity
            rows.append([])
        else:
            left = free[at]
            r = room[left].pop()
            if not room[left]:
                del free[at]
        rows[r].append(i)
        left -= lengths[i]
        if left:
            if not room.get(left):
                bisect.insort(free, left)
            room.setdefault(left, []).append(r)
    return sorted(sorted(r) for r in rows)


def build_rows(conversations: list[list[dict[str, str]]], fmt: ChatFormatter, seq_len: int, pad_id: int,
               packing: bool = False) -> InstructRows:
    examples, too_long = encode_examples(conversations, fmt, seq_len)
    groups = pack([len(x) for x, _ in examples], seq_len) if packing else [[i] for i in range(len(examples))]
    x = np.full((len(groups), seq_len), pad_id, dtype=np.int64)
    y = np.full((len(groups), seq_len), IGNORE_INDEX, dtype=np.int64)
    doc = np.empty((len(groups), seq_len), dtype=np.int64) if packing else None
    lengths = []
    for r, group in enumerate(groups):
        at = 0
        for d, i in enumerate(group):
            ex, ey = examples[i]
            x[r, at : at + len(ex)], y[r, at : at + len(ex)] = ex, ey
            if doc is not None:
                doc[r, at : at + len(ex)] = d
            at += len(ex)
        if doc is not None:
            doc[r, at:] = len(group)
        lengths.append([len(examples[i][0]) for i in group])
    return InstructRows(x, y, too_long, lengths, doc)


@dataclass
class InstructData:
    train: InstructRows
    val: InstructRows
    skipped: int  # malformed lines skipped
    val_conversations: list[list[dict[str, str]]]


def split_conversations(convs: list[list[dict[str, str]]], val_fraction: float) -> tuple[list, list]:
    """A fixed split (seed 0, independent of the run seed): the same examples are always held out."""
    n_val = max(1, round(len(convs) * val_fraction)) if len(convs) > 1 else 0
    order = np.random.default_rng(0).permutation(len(convs))
    held = set(order[:n_val].tolist())
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def load_instruct(path: Path, fmt: ChatFormatter, seq_len: int, pad_id: int, val_fraction: float,
                  skip_malformed: bool, packing: bool = False) -> InstructData:
    convs, skipped = read_jsonl(path, skip_malformed)
    train_c, val_c = split_conversations(convs, val_fraction)
    train, val = (build_rows(c, fmt, seq_len, pad_id, packing) for c in (train_c, val_c))
    if len(train) == 0:
        raise UserError(f"{path}: every training example is longer than data.seq_len + 1 = {seq_len + 1} tokens",
                        "raise data.seq_len")
    return InstructData(train, val, skipped, val_c)


class InstructSampler(BatchSampler):
    """`BatchSampler`'s order, resume and rank split over instruction rows instead of token windows."""

    def __init__(self, rows: InstructRows, global_batch: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.rows = rows
        super().__init__(rows.x, rows.x.shape[1], global_batch, grad_accum, rank, world_size, seed)

    def _count_windows(self, tokens: Any, seq_len: int) -> int:
        return len(self.rows)

    def _gather_rows(self, ids: np.ndarray) -> Batch:
        return self.rows.batch(ids)

    def documents(self, step: int) -> np.ndarray:
        rows = self._entries(step * self.global_batch, self.global_batch)
        return np.asarray([n for r in rows for n in self.rows.lengths[r]], dtype=np.int64)


def instruct_val_batches(rows: InstructRows, batch_size: int, n_batches: int) -> list[Batch]:
    """Fixed evaluation batches: the first rows in order (one smaller batch when fewer exist)."""
    n = min(len(rows), batch_size * n_batches)
    return [rows.batch(slice(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
