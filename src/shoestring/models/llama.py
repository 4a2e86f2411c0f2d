"""A Llama-style decoder (RMSNorm, rotary embeddings, gated MLP, grouped-query attention) with
the switches that make it Mistral, Qwen2/2.5, Qwen3, Gemma 2/3 or Phi-3 as well.

The model is plain: it knows nothing of precision, checkpointing, compilation or devices. Those
levers are applied from outside (`shoestring.levers`, `shoestring.parallel`). One kernel choice
below it looks at how it is run: on CPU, attention traced by `torch.compile` takes a blocked
backward instead of SDPA's slow flash backward (`torch.compiler.is_compiling()`,
`shoestring.models.attention`); the model neither compiles itself nor is told that it is compiled. Parameter names
follow Hugging Face's causal LMs (without their `model.` prefix) and RoPE uses the same
rotate-half layout, so a checkpoint of a supported family maps onto this class by renaming keys
(and splitting Phi-3's fused projections): `shoestring.models.hf`.

Each family's difference is one field of `ModelArgs`, default off:

| switch                          | what it changes                                      | families          |
|---------------------------------|------------------------------------------------------|-------------------|
| `head_dim`                      | heads x head_dim need not equal dim                  | Gemma, Qwen3      |
| `rope_scaling`                  | llama3 / linear / yarn frequencies (models/rope.py)  | Llama 3.1+, Qwen  |
| `qkv_bias`, `o_bias`, `mlp_bias`| biases on those projections                          | Qwen2, some Llamas|
| `qk_norm`                       | RMSNorm over each head's q and k, before RoPE        | Qwen3, Gemma 3    |
| `norm_offset`                   | norms scale by (offset + weight): Gemma stores w - 1 | Gemma             |
| `post_norms`                    | norms after attention and MLP, and before the MLP    | Gemma 2/3         |
| `embed_scale`                   | embeddings times sqrt(dim)                           | Gemma             |
| `mlp_act`                       | silu (SwiGLU) or gelu_tanh (GeGLU)                   | Gemma: GeGLU      |
| `attn_scale`                    | softmax scale other than 1/sqrt(head_dim)            | Gemma             |
| `attn_softcap`, `final_softcap` | c * tanh(x / c) on attention scores / output logits  | Gemma 2           |
| `sliding_window`, `sliding_layers` | local attention on all or some layers             | Mistral, Phi-3, Gemma |
| `local_rope_theta`              | RoPE base of the sliding layers                      | Gemma 3           |

`forward` returns the final hidden states, not logits: the loss is computed from them by
`shoestring.models.loss`, in chunks, so the `batch x seq x vocab` tensor never exists at once
(`final_softcap` is applied there too). Given `doc`, a (batch, seq) document id per token (a
packed row of instruction examples), each document is computed as if alone in its row: RoPE
positions restart at its first token and its queries see only its own keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shoestring.models.attention import causal_attention
from shoestring.models.rope import RopeScaling, apply_rope, attention_factor, document_positions, inv_freq, rope_tables

MLP_ACTS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    head_dim: int = 0  # 0: dim // n_heads
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    post_norms: bool = False
    embed_scale: bool = False
    mlp_act: str = "silu"
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int = 0  # 0: every layer attends to the whole row
    sliding_layers: tuple[bool, ...] = ()  # per layer; empty: every layer slides (when sliding_window)
    local_rope_theta: float | None = None  # sliding layers' RoPE base (plain RoPE); None: the global one

    def __post_init__(self) -> None:
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act {self.mlp_act!r}: one of {', '.join(MLP_ACTS)}")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.n_layers} layers")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def window(self, layer: int) -> int:
        """Layer `layer`'s sliding window in tokens (0: global attention)."""
        if not self.sliding_window or (self.sliding_layers and not self.sliding_layers[layer]):
            return 0
        return self.sliding_window

    def is_local(self, layer: int) -> bool:
        """Whether the layer uses the local RoPE tables (a sliding layer of a model that has them)."""
        return self.local_rope_theta is not None and self.window(layer) > 0

    def norms_per_block(self) -> int:
        return 4 if self.post_norms else 2

    def block_vectors(self) -> int:
        """Elements of one block's 1-d parameters: norm weights and biases."""
        n = self.norms_per_block() * self.dim + (2 * self.head_dim if self.qk_norm else 0)
        n += (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + self.dim * self.o_bias
        return n + (2 * self.ffn_dim + self.dim) * self.mlp_bias

    def block_matrices(self) -> int:
        """Elements of one block's weight matrices."""
        return self.dim * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.dim + 3 * self.dim * self.ffn_dim

    def num_params(self) -> int:
        """Parameters of the model built from these args (a tied head counted once)."""
        blocks = self.n_layers * (self.block_matrices() + self.block_vectors())
        return blocks + self.dim + self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of the attention scores and values (forward + backward):
        12 * heads * head_dim per key a query sees, causal-unmasked as in PaLM appendix B: the
        whole row, or the window on a sliding layer."""
        sliding = 0 if not self.sliding_window else sum(self.sliding_layers) if self.sliding_layers else self.n_layers
        keys = (self.n_layers - sliding) * seq_len + sliding * min(seq_len, self.sliding_window)
        return 12 * self.q_dim * keys

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 * matmul params (the
        head's included, tied or not; norm weights and biases do no matmul) + attention."""
        return 6 * (self.n_layers * self.block_matrices() + self.vocab_size * self.dim) + self.attention_flops_per_token(seq_len)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight); Gemma's weights are stored as deviations from 1 (offset 1)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight.float() + self.offset).to(self.weight.dtype) if self.offset else self.weight
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale, self.window, self.softcap = args.attn_scale, args.window(layer), args.attn_softcap
        self.q_proj = nn.Linear(args.dim, args.q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.q_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        y = causal_attention(q, k, v, self.scale, self.window, self.softcap, doc)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU (silu) or GeGLU (tanh-approximated gelu)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)
        self.gelu = args.mlp_act == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """One transformer layer: the unit that checkpointing, compile and sharding wrap.

    Without `post_norms`: x + attn(norm(x)), then + mlp(norm(.)), where the second norm is named
    `post_attention_layernorm` as in Llama. With them (Gemma 2/3), each sub-block's output is
    normed before the residual add, and the norms carry Gemma's names:
    x + post_attention_layernorm(attn(input_layernorm(x))), then
    + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(.)))."""

    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        norm = lambda: RMSNorm(args.dim, args.norm_eps, args.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = norm()
        if args.post_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(args)
        self.post_norms = args.post_norms

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        if not self.post_norms:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, doc)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, doc))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if not cap else torch.tanh(x / cap) * cap


