"""A small instruction data set the project writes itself, so a fine-tune runs with nothing
downloaded: "Reverse the order of these words: a b c d" -> "d c b a", four words drawn without
repeats from 26. A base chat model gets it partly right; a few LoRA steps teach it (docs/finetune.md).
`shoestring data instruct-demo OUT` writes it; `make finetune`, the fine-tuning benchmark and the
SmolLM2 test use it."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger paper green window silver music garden candle ocean yellow "
         "mountain pencil rabbit winter orange forest bridge castle dragon summer violet rocket").split()
PROMPT = "Reverse the order of these words: "


def reverse_words(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` {"prompt", "response"} examples, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        out.append({"prompt": PROMPT + " ".join(words), "response": " ".join(reversed(words))})
    return out


def write_reverse_words(path: Path, n: int = 400, seed: int = 0) -> Path:
    """The examples as a .jsonl file (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in reverse_words(n, seed)))
    return path
