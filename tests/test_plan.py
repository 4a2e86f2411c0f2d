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
from shoestring.plan.memory import Levers, comm_and_cast_bytes, state_bytes
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
            assert state_bytes(info, full_trainable(info), Levers(precision, "none", strategy), n) == counted


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
            assert state_bytes(info, full_trainable(info), Levers(precision, "none", "fsdp2"), n) == counted, (n, precision)


class _Ranks:
    """The yafsdp engine's collectives as seen by rank 0 of `world_size` on gloo (point-to-point,
    as the planner assumes on a CPU): building it calls none."""

    def __init__(self, world_size: int):
        self.rank, self.world_size, self.replica, self.replicas, self.p2p = 0, world_size, 0, 1, world_size > 1

    def all_reduce(self, t: torch.Tensor) -> None:
        raise AssertionError("a collective was called while building")


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_yafsdp_state_and_buffer_bytes_exact(preset):
    """The yafsdp engine built on the meta device, rank 0 of N: the planner's model state and
    buffers (from the engine's static estimates) equal what its `memory()` counts."""
    from shoestring.config import ParallelSection
    from shoestring.parallel.base import OptimizerSettings
    from shoestring.parallel.yafsdp import YaFSDP

    info = model_info(preset)
    settings = OptimizerSettings(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0)
    for n in (1, 2, 8):
        for precision in ("bf16", "bf16-pure", "fp16"):
            engine = YaFSDP(build_model(PRESETS[preset], "meta"), PrecisionPolicy(precision), settings,
                            torch.device("meta"), ParallelSection(strategy="yafsdp"), _Ranks(n))
            counted = engine.memory()
            levers = Levers(precision, "none", "yafsdp")
            assert {**state_bytes(info, full_trainable(info), levers, n), "buffers": counted["buffers"]} == counted, (n, precision)
            assert comm_and_cast_bytes(info, full_trainable(info), levers, n, "cpu")["buffers"] == counted["buffers"]


def test_70b_full_search_stays_interactive():
    """A guard against a search that grows combinatorially (0.44 s idle on the 2-core CI
    machine), not a speed target: the bound leaves room for a machine shared with other jobs."""
    search(Request("llama3-70b", 2e9))  # warm: meta build of the model
    t0 = time.perf_counter()
    result = search(Request("llama3-70b", 2e9))
    assert time.perf_counter() - t0 < 10.0
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
    r = search(Request("llama3-8b", 1e8, hardware=("a100-40gb:1",), mode="lora", seq_len=2048))
    assert r.plans and r.trainable.n_params < 0.01 * r.model.n_params


def test_cheapest_misses_say_what_overflows(capsys):
    r = search(Request("llama2-7b", 1e9, hardware=("h100-80gb:8", "l4:8")))
    from shoestring.plan.search import cheapest_misses

    misses = cheapest_misses(r)
    assert misses and all(not p.fits and p.overflow > 0 for p in misses)
    assert [p.cost for p in misses] == sorted(p.cost for p in misses)
    code, out = run_cli(capsys, "plan", "--model", "llama2-7b", "--tokens", "1e9", "--hardware", "h100-80gb:8",
                        "--hardware", "l4:8", "--json")
    miss = json.loads(out)["not_fitting"][0]
    assert miss["overflow_bytes"] == miss["memory_bytes"]["total"] - miss["memory_bytes"]["capacity"] > 0
    assert miss["overflow_by"]
    code, out = run_cli(capsys, "plan", "--model", "llama2-7b", "--tokens", "1e9", "--hardware", "h100-80gb:8",
                        "--hardware", "l4:8")
    assert "does not fit:" in out and "over by" in out


def test_fits_nowhere_names_a_count_that_fits(capsys):
    code, out = run_cli(capsys, "plan", "--model", "llama2-13b", "--tokens", "1e9", "--hardware", "a100-40gb:1")
    assert code == 2 and "would fit" in out and "a100-40gb:" in out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-pure"])
def test_lora_state_bytes_match_the_lever_estimate(precision):
    """The planner's LoRA model state (single replica) is the lever's own estimate, plus
    AdamW's step counters."""
    from shoestring.levers.lora import LoRASettings, estimate
    from shoestring.plan.model import LORA_TARGETS, lora_trainable

    info = model_info("small")
    base = torch.bfloat16 if precision == "bf16-pure" else torch.float32
    lever = estimate(info.args, LoRASettings(rank=8, targets=LORA_TARGETS, base_dtype=base), precision)
    trainable = lora_trainable(info, 8, LORA_TARGETS, base.itemsize)
    planned = state_bytes(info, trainable, Levers(precision, "none", "single"), 1)
    counters = 4 * len(trainable.shapes)
    assert (planned["params"], planned["grads"], planned["master"], planned["optimizer"] - counters) == \
        (lever.params, lever.grads, lever.master, lever.optimizer)


