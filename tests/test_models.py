import pytest
import torch

from shoestring.models import PRESETS, build_model, preset_args
from shoestring.models.presets import PUBLISHED_PARAMS


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_parameter_counts(name):
    model = build_model(PRESETS[name], "meta")  # shapes only: no memory
    assert model.num_params() == PUBLISHED_PARAMS[name] == PRESETS[name].num_params()


# The published config.json of some presets, as on the Hub (the older key layout transformers 4
# wrote: rope_scaling beside rope_theta, Gemma 3's sliding_window_pattern and rope_local_base_freq,
# gemma-3-4b's text_config naming only what differs from Gemma3TextConfig's defaults).
HUB_CONFIGS = {
    "llama3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "attention_bias": False,
                    "mlp_bias": False, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                    "tie_word_embeddings": True, "vocab_size": 128256},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
                     "max_window_layers": 24, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
                     "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936},
    "qwen3-0.6b": {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "attention_bias": False,
                   "hidden_act": "silu", "max_position_embeddings": 40960, "max_window_layers": 28, "rms_norm_eps": 1e-06,
                   "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
                   "use_sliding_window": False, "vocab_size": 151936},
    "gemma2-2b": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "attention_bias": False,
                  "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_act": "gelu_pytorch_tanh",
                  "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "query_pre_attn_scalar": 256,
                  "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000},
    "gemma3-1b": {"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                  "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "attention_bias": False,
                  "attn_logit_softcapping": None, "final_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh",
                  "max_position_embeddings": 32768, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
                  "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
                  "sliding_window_pattern": 6, "vocab_size": 262144},
    "gemma3-4b": {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                  "model_type": "gemma3_text", "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                  "sliding_window": 1024}, "vision_config": {"hidden_size": 1152, "model_type": "siglip_vision_model"}},
    "phi3-mini": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
                  "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
                  "sliding_window": 2047, "tie_word_embeddings": False, "vocab_size": 32064},
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_presets_are_what_the_published_config_loads_as(name):
    from shoestring.models.hf import args_from_hf_config

    assert args_from_hf_config(HUB_CONFIGS[name]) == PRESETS[name]


def test_tiny_forward_shapes_and_causality():
    args = preset_args("tiny", vocab_size=64, max_seq_len=32)
    torch.manual_seed(0)
    model = build_model(args)
    x = torch.randint(0, 64, (2, 16))
    h = model(x)
    assert h.shape == (2, 16, args.dim)
    # Changing a later token must not change earlier positions (causal mask).
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % 64
    h2 = model(x2)
    assert torch.allclose(h[:, :10], h2[:, :10], atol=1e-6)
    assert not torch.allclose(h[:, 10:], h2[:, 10:])


def test_tied_embeddings_share_storage():
    model = build_model(preset_args("tiny", vocab_size=64))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_meta_build_then_materialise_matches_direct_build():
    args = preset_args("tiny", vocab_size=64, max_seq_len=32)
    torch.manual_seed(0)
    direct = build_model(args)
    meta = build_model(args, "meta")
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    for (n, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(direct.inv_freq, meta.inv_freq)


def test_sequence_longer_than_context_is_refused():
    model = build_model(preset_args("tiny", vocab_size=64, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_flops_count_only_the_window_on_sliding_layers():
    """Attention FLOPs (PaLM's causal-unmasked count) see the whole row on a global layer and the
    window on a sliding one; biases and norm weights do no matmul (parameters, not FLOPs)."""
    from dataclasses import replace

    mistral = PRESETS["mistral-7b"]
    plain = replace(mistral, sliding_window=0)
    assert mistral.flops_per_token(4096) == plain.flops_per_token(4096)  # the window covers the row
    assert plain.flops_per_token(8192) - mistral.flops_per_token(8192) == 12 * mistral.q_dim * mistral.n_layers * 4096
    gemma = PRESETS["gemma3-1b"]  # 26 layers: 22 sliding (512), 4 global
    assert gemma.attention_flops_per_token(4096) == 12 * gemma.q_dim * (22 * 512 + 4 * 4096)
    qwen = PRESETS["qwen2.5-0.5b"]
    assert qwen.flops_per_token(512) == replace(qwen, qkv_bias=False).flops_per_token(512)
    assert qwen.num_params() - replace(qwen, qkv_bias=False).num_params() == qwen.n_layers * (qwen.q_dim + 2 * qwen.kv_dim)
    assert build_model(gemma, "meta").flops_per_token(4096) == gemma.flops_per_token(4096)
