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
* `nf4` (QLoRA) stores every frozen linear of the blocks as 4-bit NormalFloat (torchao's
  `NF4Tensor`: 64-element absmax blocks whose scales are themselves quantised to int8), about
  0.52 byte per weight. Every block linear, targeted or not, is frozen, so all of them are
  quantised, as in QLoRA and torchtune. The embedding, the head and the norms stay in
  `base_dtype`: the embedding is a lookup (no matmul to fuse a dequantisation into) and the
  head's error would land on every logit; QLoRA keeps both in 16 bits too. In forward each
  weight is dequantised into `base_dtype` just for its matmul and freed; backward dequantises
  it again (`NF4LinearFn`): nothing 16-bit is kept between them.
* No peft: its wrappers rename base keys and own `requires_grad` bookkeeping, which would sit
  between our strategies and the parameters; the module here is ~100 lines and tested against
  the merged-weight math.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

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
    base_dtype: torch.dtype = torch.float32  # the frozen weights' dtype (NF4's dequantised dtype)
    nf4: bool = False  # the blocks' frozen linears held as NF4 (QLoRA)

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
        self.active = True  # False: the base linear alone (`adapters_off`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_linear(x, self.weight, self.bias)
        if self.merged or not self.active:
            return out
        return out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update `scaling * B A`, in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (for export or adapter-free inference)."""
        if is_nf4(self.weight):
            raise ValueError("an NF4 weight cannot take the update in place (it would be re-quantised): "
                             "merge into a dequantised copy (merged_state_dict)")
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
    other parameters, and cast them to `settings.base_dtype`; with `settings.nf4`, quantise the
    blocks' linears. Returns the wrapped module names."""
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
    if settings.nf4:
        quantize_block_linears(model)
    return wrapped


# ---- NF4: the 4-bit frozen base (QLoRA) ---------------------------------------------------------
NF4_BLOCK = 64  # weights per absmax block (QLoRA's and torchao's)
NF4_SCALER_BLOCK = 256  # block scales per second-level (double-quantisation) block, at most
NF4_SHARD_ALIGN = 8  # second-level blocks per weight a multiple of this where possible: FSDP2 on 2, 4, 8 ranks
_NF4: type | None = None  # torchao's NF4Tensor, once imported


def nf4_tensor_class() -> type:
    """torchao's NF4Tensor (the `qlora` extra), imported quietly."""
    global _NF4
    if _NF4 is None:
        from shoestring.errors import UserError
        from shoestring.quiet import quiet_imports

        try:
            with quiet_imports():
                from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor
        except ImportError as err:
            raise UserError(f"lora.base_dtype = 'nf4' needs torchao ({err})", "pip install 'shoestring[qlora]'") from None
        _NF4 = NF4Tensor
    return _NF4


def is_nf4(t: torch.Tensor) -> bool:
    return _NF4 is not None and isinstance(t, _NF4)


