"""A small random Hugging Face Llama and a toy instruction set that a tiny model can learn.

The task is "reverse these three words": a fine-tuned 2-layer model generalises it to held-out
word triples, so generation on held-out prompts tests learning rather than memorising.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(12)]
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def toy_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + ["user", "assistant", "system", "reverse:"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    tok.add_special_tokens(SPECIALS)
    return tok


def make_hf_llama(path: Path, tie: bool = True, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random `LlamaForCausalLM` saved with its tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = toy_tokenizer()
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden + 48,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<pad>"}))
    return path


def reverse_examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    triples = list(itertools.permutations(WORDS, 3))
    random.Random(seed).shuffle(triples)
    return [{"prompt": "reverse: " + " ".join(t), "response": " ".join(reversed(t))} for t in triples[:n]]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
