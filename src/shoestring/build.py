"""Turn a config into a ready-to-train strategy. The levers are applied here and only here, in
a fixed order: activation checkpointing -> compile -> data-parallel strategy (with precision).
Checkpointing wraps a block's forward, compile then traces the wrapped forward, and the strategy
(which may shard or cast parameters) comes last so it sees the final module structure."""

from __future__ import annotations

import torch

from shoestring.config import Config
from shoestring.levers.checkpointing import apply_checkpointing
from shoestring.levers.compile import compile_blocks
from shoestring.levers.precision import PrecisionPolicy
from shoestring.models import Llama, build_model, preset_args
from shoestring.parallel import OptimizerSettings, SingleDevice, Strategy


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        from shoestring.errors import UserError

        raise UserError("train.device = 'cuda' but no CUDA device is available", "set train.device = 'auto' or 'cpu'")
    return torch.device(choice)


def precision_policy(cfg: Config) -> PrecisionPolicy:
    p = cfg.precision
    return PrecisionPolicy(p.mode, init_scale=p.init_scale, growth_interval=p.growth_interval)


def optimizer_settings(cfg: Config) -> OptimizerSettings:
    t = cfg.train
    return OptimizerSettings(lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2), grad_clip=t.grad_clip)


def build_plain_model(cfg: Config, vocab_size: int, device: torch.device) -> Llama:
    """The model alone, initialised from the run's seed."""
    args = preset_args(cfg.model.preset, vocab_size=cfg.model.vocab_size or vocab_size, max_seq_len=cfg.model.max_seq_len)
    torch.manual_seed(cfg.train.seed)
    return build_model(args, device)


def build_strategy(cfg: Config, vocab_size: int, device: torch.device) -> Strategy:
    model = build_plain_model(cfg, vocab_size, device)
    apply_checkpointing(model, cfg.checkpointing.mode)
    if cfg.train.compile:
        compile_blocks(model)
    return SingleDevice(model, precision_policy(cfg), optimizer_settings(cfg), device)
