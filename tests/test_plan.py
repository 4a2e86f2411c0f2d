"""The planner: exact model-state bytes against counted bytes on meta-device models, search
speed, error messages, the --json shape."""

from __future__ import annotations

import json
import time

import pytest
import torch

from shoestring.cli import main
from shoestring.levers.precision import PrecisionPolicy, cast_model
from shoestring.models import PRESETS, build_model
from shoestring.plan.memory import Levers, state_bytes
from shoestring.plan.model import full_trainable, model_info
from shoestring.plan.search import Request, search

PRESET_NAMES = [p for p in PRESETS]


def _count(model: torch.nn.Module, opt: torch.optim.Optimizer, masters: list | None = None) -> dict[str, int]:
    """Bytes of every storage held for params, grads, optimizer state (meta tensors keep their
    storage size), each parameter once."""
    def nbytes(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.untyped_storage().nbytes()

    params = list(model.parameters())
    out = {"params": sum(nbytes(p) for p in params), "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
           "master": sum(nbytes(m) for m in masters or []),
           "optimizer": sum(nbytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))}
    return out


def _step(params: list) -> torch.optim.Optimizer:
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, foreach=False)
    opt.step()
    return opt


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure"])
def test_replicated_state_bytes_exact(preset, precision):
    """single and ddp hold a full replica on every rank, so N does not change the bytes."""
    model = build_model(PRESETS[preset], "meta")
    policy = PrecisionPolicy(precision)
    cast_model(model, policy)
    params = list(model.parameters())
    masters = [torch.nn.Parameter(p.detach().float()) for p in params] if policy.uses_master_weights else None
    opt = _step(masters or params)
    if masters:
        for p in params:
            p.grad = torch.zeros_like(p)
    counted = _count(model, opt, masters)
    info = model_info(preset)
    for strategy in ("single", "ddp"):
        for n in (1, 2, 8):
            assert state_bytes(full_trainable(info), Levers(precision, "none", strategy), n) == counted


def _fsdp_counted(preset: str, world: int, precision: str) -> dict[str, int]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from shoestring.parallel.base import WithLoss
    from shoestring.parallel.fsdp2 import mixed_precision

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        model = build_model(PRESETS[preset], "meta")
        mp = mixed_precision(PrecisionPolicy(precision))
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(WithLoss(model), mesh=mesh, mp_policy=mp)
        opt = _step(list(model.parameters()))
        counted = _count(model, opt)
    finally:
        dist.destroy_process_group()
    return counted


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_fsdp2_state_bytes_exact(preset):
    """Real FSDP2 sharding on the meta device (fake process group), rank 0 of N."""
    info = model_info(preset)
    for n in (1, 2, 8):
        for precision in ("bf16", "bf16-pure"):
            counted = {**_fsdp_counted(preset, n, precision), "master": 0}
            assert state_bytes(full_trainable(info), Levers(precision, "none", "fsdp2"), n) == counted, (n, precision)


def test_70b_full_search_is_fast():
    search(Request("llama3-70b", 2e9))  # warm: meta build of the model
    t0 = time.perf_counter()
    result = search(Request("llama3-70b", 2e9))
    assert time.perf_counter() - t0 < 2.0
    assert result.plans and result.plans[0].fits


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("args,needle", [
    (["--model", "llama9-1t", "--tokens", "1e9"], "unknown model 'llama9-1t'"),
    (["--model", "llama2-7b", "--tokens", "1e9", "--hardware", "h900:8"], "unknown device 'h900'"),
    (["--model", "llama2-7b", "--tokens", "-5"], "impossible token count"),
    (["--model", "llama2-7b", "--tokens", "lots"], "--tokens 'lots' is not a number"),
    (["--model", "llama2-7b", "--tokens", "1e9", "--hardware", "h100-80gb:zero"], "count must be a whole number"),
    (["--model", "llama3-70b", "--tokens", "1e9", "--hardware", "t4:1"], "fits nowhere"),
])
def test_bad_input_one_line(capsys, args, needle):
    code, out = run_cli(capsys, "plan", *args)
    assert code == 2 and "Traceback" not in out
    assert needle in " ".join(out.split()), out


def test_fits_nowhere_says_what_is_needed(capsys):
    code, out = run_cli(capsys, "plan", "--model", "llama3-70b", "--tokens", "1e9", "--hardware", "t4:1")
    assert "needs" in out and "GB per device" in out


def test_json_shape(capsys):
    code, out = run_cli(capsys, "plan", "--model", "llama2-7b", "--tokens", "1e9", "--hardware", "h100-80gb:8",
                        "--hardware", "a100-40gb:4", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"request", "model", "plans", "not_fitting"}
    best = data["plans"][0]
    for key in ("device", "count", "precision", "checkpointing", "strategy", "micro_batch", "grad_accum",
                "memory_bytes", "tokens_per_s", "wall_hours", "cost_usd", "fits"):
        assert key in best
    assert best["fits"] and best["memory_bytes"]["total"] <= best["memory_bytes"]["capacity"]
    costs = [p["cost_usd"] for p in data["plans"]]
    assert costs == sorted(costs)


def test_lora_trains_a_fraction():
    r = search(Request("llama3-8b", 1e8, hardware=("a10g:1",), mode="lora", seq_len=2048))
    assert r.plans and r.trainable.n_params < 0.01 * r.model.n_params
