"""The plan as a table (for people) and as data (`--json`, for programs)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table

from shoestring.plan.search import Plan, Result, cheapest_misses, describe, one_per_option

GiB = 2**30


def _components(p: Plan, top: int = 4) -> str:
    parts = sorted(p.memory.components.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts if v)


def _dollars(cost: float) -> str:
    return f"{cost:,.2f}" if cost < 100 else f"{cost:,.0f}"


def _traffic(p: Plan) -> str:
    b, s = p.step.bytes_by_link, p.step
    return (f"{b.get('intra', 0) / 1e9:,.1f} GB inside nodes and {b.get('inter', 0) / 1e9:,.1f} GB across nodes per device "
            f"per step, {s.comm_total_s:.2f} s of communication ({s.comm_s:.2f} s not hidden)")


def _lost(p: Plan) -> list[str]:
    """The table's cell for interruptions, where priced: expected restarts and what they add
    (steps redone and `run.save_every` only for the winner: more columns would wrap the table)."""
    x = p.interrupted
    return [] if x is None else [f"{x.restarts:.1f}, {x.lost_s / 3600:.1f} h, ${_dollars(x.lost_usd)}"]


def _topology_aware(p: Plan) -> bool:
    return p.levers.shard_group is not None or not isinstance(p.levers.reshard_after_forward, bool)


def why_network(best: Plan, plans: list[Plan]) -> str:
    """The winner's traffic over each link, beside the best plan on the same hardware that
    communicates differently (a flat one when the winner keeps traffic inside nodes, else
    another strategy): why it wins, in bytes over the slow links and the time they take."""
    line = f"network: {best.levers.strategy_label()} sends {_traffic(best)}"
    if _topology_aware(best):
        kind, differs = "sharding flat", lambda p: not _topology_aware(p)
    else:
        kind, differs = "with another strategy", lambda p: p.levers.strategy_label() != best.levers.strategy_label()
    rival = next((p for p in plans if (p.device.key, p.count) == (best.device.key, best.count) and differs(p)), None)
    if rival is not None:
        line += (f"; the best plan {kind}, {rival.levers.strategy_label()} ({rival.levers.precision}, "
                 f"ckpt={rival.levers.checkpointing}, ${_dollars(rival.cost)}), sends {_traffic(rival)}")
    return line


def interruptions_dict(p: Plan) -> dict[str, Any] | None:
    """What interruptions are expected to cost the plan (already inside its wall time and cost)."""
    x = p.interrupted
    if x is None:
        return None
    return {"restarts": x.restarts, "steps_redone": x.steps_redone, "lost_hours": x.lost_s / 3600, "lost_usd": x.lost_usd,
            "save_every": x.save_every, "uninterrupted_hours": p.run_h, "nodes": p.nodes, "mtbf_hours": x.mtbf_s / 3600,
            "checkpoint_bytes_per_node": p.checkpoint_bytes, "checkpoint_write_s": x.write_s}


def interruptions_line(p: Plan) -> str | None:
    x = p.interrupted  # priced only where the plan has its rates
    if x is None:
        return None
    return (f"interruptions: {p.interruptions.per_node_day:g} per node per day on {p.nodes} node(s), one every {x.mtbf_s / 3600:.1f} h: "
            f"expected {x.restarts:.1f} restarts and {x.steps_redone:,.0f} steps redone; with the saves they need, "
            f"+{x.lost_s / 3600:.2f} h and +${_dollars(x.lost_usd)} (counted in wall and $); save every {x.save_every} steps "
            f"(run.save_every = {x.save_every}): {p.checkpoint_bytes / 1e9:,.1f} GB per node, {x.write_s:.0f} s a save")


def plan_dict(p: Plan) -> dict[str, Any]:
    l = p.levers
    return {
        "device": p.device.key, "count": p.count, "precision": l.precision, "lora_base_dtype": l.base_dtype or None,
        "checkpointing": l.checkpointing,
        "strategy": l.strategy, "strategy_label": l.strategy_label(), "zero_stage": l.zero_stage,
        "reshard_after_forward": l.reshard_after_forward, "shard_group": l.shard_group, "offload": l.offload,
        "micro_batch": l.micro_batch, "grad_accum": l.grad_accum, "global_batch_sequences": p.global_batch,
        "seq_len": p.seq_len, "fits": p.fits, "meets_deadline": p.meets_deadline,
        "memory_bytes": {"total": p.memory.total, "capacity": p.device.memory_bytes, **p.memory.components},
        "host_offload_bytes": p.memory.host_bytes,
        "step_s": {"total": p.step.total_s, "compute": p.step.compute_s, "recompute": p.step.recompute_s,
                   "comm_exposed": p.step.comm_s, "comm_total": p.step.comm_total_s, "offload": p.step.offload_s},
        "bytes_sent_per_device_step": p.step.bytes_by_link,
        "tokens_per_s": p.tokens_per_s, "wall_hours": p.wall_h, "cost_usd": p.cost,
        "price_per_device_hour": p.device.hourly(p.spot), "interruptions": interruptions_dict(p),
    }


def result_dict(r: Result, limit: int = 10) -> dict[str, Any]:
    q = r.request
    return {
        "request": {"model": q.model, "tokens": q.tokens, "hardware": list(q.hardware), "mode": q.mode,
                    "seq_len": r.seq_len, "global_batch_tokens": q.global_batch_tokens, "deadline_hours": q.deadline_h,
                    "spot": q.spot, "interruptions": asdict(q.interruptions) if q.interruptions else None},
        "model": {"params": r.model.n_params, "trainable_params": r.trainable.n_params,
                  "flops_per_token": r.model.flops_per_token(r.seq_len)},
        "plans": [plan_dict(p) for p in one_per_option(r.plans, limit)],
        "not_fitting": [{**plan_dict(p), "overflow_bytes": p.overflow, "overflow_by": _components(p)} for p in cheapest_misses(r)],
        "candidates_fitting": len(r.plans),
    }


def print_result(console: Console, r: Result, limit: int = 10) -> None:
    q = r.request
    console.print(f"[bold]{r.model.name}[/] ({r.model.n_params / 1e9:.2f} B params, {r.trainable.n_params / 1e6:,.1f} M trainable), "
                  f"{q.mode}, {q.tokens:.3g} tokens, seq {r.seq_len}, global batch ~{q.global_batch_tokens:,} tokens"
                  + (", spot prices" if q.spot else ""))
    priced = q.interruptions is not None and q.interruptions.priced
    if q.spot and not priced:
        console.print("interruptions are not priced: spot runs cost as if never reclaimed; "
                      "--interruptions-per-day R (per node) prices the restarts and the saves they need")
    t = Table(show_lines=False)
    for col in ("#", "hardware", "precision", "ckpt", "strategy", "micro x accum", "peak GiB/dev (largest parts)",
                "tokens/s", "wall", "$", *(["restarts, lost"] if priced else [])):
        t.add_column(col, justify="right" if col in ("#", "tokens/s", "wall", "$", "restarts, lost") else "left")
    for i, p in enumerate(one_per_option(r.plans, limit), 1):
        wall = f"{p.wall_h:.1f} h" + ("" if p.meets_deadline else " (late)")
        precision = p.levers.precision + (f", base {p.levers.base_dtype}" if p.levers.base_dtype else "")
        t.add_row(str(i), f"{p.device.key}:{p.count}", precision, p.levers.checkpointing, p.levers.strategy_label(),
                  f"{p.levers.micro_batch} x {p.levers.grad_accum}",
                  f"{p.memory.total / GiB:.1f}/{p.device.memory_bytes / GiB:.0f} ({_components(p, 3)})",
                  f"{p.tokens_per_s:,.0f}", wall, _dollars(p.cost), *_lost(p))
    console.print(t)
    if r.plans:
        best = r.plans[0]
        s = best.step
        console.print(f"winner: {describe(best)} — step {s.total_s:.2f} s (compute {s.compute_s:.2f}, recompute "
                      f"{s.recompute_s:.2f}, exposed comm {s.comm_s:.2f}, offload {s.offload_s:.2f}); "
                      f"${best.device.hourly(best.spot):.2f}/device-h")
        if best.count > 1:
            console.print(why_network(best, r.plans))
        if line := interruptions_line(best):
            console.print(line)
    for p in cheapest_misses(r):
        console.print(f"does not fit: {describe(p)} (would cost ${_dollars(p.cost)}) needs {p.memory.total / GiB:.1f} GiB of "
                      f"{p.device.memory_bytes / GiB:.0f}: over by {p.overflow / GiB:.1f} GiB; largest parts {_components(p)} GiB")