def test_lora_mode_uses_the_config_settings():
    r4 = search(Request("small", 1e6, hardware=("a10g:1",), mode="lora", seq_len=256, lora_rank=4, lora_targets=("q_proj",)))
    r16 = search(Request("small", 1e6, hardware=("a10g:1",), mode="lora", seq_len=256))
    assert r4.trainable.n_params < r16.trainable.n_params
    assert r4.trainable.n_params == 4 * 8 * (512 + 512)  # rank x layers x (in + out) of q_proj


def test_accuracy_bench_repredicts_saved_rows():
    """The recorded raw measurements re-predict with the current planner (no runs)."""
    from pathlib import Path

    from shoestring.bench.planner_accuracy import fit, predict_rows, table

    raw = json.loads((Path(__file__).parents[1] / "benchmarks" / "planner_accuracy_raw.json").read_text())
    rows = predict_rows(raw)
    assert len(rows) >= 8 and {r["case"]["strategy"] for r in rows} >= {"single", "ddp", "fsdp2"}
    assert {r["case"]["mode"] for r in rows} >= {"lora", "full-finetune"}
    assert "| configuration |" in table(rows)
    fitted = fit(rows)
    assert set(fitted) >= {"mfu", "rss_base_gb"} and all(0 < v for v in fitted["mfu"].values())


def test_accuracy_bench_smoke(tmp_path, monkeypatch):
    from shoestring.bench.planner_accuracy import run

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the bench re-probes: leave the user's cache alone
    rows = run("smoke", rounds=1)
    assert [r["set"] for r in rows] == ["fit", "check", "fit"] and rows[2]["case"]["mode"] == "lora"
    for r in rows:
        assert r["memory_measured"] > 0 and r["tokens_per_s_measured"] > 0 and r["memory_predicted"] > 0


def test_train_auto_fills_unset_levers(tmp_path, corpus_dir, prepared, capsys):
    """--auto chooses precision, strategy and grad_accum (left unset) and keeps the
    checkpointing the config set."""
    from tests.conftest import config_tree

    tree = config_tree(corpus_dir, prepared, tmp_path / "run", train__steps=2, train__eval_every=2,
                       checkpointing__mode="full")
    del tree["precision"]
    path = tmp_path / "auto.json"
    path.write_text(json.dumps(tree))
    code, out = run_cli(capsys, "train", str(path), "--auto", "--overwrite")
    assert code == 0, out
    assert "auto plan:" in out
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    assert used["checkpointing"]["mode"] == "full"
    assert used["parallel"]["strategy"] == "single"
    chosen = out.split("auto plan:")[1].split()[1]  # "local:1 <precision> ckpt=..."
    assert used["precision"]["mode"] == chosen
    assert "precision.mode=" in out and "checkpointing.mode" not in out


def test_auto_overrides_keep_what_is_set(monkeypatch):
    from shoestring.config import build_config
    from shoestring.plan import probe
    from shoestring.plan.auto import auto_overrides

    monkeypatch.setattr(probe, "allreduce_bandwidth", lambda ranks, nbytes=0: 1e9)
    cfg = build_config({"model": {"preset": "micro"}, "data": {"seq_len": 64}, "precision": {"mode": "fp32"},
                        "train": {"batch_size": 8, "grad_accum": 2}})
    chosen, plan = auto_overrides(cfg, 2)
    assert plan.levers.precision == "fp32" and plan.levers.grad_accum == 2 and plan.levers.micro_batch == 2
    assert not any(c.startswith(("precision.", "train.grad_accum")) for c in chosen)
    assert any(c.startswith("parallel.strategy=") for c in chosen)
    assert plan.levers.strategy in ("ddp", "fsdp2")


def test_fp16_only_devices_shard():
    """A T4 has no bf16: fp16 with loss scaling shards, so an 8B LoRA over a bf16 base fits on
    four (it fitted nowhere when only DDP could carry fp16: 24.4 GB per 16 GB device)."""
    r = search(Request("llama3-8b", 1e8, hardware=("t4:4",), mode="lora", lora_base_dtype="bf16"))
    assert r.plans and {p.levers.precision for p in r.plans} == {"fp16"}
    assert {"fsdp2", "yafsdp"} <= {p.levers.strategy for p in r.plans}
    assert not any(p.levers.strategy == "ddp" for p in r.plans)


@pytest.mark.parametrize("request_, says, never", [
    (Request("llama3-8b", 1e8, hardware=("t4:4",), mode="lora", lora_base_dtype="fp32"),
     "--lora-base-dtype bf16 or nf4", "--mode lora"),
    (Request("llama3-70b", 1e9, hardware=("t4:1",)), "--mode lora", "--lora-base-dtype"),
])
def test_a_hint_never_suggests_what_the_request_says(request_, says, never):
    from shoestring.errors import UserError
    from shoestring.plan.search import require_fit

    with pytest.raises(UserError) as err:
        require_fit(search(request_))
    assert says in err.value.fix and never not in err.value.fix, err.value.fix