class Llama(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not persistent: derived from args, so checkpoints hold only learned weights. The cos/sin
        # tables are made per forward from these (seq x head_dim, cheap), not kept for max_seq_len.
        half = args.head_dim // 2
        self.register_buffer("inv_freq", torch.empty(half), persistent=False)
        if args.local_rope_theta is not None:
            self.register_buffer("inv_freq_local", torch.empty(half), persistent=False)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2/Llama-style init; residual output projections scaled by depth; biases zero; norm
        weights at their identity (1, or 0 with Gemma's offset). Callable after building on the
        meta device and materialising with `to_empty`."""
        if self.args.tie_embeddings:  # `to_empty` materialises shared parameters separately
            self.lm_head.weight = self.embed_tokens.weight
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.constant_(p, 1.0 - self.args.norm_offset)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, std=std)
        a = self.args
        self.inv_freq.copy_(inv_freq(a.head_dim, a.rope_theta, a.rope_scaling, self.inv_freq.device))
        if a.local_rope_theta is not None:
            self.inv_freq_local.copy_(inv_freq(a.head_dim, a.local_rope_theta, None, self.inv_freq.device))

    def rope(self, seq_len: int, local: bool = False, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables of the global layers, or of the local ones: (seq_len, head_dim) for
        positions 0..seq_len-1, or (batch, 1, seq, head_dim) for (batch, seq) `positions`."""
        if positions is None:
            positions = torch.arange(seq_len, device=self.inv_freq.device)
        else:
            positions = positions[:, None]
        if local:
            return rope_tables(self.inv_freq_local, positions)
        return rope_tables(self.inv_freq, positions, attention_factor(self.args.rope_scaling))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.args.embed_scale:  # sqrt(dim) rounded to the embedding's dtype, as Gemma does
            x = x * torch.tensor(math.sqrt(self.args.dim), dtype=x.dtype)
        return x

    def forward(self, tokens: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> final hidden states (batch, seq, dim); `doc` (batch, seq): the
        document of each token in a packed row (contiguous runs), None for one per row."""
        t = tokens.shape[1]
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.args.max_seq_len}")
        positions = None if doc is None else document_positions(doc)
        tables = {False: self.rope(t, positions=positions)}
        if self.args.local_rope_theta is not None:
            tables[True] = self.rope(t, local=True, positions=positions)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, *tables[self.args.is_local(i)], doc)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(hidden), self.args.final_softcap)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied weights
        if exclude_embedding:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        return self.args.flops_per_token(seq_len)
