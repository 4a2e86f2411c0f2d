"""A Hugging Face directory -> a GGUF file written the way llama.cpp's convert_hf_to_gguf.py
writes one (tensor names, Q/K row order, Gemma's 1 + w norms, Llama 3's `rope_freqs`, the
metadata keys of each architecture), with the `gguf` package's writer, in fp32.

Only what llama.cpp would write losslessly: a config it cannot express (a Gemma query scale
other than its hard-coded rule, a Gemma 3 sliding pattern other than every sixth layer global,
another local RoPE base) is refused, so the tests build models that fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shoestring.models import gguf as ours
from shoestring.models.rope import inv_freq
from shoestring.models.hf import args_from_hf_config


def _arch(model_type: str) -> str:
    return {"mistral": "llama", "gemma3_text": "gemma3"}.get(model_type, model_type)


def _check_expressible(cfg: dict, args) -> None:
    kind = cfg["model_type"]
    if kind.startswith("gemma"):
        assert args.attn_scale == args.head_dim ** -0.5, "llama.cpp's Gemma query scale is 1/sqrt(head_dim)"
    if kind == "gemma3_text":
        assert args.local_rope_theta == 10000.0, "llama.cpp's Gemma 3 local RoPE base is 10000"
        assert [args.window(i) > 0 for i in range(args.n_layers)] == [(i + 1) % 6 != 0 for i in range(args.n_layers)]
    if kind in ("qwen2", "qwen3"):
        assert not args.sliding_window, "llama.cpp computes Qwen without its sliding window"
    if kind == "gemma2":
        assert [args.window(i) > 0 for i in range(args.n_layers)] == [i % 2 == 0 for i in range(args.n_layers)]


def write_gguf(hf_dir: Path, out: Path) -> Path:
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    args = args_from_hf_config(cfg)
    _check_expressible(cfg, args)
    arch = _arch(cfg["model_type"])
    state = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    if args.head_dim != args.dim // args.n_heads:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    if args.sliding_window:
        w.add_sliding_window(args.sliding_window)
    if args.attn_softcap:
        w.add_attn_logit_softcapping(args.attn_softcap)
    if args.final_softcap:
        w.add_final_logit_softcapping(args.final_softcap)
    s = args.rope_scaling
    if s is not None and s.kind == "llama3":  # the per-frequency divisors, as llama.cpp's converter writes them
        factors = inv_freq(args.head_dim, args.rope_theta) / inv_freq(args.head_dim, args.rope_theta, s)
        w.add_tensor("rope_freqs.weight", factors.numpy().astype("float32"))
    elif s is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if s.kind == "linear" else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.factor)
        if s.kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(s.original_max_seq_len)
    for name, t in state.items():
        t = t.float()
        if arch == "llama" and ".self_attn.q_proj." in name:
            t = ours.permute_qk(t, args.n_heads, to_gguf=True)
        if arch == "llama" and ".self_attn.k_proj." in name:
            t = ours.permute_qk(t, args.n_kv_heads, to_gguf=True)
        if arch in ours.GEMMA and name.endswith("norm.weight"):
            t = t + 1.0
        w.add_tensor(ours.gguf_name(name, arch), t.contiguous().numpy())
    _add_tokenizer(w, hf_dir)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add_tokenizer(w, hf_dir: Path) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's `gpt2` tokenizer model."""
    import gguf

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    ids = {name: vocab[tok_cfg[name]] for name in ("bos_token", "eos_token", "pad_token")}
    w.add_bos_token_id(ids["bos_token"])
    w.add_eos_token_id(ids["eos_token"])
    w.add_pad_token_id(ids["pad_token"])
    w.add_chat_template(tok_cfg["chat_template"])


def gguf_state_matches(hf_dir: Path, file: Path) -> list[str]:
    """Keys whose tensor read back from `file` differs from the HF directory's (empty: all equal)."""
    from safetensors.torch import load_file

    _, state = ours.read_gguf_weights(file)
    expected = load_file(str(hf_dir / "model.safetensors"))
    bad = sorted(set(state) ^ set(expected))
    bad += [k for k in expected if k in state and not torch.allclose(state[k], expected[k].float(), atol=1e-6, rtol=0)]
    return bad
