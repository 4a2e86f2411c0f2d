"""`shoestring train CONFIG --auto`: the levers a config leaves unset, chosen by the planner for
this machine.

A lever counts as set when the config file or a `--set` names it (pydantic's
`model_fields_set`) with a value other than "auto"; those are fixed in the search, everything
else is the cheapest plan's choice (its precision: the trainer's `auto` rule for this device). The choice comes back as `--set` overrides, so the launcher hands every rank the same
resolved config (the probe and the search run once, before the ranks start).
"""

from __future__ import annotations

from shoestring.config import Config
from shoestring.errors import UserError
from shoestring.plan.search import Plan, Request, describe, require_fit, search

RUNNABLE = ("single", "ddp", "fsdp2", "yafsdp")  # deepspeed is an optional extra: only when the config asks for it


def _fixed(cfg: Config, ranks: int) -> dict[str, object]:
    fixed: dict[str, object] = {}
    if "mode" in cfg.precision.model_fields_set and cfg.precision.mode != "auto":
        fixed["precision"] = cfg.precision.mode
    if "mode" in cfg.checkpointing.model_fields_set:
        fixed["checkpointing"] = cfg.checkpointing.mode
    p = cfg.parallel
    if ranks == 1:
        fixed["strategy"] = "single"
    elif "strategy" in p.model_fields_set:
        fixed["strategy"] = p.strategy
        if p.strategy == "deepspeed" and "zero_stage" in p.model_fields_set:
            fixed["zero_stage"] = p.zero_stage
    if "reshard_after_forward" in p.model_fields_set and isinstance(p.reshard_after_forward, bool):
        fixed["reshard_after_forward"] = p.reshard_after_forward
    fixed["offload"] = False  # this machine's host memory is the device memory (CPU) or not worth it here
    if "grad_accum" in cfg.train.model_fields_set:
        fixed["grad_accum"] = cfg.train.grad_accum
        fixed["micro_batch"] = max(1, cfg.train.batch_size // (cfg.train.grad_accum * ranks))
    return fixed


def plan_for(cfg: Config, ranks: int) -> Plan:
    """The cheapest plan on `local:<ranks>` that keeps every lever the config set."""
    if cfg.model.source:
        raise UserError("--auto plans model presets only, not model.source checkpoints",
                        "set the levers (precision, checkpointing, parallel) in the config instead")
    if cfg.train.batch_size % ranks:
        raise UserError(f"train.batch_size ({cfg.train.batch_size}) does not divide over {ranks} ranks",
                        "make it a multiple of --nproc")
    seq, batch = cfg.data.seq_len, cfg.train.batch_size
    lora = cfg.lora
    req = Request(cfg.model.preset, tokens=float(cfg.train.steps * batch * seq), hardware=(f"local:{ranks}",),
                  mode="lora" if lora.enabled else "pretrain", seq_len=seq, global_batch_tokens=batch * seq,
                  lora_rank=lora.rank, lora_targets=tuple(lora.targets), lora_base_dtype=lora.base_dtype,
                  fixed=tuple(_fixed(cfg, ranks).items()), ranks=ranks, compile=cfg.train.compile)
    result = search(req)
    result.plans = [p for p in result.plans if p.levers.strategy in RUNNABLE or "strategy" in dict(req.fixed)]
    require_fit(result)
    return result.plans[0]


def _grad_accum(plan: Plan, per_rank: int) -> int:
    """The fewest accumulation steps that divide the rank's batch into micro-batches no larger
    than the plan's."""
    return next(a for a in range(1, per_rank + 1) if per_rank % a == 0 and per_rank // a <= plan.levers.micro_batch)


def auto_overrides(cfg: Config, ranks: int) -> tuple[list[str], Plan]:
    """`--set` overrides for every lever the config left unset, and the plan they come from."""
    plan = plan_for(cfg, ranks)
    lv, fixed = plan.levers, _fixed(cfg, ranks)
    out = []
    if "precision" not in fixed:
        out.append(f"precision.mode={lv.precision}")
    if "checkpointing" not in fixed:
        out.append(f'checkpointing.mode="{lv.checkpointing}"')
    if "strategy" not in fixed:
        out.append(f"parallel.strategy={lv.strategy}")
        if lv.strategy == "fsdp2":
            out.append(f"parallel.reshard_after_forward={str(lv.reshard_after_forward).lower()}")
            if lv.shard_group:
                out.append(f"parallel.shard_group={lv.shard_group}")
        if lv.strategy == "deepspeed":
            out.append(f"parallel.zero_stage={lv.zero_stage}")
    if "grad_accum" not in fixed:
        out.append(f"train.grad_accum={_grad_accum(plan, cfg.train.batch_size // ranks)}")
    return out, plan


def describe_choice(plan: Plan, chosen: list[str]) -> str:
    m = plan.memory
    return (f"auto plan: {describe(plan)}: predicted peak {m.total / 2**30:.2f} of {plan.device.memory_bytes / 2**30:.1f} GiB "
            f"per rank, {plan.tokens_per_s:,.0f} tokens/s; setting {', '.join(chosen) or 'nothing (all levers were set)'}")
