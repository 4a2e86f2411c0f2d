"""Named model sizes. Small presets are for training here; the real-model presets carry the
published architectures (shapes only) so the planner can reason about them on the meta device."""

from __future__ import annotations

from shoestring.models.llama import ModelArgs

PRESETS: dict[str, ModelArgs] = {
    # For tests and smoke benchmarks: trains in milliseconds per step.
    "micro": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512, max_seq_len=128, tie_embeddings=True),
    # Trainable on a laptop CPU. vocab_size is replaced by the tokenizer's when training.
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688, vocab_size=4096, max_seq_len=512, tie_embeddings=True),
    "small": ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1376, vocab_size=8192, max_seq_len=1024, tie_embeddings=True),
    "medium": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, vocab_size=32000, max_seq_len=2048, tie_embeddings=True),
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=5632, vocab_size=32000, max_seq_len=2048),
    # Published architectures (Meta Llama 2 / 3, Mistral 7B v0.1, SmolLM2).
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, vocab_size=49152, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, vocab_size=32000, max_seq_len=4096),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824, vocab_size=32000, max_seq_len=4096),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=32000, max_seq_len=4096),
    "llama3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    "llama3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256, max_seq_len=8192, rope_theta=500000.0),
    "mistral-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000, max_seq_len=32768, rope_theta=10000.0),
}

# Published parameter counts, for the test that holds the presets to them.
PUBLISHED_PARAMS: dict[str, int] = {
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "smollm2-135m": 134_515_008,
}
