"""Turn a config into a ready-to-train strategy. The levers are applied here and only here, in
a fixed order: LoRA -> activation checkpointing -> compile -> data-parallel strategy (with
precision). LoRA replaces modules and freezes the base, so it goes first: the later levers must
see the final module structure. Checkpointing wraps a block's forward, compile then traces the
wrapped forward, and the strategy (which may shard or cast parameters) comes last. Before all of
them, the host-memory lever sets the process's allocator (it is the process's, not the model's).

The config's `auto` settings (precision, compile, host memory) are decided first, by
`resolve_auto`, from the device's measured facts (the probe's, which the caller passes) and the
run's ranks: a strategy is built from a resolved config only, so what ran is what the run's
config.json says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shoestring import dist
from shoestring.config import Config, build_config
from shoestring.errors import UserError
from shoestring.levers import compile as compile_lever
from shoestring.levers import host_memory
from shoestring.levers.checkpointing import apply_checkpointing
from shoestring.levers.lora import LoRASettings, apply_lora, is_nf4, nf4_splits
from shoestring.levers.precision import Choice, DeviceFacts, PrecisionPolicy, resolve_precision, slow_warning
from shoestring.models import Llama, build_model, preset_args
from shoestring.models.hf import HFSource, load_llama
from shoestring.parallel import OptimizerSettings, Strategy, strategy_class
from shoestring.parallel.cost import shard_group_size


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is available", "set train.device = 'auto' or 'cpu'")
    return torch.device(choice)


@dataclass(frozen=True)
class Resolved:
    """A config with its `auto` settings decided for one device, and why."""
    cfg: Config
    precision: Choice
    compile: Choice
    host_memory: Choice
    warning: str | None  # the precision runs its matmuls far slower than fp32 here

    def lines(self) -> list[str]:
        """What was chosen, one line each, for the start of a run."""
        return [f"precision: {self.precision.value} ({self.precision.reason})",
                f"compile: {'on' if self.compile.value else 'off'} ({self.compile.reason})",
                f"host memory: {'kept' if self.host_memory.value else 'given back'} ({self.host_memory.reason})"]


def resolve_auto(cfg: Config, facts: DeviceFacts, saved: dict[str, Any] | None = None) -> Resolved:
    """`precision.mode`, `train.compile` and `train.keep_host_memory` decided on `facts` and this
    run's ranks: "auto" by the levers' rules, a resumed run (`saved`: the config it ran with)
    keeping the precision it started with unless the config names one, LoRA's bf16-held base
    getting bf16 where the rule says fp32."""
    mode = cfg.precision.mode
    saved_mode = (saved or {}).get("precision", {}).get("mode", "auto")
    if mode != "auto":
        precision = Choice(mode, "set in the config")
    elif saved_mode != "auto":
        precision = Choice(saved_mode, "the mode the resumed run started with")
    else:
        precision = resolve_precision(facts)
        if precision.value == "fp32" and cfg.lora.enabled and cfg.lora.base_dtype == "bf16":
            precision = Choice("bf16", "lora.base_dtype = 'bf16' needs low-precision compute")
    policy = PrecisionPolicy(str(precision.value))
    compiled = compile_lever.decide(cfg.train.compile, facts, policy)
    keep = host_memory.decide(cfg.train.keep_host_memory, dist.world_size())
    tree = cfg.to_dict()
    tree["precision"]["mode"], tree["train"]["compile"] = precision.value, compiled.value
    tree["train"]["keep_host_memory"] = keep.value
    return Resolved(build_config(tree, "resolved config"), precision, compiled, keep, slow_warning(policy.mode, facts))


def precision_policy(cfg: Config) -> PrecisionPolicy:
    p = cfg.precision
    return PrecisionPolicy(p.mode, init_scale=p.init_scale, growth_interval=p.growth_interval)


def optimizer_settings(cfg: Config) -> OptimizerSettings:
    t = cfg.train
    return OptimizerSettings(lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), grad_clip=t.grad_clip)


def lora_settings(cfg: Config, quantize: bool = True) -> LoRASettings:
    """The lever's settings; an NF4 base dequantises into the compute dtype (fp32 under fp32).
    `quantize=False`: the same modules over a plain base (a checkpoint's dequantised weights)."""
    c = cfg.lora
    if c.base_dtype == "nf4":
        dtype = PrecisionPolicy(cfg.precision.mode).compute_dtype
    else:
        dtype = torch.bfloat16 if c.base_dtype == "bf16" else torch.float32
    return LoRASettings(rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=tuple(c.targets), base_dtype=dtype,
                        nf4=quantize and c.base_dtype == "nf4")


def build_plain_model(cfg: Config, vocab_size: int, device: torch.device, source: HFSource | None = None) -> Llama:
    """The model alone: the source's weights, or initialised from the run's seed."""
    if source is not None:
        torch.manual_seed(cfg.train.seed)  # what follows (LoRA's init) draws from the run's seed
        return load_llama(source, device)
    args = preset_args(cfg.model.preset, vocab_size=cfg.model.vocab_size or vocab_size, max_seq_len=cfg.model.max_seq_len)
    torch.manual_seed(cfg.train.seed)
    return build_model(args, device)


def shape_model(cfg: Config, model: Llama, quantize: bool = True) -> None:
    """The levers that change the module structure (a checkpoint is loaded after these).
    `quantize=False` keeps an NF4 base plain (reading a checkpoint back for export)."""
    if cfg.lora.enabled:
        apply_lora(model, lora_settings(cfg, quantize))


def check_parallel(cfg: Config, device: torch.device, world_size: int) -> None:
    """Refuse, before any work, the combinations that cannot run here (config-only ones are
    refused when the config is validated)."""
    p = cfg.parallel
    if world_size > 1 and p.strategy == "single":
        raise UserError(f"{world_size} ranks were started but parallel.strategy = 'single'",
                        "set parallel.strategy to ddp, fsdp2, yafsdp or deepspeed, or start one process")
    offload = (p.strategy == "fsdp2" and p.cpu_offload) or (p.strategy == "deepspeed" and (p.offload_optimizer or p.offload_params))
    if offload and device.type != "cuda":
        raise UserError(f"parallel.strategy = '{p.strategy}' with offload needs a CUDA device: "
                        "on CPU the state already lives in host memory", "turn the offload options off")
    if p.shard_group is not None and p.strategy not in ("fsdp2", "yafsdp"):
        raise UserError(f"parallel.shard_group applies to fsdp2 and yafsdp, not {p.strategy}",
                        "leave parallel.shard_group unset, or use a sharded strategy")
    group = shard_group_size(p.shard_group, world_size, dist.local_world_size())
    raf = p.reshard_after_forward
    if p.strategy == "fsdp2" and not isinstance(raf, bool) and group % raf:
        raise UserError(f"parallel.reshard_after_forward = {raf} does not divide the {group} ranks the state is sharded over",
                        "use true, false or a divisor of the number of ranks (of the shard group)")


def check_nf4_sharding(cfg: Config, model: Llama, world_size: int) -> None:
    """FSDP2 splits each NF4 weight (QLoRA) into whole rows, blocks and blocks of scales per rank."""
    shards = shard_group_size(cfg.parallel.shard_group, world_size, dist.local_world_size())
    if cfg.parallel.strategy != "fsdp2" or shards == 1:
        return
    for name, p in model.named_parameters():
        if is_nf4(p) and not nf4_splits(tuple(p.shape), shards):
            raise UserError(f"FSDP2 cannot split the NF4 weight {name} {tuple(p.shape)} over {shards} ranks "
                            "into whole rows and 64-weight blocks", "use parallel.strategy = 'ddp', or another number of ranks")


def build_strategy(cfg: Config, vocab_size: int, device: torch.device, source: HFSource | None = None) -> Strategy:
    """The strategy for a resolved config (`resolve_auto`)."""
    if "auto" in (cfg.precision.mode, cfg.train.compile):
        raise ValueError("build_strategy needs a resolved config: resolve_auto(cfg, probe.device_facts(device)).cfg")
    check_parallel(cfg, device, dist.world_size())
    cls = strategy_class(cfg.parallel.strategy)  # imported first: a missing extra fails before work
    # Before the model: its buffers and every step's come from the kept heap. Decided again here
    # (the same rule as resolve_auto's) for a config built without resolving it.
    if host_memory.decide(cfg.train.keep_host_memory, dist.world_size()).value:
        host_memory.keep_freed_memory()
    # An NF4 base (QLoRA) is quantised in host memory: its full-precision original, 8x its size,
    # never has to fit on the device.
    host = torch.device("cpu") if cfg.lora.enabled and cfg.lora.base_dtype == "nf4" else device
    model = build_plain_model(cfg, vocab_size, host, source)
    shape_model(cfg, model)
    model.to(device)
    apply_checkpointing(model, cfg.checkpointing.mode)
    check_nf4_sharding(cfg, model, dist.world_size())
    policy = precision_policy(cfg)
    if cfg.train.compile:
        compile_lever.compile_blocks(model, device)
    return cls(model, policy, optimizer_settings(cfg), device, cfg.parallel)
