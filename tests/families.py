"""Tiny random models of every supported family, built with transformers and saved as Hugging
Face directories, with each family's switches on: sliding windows shorter than the test rows,
RoPE scaling, biases, q/k norms, soft-caps small enough to bite, head_dim != hidden / heads.

Weights are drawn from a wide normal (norm weights and biases too, which transformers
initialises to constants), so that a mis-mapped bias or a norm offset applied twice shows in the
logits. The tokenizer is a byte-level BPE (bytes plus a few merges and chat specials): a
Hugging Face directory and a GGUF file (tests/gguf_fixtures.py) can both hold it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SEQ = 24  # test rows; every window below is shorter
WINDOW = 8
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<bos>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "[INST]", "[/INST]", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>",
            "<|end|>", "<think>", "</think>"]

# Chat templates shaped like each family's own (written here, not copied): the constructs that
# matter to our renderer are there (bos_token, raise_exception, Gemma's `model` role and its
# refusal of a system turn, Qwen3's empty think block on the answer after the last user turn).
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_ALTERNATE = ("{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}")
TEMPLATES = {
    "llama": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "mistral": ("{{ bos_token }}{% for m in messages %}" + _ALTERNATE + "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
    "qwen2": ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
              + CHATML),
    "qwen3": ("{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}"
              "{% endif %}{% endfor %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
              "{% if m['role'] == 'assistant' and loop.index0 > ns.last %}<think>\n\n</think>\n\n{% endif %}"
              "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "gemma2": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
               "{% for m in messages %}" + _ALTERNATE + "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
               "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "gemma3_text": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
                    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
                    "{% for m in turns %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
                    "<start_of_turn>{{ role }}\n{{ (first if loop.first else '') + m['content'] | trim }}<end_of_turn>\n"
                    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    "phi3": ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}
EOS = {"llama": "<|eot_id|>", "mistral": "<|im_end|>", "gemma2": "<end_of_turn>", "gemma3_text": "<end_of_turn>", "phi3": "<|end|>"}

_COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=3, eos_token_id=2, pad_token_id=0)
_GEMMA = dict(head_dim=24, query_pre_attn_scalar=20, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
              sliding_window=WINDOW, attention_bias=True, tie_word_embeddings=True)

# family -> (transformers config class, its switches). Every family's own features are on.
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, head_dim=24, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(
        tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0})),
    "qwen3": ("Qwen3Config", dict(
        head_dim=24, attention_bias=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0})),
    "gemma2": ("Gemma2Config", dict(_GEMMA)),
    "gemma3_text": ("Gemma3TextConfig", dict(
        _GEMMA, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
}


def byte_tokenizer():
    """Byte-level BPE: the 256 byte symbols, a few merges, the chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    order = sorted(alphabet, key=lambda ch: ord(ch))
    merges = [("Ġ", "w"), ("r", "e"), ("Ġw", "1"), ("Ġw", "2")]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + order + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def hf_config(family: str, vocab_size: int, **changes):
    import transformers

    cls, switches = FAMILIES[family]
    return getattr(transformers, cls)(**{**_COMMON, **switches, "vocab_size": vocab_size, **changes})


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        else:  # norms around their identity, biases around zero: both visibly off it
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name and "gemma" not in type(model).__name__.lower() else 0.0))


def make_family(path: Path, family: str, seed: int = 0, **changes) -> Path:
    """A random model of `family` saved with tokenizer and chat template in `path`."""
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    config = hf_config(family, tok.get_vocab_size(), **changes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, seed)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATES[family],
        "bos_token": "<bos>", "eos_token": EOS.get(family, "<|im_end|>"), "pad_token": "<pad>"}))
    return path


def padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, attention mask) of 3 right-padded rows of 24, 17 and 9 real tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(len(SPECIALS), vocab, (3, SEQ), generator=g)
    mask = torch.zeros(3, SEQ, dtype=torch.long)
    for row, n in enumerate((SEQ, 17, 9)):
        mask[row, :n] = 1
        x[row, n:] = 0
    return x, mask
