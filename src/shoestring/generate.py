"""Sample text from a trained run: the run's tokenizer and its newest checkpoint's weights."""

from __future__ import annotations

from pathlib import Path

import torch

from shoestring.data.instruct import formatter
from shoestring.export import load_run
from shoestring.models.llama import Llama


def load_run_model(run_dir: Path) -> tuple[Llama, object]:
    """(model in fp32 eval mode on CPU, tokenizer) from a run directory."""
    run = load_run(run_dir)
    return run.model, run.tokenizer


@torch.no_grad()
def sample(model: Llama, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: int | None = 50, seed: int = 0, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Prompt + up to `max_new_tokens` sampled tokens (greedy at temperature 0); a token in
    `stop_ids` (end of turn) ends it, included."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    for _ in range(max_new_tokens):
        context = ids[:, -model.args.max_seq_len :]
        logits = model.logits(model(context)[:, -1]).float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
        if int(nxt) in stop_ids:
            break
    return ids[0].tolist()


def generate_text(run_dir: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
                  chat: bool = False) -> str:
    """`chat`: the prompt is a user message, rendered with the run's chat template (fine-tuned runs)."""
    if chat:
        run = load_run(run_dir)
        model, tokenizer = run.model, run.tokenizer
        fmt = formatter(tokenizer, run.tokenizer_config)
        prompt_ids = fmt.encode(fmt.render([{"role": "user", "content": prompt}], add_generation_prompt=True))
        return tokenizer.decode(sample(model, prompt_ids, max_new_tokens, temperature, top_k, seed)[len(prompt_ids):])
    model, tokenizer = load_run_model(run_dir)
    prompt_ids = tokenizer.encode(prompt).ids or [0]
    out = sample(model, prompt_ids, max_new_tokens, temperature, top_k, seed)
    return tokenizer.decode(out)