def nf4_scaler_block(n_blocks: int) -> int:
    """Block scales per double-quantisation block: the largest divisor of `n_blocks` up to 256
    (torchao needs a divisor; 256 is its default) that leaves a multiple of NF4_SHARD_ALIGN
    second-level blocks (FSDP2 splits each of the NF4 tensor's parts evenly over the ranks),
    else the largest divisor."""
    divisors = [d for d in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1) if n_blocks % d == 0]
    return next((d for d in divisors if (n_blocks // d) % NF4_SHARD_ALIGN == 0), divisors[0])


def nf4_quantisable(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and math.prod(shape) % NF4_BLOCK == 0


def nf4_bytes(shape: tuple[int, ...], itemsize: int, shards: int = 1) -> int:
    """Bytes an NF4Tensor of `shape` holds (quantised from `itemsize`-byte elements), per rank when
    FSDP2 splits it `shards` ways: the 4-bit codes, one int8 scale per 64-weight block, one
    `itemsize` factor per block of scales (those three split), and on every rank the scales' mean
    and the 16-value code table."""
    numel = math.prod(shape)
    blocks = numel // NF4_BLOCK
    return (numel // 2 + blocks + blocks // nf4_scaler_block(blocks) * itemsize) // shards + (1 + 16) * itemsize


def nf4_splits(shape: tuple[int, ...], shards: int) -> bool:
    """Whether FSDP2 can split an NF4 weight `shards` ways: whole rows, whole 64-weight blocks and
    whole blocks of scales on every rank (torchao splits its three parts evenly)."""
    blocks = math.prod(shape) // NF4_BLOCK
    return shape[0] % shards == 0 and blocks % shards == 0 and (blocks // nf4_scaler_block(blocks)) % shards == 0


def to_nf4(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    blocks = weight.numel() // NF4_BLOCK
    return nf4_tensor_class().from_tensor(weight.detach().to(dtype).contiguous(), NF4_BLOCK, nf4_scaler_block(blocks))


def dequantize_nf4(w: torch.Tensor) -> torch.Tensor:
    """torchao's `get_original_weight`, bit for bit, in one gather: a 256-row table gives each
    byte's two code values, scaled per 64-weight block. Its transient is ~3x smaller (int32 byte
    indices, no int64 pairs) and on this CPU it ran 2.4-3.6x faster at 4096 x 4096, more at
    SmolLM2's shapes (contended timings)."""
    pairs = torch.stack([w.nf4.repeat_interleave(16), w.nf4.repeat(16)], dim=1)
    sbs = w.scaler_block_size
    scales = (w.quantized_scalers.view(-1, sbs) / w.quantization_factor.unsqueeze(-1)).flatten().to(w.dtype) + w.scaler_mean
    values = F.embedding(w.quantized_data.int(), pairs).view(-1, w.block_size)
    return values.mul_(scales.unsqueeze(-1)).view(w.shape)


def dequantized(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: an NF4 weight dequantised, anything else as it is."""
    return dequantize_nf4(t) if is_nf4(t) else t


class NF4LinearFn(torch.autograd.Function):
    """`x W^T` with W in NF4: dequantised for the matmul and freed; backward dequantises it again
    (the base is frozen, so only the input's gradient is needed and nothing 16-bit is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, dequantize_nf4(weight))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad @ dequantize_nf4(weight).to(grad.dtype), None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not is_nf4(weight):
        return F.linear(x, weight, bias)
    out = NF4LinearFn.apply(x, weight)
    return out if bias is None else out + bias


class NF4Linear(nn.Linear):
    """A frozen block linear LoRA does not target, its weight in NF4 (same parameter names)."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)


def quantize_block_linears(model: nn.Module) -> None:
    """Every linear inside the blocks (`model.layers`) whose weight divides into 64-weight blocks
    gets an NF4 weight, dequantised into the dtype it was held in (the base dtype)."""
    for block in model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear) or not nf4_quantisable(tuple(child.weight.shape)):
                    continue
                if type(child) is nn.Linear:
                    child = NF4Linear(child)
                    setattr(parent, name, child)
                child.weight = nn.Parameter(to_nf4(child.weight, child.weight.dtype), requires_grad=False)


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model, exactly, for the duration (an unmerged update is left out)."""
    modules = lora_modules(model)
    for m in modules:
        m.active = False
    try:
        yield
    finally:
        for m in modules:
            m.active = True


def is_adapter_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ADAPTER_KEYS


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base state dict with every update folded in (model itself left unchanged)."""
    merged = {}
    deltas = {name: m.delta() for name, m in model.named_modules() if isinstance(m, LoRALinear) and not m.merged}
    for key, value in model.state_dict().items():
        if is_adapter_key(key):
            continue
        owner, value = key.removesuffix(".weight"), dequantized(value)
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
    adapter_bytes = 2 if pure else 4
    return LoRAEstimate(
        trainable_params=trainable, frozen_params=total,
        params=frozen_base_bytes(args, settings, precision) + trainable * adapter_bytes,
        grads=trainable * adapter_bytes, optimizer=trainable * 8, master=trainable * 4 if pure else 0,
    )


def frozen_base_bytes(args: ModelArgs, settings: LoRASettings, precision: str = "fp32", shards: int = 1) -> int:
    """Bytes of the frozen base on one rank when every tensor is split `shards` ways (FSDP2):
    `base_dtype` elements (bf16 under bf16-pure), the blocks' linears in NF4 with `settings.nf4`
    (counted as torchao stores them: `nf4_bytes`)."""
    itemsize = 2 if precision == "bf16-pure" else settings.base_dtype.itemsize
    quantised = _quantised_shapes(args, settings)
    plain = args.num_params() - args.n_layers * sum(o * i for o, i in quantised)
    return -(-plain * itemsize // shards) + args.n_layers * sum(nf4_bytes(s, itemsize, shards) for s in quantised)


def _quantised_shapes(args: ModelArgs, settings: LoRASettings) -> list[tuple[int, int]]:
    """(out, in) of one block's linears held in NF4."""
    return [(o, i) for i, o in target_shapes(args).values() if settings.nf4 and nf4_quantisable((o, i))]


def nf4_dequant_bytes(args: ModelArgs, settings: LoRASettings, compiled: bool) -> int:
    """Memory traffic of one dequantisation pass over every NF4 weight (forward, backward and a
    checkpointed block's recompute each make one): memory-bound work. Eager, per weight: bytes
    to int32 indices (read 1/2, write 2), the table gather (read 2, write d), the in-place
    scaling (read d, write d), d the base dtype's size; compiled, one fused kernel reads the
    codes and writes the weight (1/2 + d). The int8 scales are 1/64 of that and left out."""
    d = settings.base_dtype.itemsize
    per_weight = 0.5 + d if compiled else 0.5 + 2 + 2 + 3 * d
    return int(args.n_layers * sum(o * i for o, i in _quantised_shapes(args, settings)) * per_weight)


def nf4_working_bytes(args: ModelArgs, settings: LoRASettings) -> int:
    """The transient of one dequantisation, the largest weight's: its int32 byte indices (2 bytes
    a weight) and the dequantised weight, alive while its matmul runs."""
    return max((o * i * (2 + settings.base_dtype.itemsize) for o, i in _quantised_shapes(args, settings)), default=0)


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
