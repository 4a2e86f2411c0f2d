"""LoRA lever: train a low-rank update `W + (alpha/r) B A` of chosen linears, the base frozen.

Applied first among the levers (LoRA -> checkpointing -> compile -> strategy) because it changes
the module structure the others wrap, trace and shard.

Design, and why:
* A target `nn.Linear` is replaced by a `LoRALinear` that *keeps the same `weight` Parameter*,
  so the base's state-dict keys do not move (`layers.0.self_attn.q_proj.weight`) and HF export is
  the same key mapping; the adapters are `...q_proj.lora_A` (r x in) and `...q_proj.lora_B`
  (out x r), B zero-initialised so training starts from the base model exactly.
* Every base parameter gets `requires_grad=False`. That is the whole contract with the
  strategies: SingleDevice/DDP build the optimizer over `requires_grad` params only, and FSDP2 /
  YaFSDP-style sharding give frozen shards no gradient buffer or optimizer state, so no strategy
  needs to know LoRA exists.
* `base_dtype = "bf16"` stores the frozen weights in bf16 (half their bytes); the adapters stay
  fp32 (or follow `bf16-pure`'s masters), and autocast runs the mixed matmuls.
* No peft: its wrappers rename base keys and own `requires_grad` bookkeeping, which would sit
  between our strategies and the parameters; the module here is ~100 lines and tested against
  the merged-weight math.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shoestring.models.llama import ModelArgs

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_KEYS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    base_dtype: torch.dtype = torch.float32

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """`x W^T + scaling * dropout(x) A^T B^T`; `weight` is the original (frozen) Parameter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / peft initialise A
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update `scaling * B A`, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (for export or adapter-free inference)."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, settings: LoRASettings) -> list[str]:
    """Replace every target linear (matched by its attribute name) with a `LoRALinear`, freeze all
    other parameters, and cast them to `settings.base_dtype`. Returns the wrapped module names."""
    unknown = set(settings.targets) - set(ALL_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
        p.data = p.data.to(settings.base_dtype)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in settings.targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, settings.rank, settings.alpha, settings.dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no linear layer named {settings.targets} in the model")
    return wrapped


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ADAPTER_KEYS


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base state dict with every update folded in (model itself left unchanged)."""
    merged = {}
    deltas = {name: m.delta() for name, m in model.named_modules() if isinstance(m, LoRALinear) and not m.merged}
    for key, value in model.state_dict().items():
        if is_adapter_key(key):
            continue
        owner = key.removesuffix(".weight")
        merged[key] = (value.float() + deltas[owner]).to(value.dtype) if owner in deltas and key.endswith(".weight") else value
    return merged


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


# ---- cost ---------------------------------------------------------------------------------------
def target_shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear LoRA can target, in one block (the planner uses it too)."""
    q, kv = args.q_dim, args.kv_dim
    return {"q_proj": (args.dim, q), "k_proj": (args.dim, kv), "v_proj": (args.dim, kv), "o_proj": (q, args.dim),
            "gate_proj": (args.dim, args.ffn_dim), "up_proj": (args.dim, args.ffn_dim), "down_proj": (args.ffn_dim, args.dim)}


@dataclass(frozen=True)
class LoRAEstimate:
    """Model-state bytes on one unsharded replica (AdamW, 2 fp32 states per trainable param)."""

    trainable_params: int
    frozen_params: int
    params: int  # bytes of frozen + adapter weights
    grads: int  # adapters only
    optimizer: int
    master: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.master


def estimate(args: ModelArgs, settings: LoRASettings, precision: str = "fp32") -> LoRAEstimate:
    """What LoRA holds, as a function of the model's shapes, the rank and the targets.

    `precision` is the run's precision mode: under `bf16-pure` every weight is bf16 and the
    adapters get fp32 masters; otherwise the base is `settings.base_dtype` and adapters fp32.
    Activations are not included here: the base's are the checkpointing lever's estimate, the
    adapters' own are `saved_activation_bytes`."""
    shapes = target_shapes(args)
    trainable = args.n_layers * sum(settings.rank * (i + o) for name, (i, o) in shapes.items() if name in settings.targets)
    total = args.num_params()
    pure = precision == "bf16-pure"
    base_bytes = 2 if pure else settings.base_dtype.itemsize
    adapter_bytes = 2 if pure else 4
    return LoRAEstimate(
        trainable_params=trainable, frozen_params=total,
        params=total * base_bytes + trainable * adapter_bytes,
        grads=trainable * adapter_bytes, optimizer=trainable * 8, master=trainable * 4 if pure else 0,
    )


def saved_activation_bytes(args: ModelArgs, settings: LoRASettings, tokens: int, precision: str,
                           compiled: bool = False) -> int:
    """Bytes one block's adapters save for backward beyond the base linears' own, for `tokens`
    tokens. Each adapter saves A's output (tokens x rank) for B; under autocast (`bf16`/`fp16`)
    A also casts its input to the low dtype separately from the base matmul (autocast caches
    weight casts only), so every target keeps one more copy of its input; dropout keeps its
    output and mask. Measured on `small` (benchmarks/planner_accuracy.py): ~150 MiB for 7
    targets at 2048 tokens in bf16, which these terms account for. Under `torch.compile`
    (`compiled`) the block's graph casts each input once for the base matmul and the adapter
    together: only A's outputs remain (counted, same case: 3.5 MiB for the 56 adapters)."""
    autocast = precision in ("bf16", "fp16") and not compiled
    elem = 4 if precision == "fp32" else 2
    total = 0
    for name, (fan_in, _) in target_shapes(args).items():
        if name in settings.targets:
            total += tokens * settings.rank * elem
            total += tokens * fan_in * 2 if autocast else 0
            total += tokens * fan_in * (elem + 1) if settings.dropout > 0 else 0
    return total
