"""Named model sizes. Small presets are for training here; the real-model presets carry the
published architectures (shapes and family switches; the planner builds them on the meta device)
of the families we load (models/hf.py).

Each published preset is the model's config.json on the Hugging Face Hub, field by field
(hidden_size -> dim, num_hidden_layers -> n_layers, num_attention_heads -> n_heads,
num_key_value_heads -> n_kv_heads, head_dim, intermediate_size -> ffn_dim, vocab_size,
max_position_embeddings -> max_seq_len, rms_norm_eps, rope_theta / rope_scaling,
tie_word_embeddings, sliding_window and the layer pattern, query_pre_attn_scalar, soft-caps);
`PUBLISHED_PARAMS` holds each to its parameter count (tests/test_models.py).
"""

from __future__ import annotations

from shoestring.models.llama import ModelArgs
from shoestring.models.rope import RopeScaling


def _local_every(n_layers: int, period: int) -> tuple[bool, ...]:
    """Sliding layers of a model whose every `period`-th layer is global (Gemma 2: 2, Gemma 3: 6)."""
    return tuple((i + 1) % period != 0 for i in range(n_layers))


def _llama3(factor: float) -> RopeScaling:  # Llama 3.1 / 3.2 rope_scaling
    return RopeScaling("llama3", factor, original_max_seq_len=8192, low_freq_factor=1.0, high_freq_factor=4.0)


def _qwen(**shape) -> ModelArgs:
    return ModelArgs(**shape, norm_eps=1e-6, rope_theta=1_000_000.0)


def _gemma(n_layers: int, window: int, period: int, **shape) -> ModelArgs:
    """Gemma 2 (period 2) and 3 (period 6): head_dim 256, query_pre_attn_scalar 256, tied."""
    switches = dict(head_dim=256, norm_eps=1e-6, tie_embeddings=True, norm_offset=1.0, post_norms=True, embed_scale=True,
                    mlp_act="gelu_tanh", attn_scale=256 ** -0.5, sliding_window=window,
                    sliding_layers=_local_every(n_layers, period))
    if period == 2:  # Gemma 2: soft-caps, one RoPE base
        switches.update(attn_softcap=50.0, final_softcap=30.0, max_seq_len=8192)
    else:  # Gemma 3: q/k norms, a local RoPE base for the sliding layers
        switches.update(qk_norm=True, rope_theta=1_000_000.0, local_rope_theta=10_000.0)
    return ModelArgs(n_layers=n_layers, **switches, **shape)


PRESETS: dict[str, ModelArgs] = {
    # For tests and smoke benchmarks: trains in milliseconds per step.
    "micro": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512, max_seq_len=128, tie_embeddings=True),
    # Trainable on a laptop CPU. vocab_size is replaced by the tokenizer's when training.
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688, vocab_size=4096, max_seq_len=512, tie_embeddings=True),
    "small": ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1376, vocab_size=8192, max_seq_len=1024, tie_embeddings=True),
    "medium": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, vocab_size=32000, max_seq_len=2048, tie_embeddings=True),
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=5632, vocab_size=32000, max_seq_len=2048),
    # Published architectures.
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000, max_seq_len=4096),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, vocab_size=32000, max_seq_len=4096),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=32000, max_seq_len=4096),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    # meta-llama/Llama-3.1-8B, Llama-3.2-1B, Llama-3.2-3B
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, max_seq_len=131072,
                             rope_theta=500000.0, rope_scaling=_llama3(8.0)),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256, max_seq_len=131072,
                             rope_theta=500000.0, rope_scaling=_llama3(32.0), tie_embeddings=True),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, vocab_size=128256, max_seq_len=131072,
                             rope_theta=500000.0, rope_scaling=_llama3(32.0), tie_embeddings=True),
    # mistralai/Mistral-7B-v0.1 (v0.2 / v0.3 drop the window: sliding_window null)
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000, max_seq_len=32768,
                            rope_theta=10000.0, sliding_window=4096),
    # Qwen/Qwen2.5-0.5B, -1.5B, -7B: q/k/v biases
    "qwen2.5-0.5b": _qwen(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, vocab_size=151936, max_seq_len=32768,
                          tie_embeddings=True, qkv_bias=True),
    "qwen2.5-1.5b": _qwen(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, ffn_dim=8960, vocab_size=151936, max_seq_len=32768,
                          tie_embeddings=True, qkv_bias=True),
    "qwen2.5-7b": _qwen(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, vocab_size=152064, max_seq_len=32768,
                        qkv_bias=True),
    # Qwen/Qwen3-0.6B, -4B, -8B: q/k norms, head_dim 128
    "qwen3-0.6b": _qwen(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_dim=3072, vocab_size=151936,
                        max_seq_len=40960, tie_embeddings=True, qk_norm=True),
    "qwen3-4b": _qwen(dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=9728, vocab_size=151936,
                      max_seq_len=40960, tie_embeddings=True, qk_norm=True),
    "qwen3-8b": _qwen(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=12288, vocab_size=151936,
                      max_seq_len=40960, qk_norm=True),
    # google/gemma-2-2b, gemma-2-9b
    "gemma2-2b": _gemma(26, 4096, 2, dim=2304, n_heads=8, n_kv_heads=4, ffn_dim=9216, vocab_size=256000),
    "gemma2-9b": _gemma(42, 4096, 2, dim=3584, n_heads=16, n_kv_heads=8, ffn_dim=14336, vocab_size=256000),
    # google/gemma-3-270m, gemma-3-1b-pt, gemma-3-4b-pt (its text_config; 4B+ scale the global RoPE linearly by 8)
    "gemma3-270m": _gemma(18, 512, 6, dim=640, n_heads=4, n_kv_heads=1, ffn_dim=2048, vocab_size=262144, max_seq_len=32768),
    "gemma3-1b": _gemma(26, 512, 6, dim=1152, n_heads=4, n_kv_heads=1, ffn_dim=6912, vocab_size=262144, max_seq_len=32768),
    "gemma3-4b": _gemma(34, 1024, 6, dim=2560, n_heads=8, n_kv_heads=4, ffn_dim=10240, vocab_size=262208, max_seq_len=131072,
                        rope_scaling=RopeScaling("linear", 8.0)),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv / gate_up on disk (split in our model), a 2047-token window
    "phi3-mini": ModelArgs(dim=3072, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=8192, vocab_size=32064, max_seq_len=4096,
                           rope_theta=10000.0, sliding_window=2047),
}

# Published parameter counts (the safetensors total the Hub shows on each model page, which the
# model cards round: Llama 3.2 1B "1.23B", Qwen2.5-7B "7.61B", ...), for the test that holds the
# presets to them.
PUBLISHED_PARAMS: dict[str, int] = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "smollm2-135m": 134_515_008,
    "llama3.1-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma3-270m": 268_098_176,
    "gemma3-1b": 999_885_952,
    # gemma-3-4b-pt's 4,300,079,472 less its SigLIP vision tower (416,866,032) and the multimodal
    # projector (2,950,272): the text model alone (the Gemma 3 report: 675M embedding + 3,209M
    # non-embedding, rounded)
    "gemma3-4b": 3_880_263_168,
    "phi3-mini": 3_821_079_552,
}
