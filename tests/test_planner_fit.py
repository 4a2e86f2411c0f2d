"""The planner's calibration: fitted on one set of configurations, judged on another, every
constant inside its physical bounds (no runs: the recorded measurements, altered)."""

import copy
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from shoestring.bench import planner_accuracy as pa
from shoestring.plan import catalogue

RAW = json.loads((Path(__file__).parents[1] / "benchmarks" / "planner_accuracy_raw.json").read_text())


def _raw(which: str = pa.FIT) -> list[dict]:
    return [{**copy.deepcopy(r), "set": r.get("set", which)} for r in RAW]


def _scale_step(raw: list[dict], label: str, factor: float) -> None:
    row = next(r for r in raw if pa.Case(**r["case"]).label == label)
    for run in row["runs"]:
        run["step_s"] *= factor
        run["steps_s"] = [t * factor for t in run.get("steps_s", [])]


def test_the_sets_are_disjoint_and_chosen_in_code():
    for size, sets in pa.SIZES.items():
        fit, check = sets[pa.FIT], sets[pa.CHECK]
        assert fit and check, size
        shapes = {(c.preset, c.seq_len, c.batch // c.world) for c in fit}
        assert not {(c.preset, c.seq_len, c.batch // c.world) for c in check} & shapes, size
        assert not {c.label for c in check} & {c.label for c in fit}
    small = pa.SIZES["small"]
    # the check set reaches what the fit set does not: other presets, sequence lengths, modes
    assert {c.preset for c in small[pa.CHECK]} - {c.preset for c in small[pa.FIT]}
    assert {c.seq_len for c in small[pa.CHECK]} - {c.seq_len for c in small[pa.FIT]}
    assert {c.checkpointing for c in small[pa.CHECK]} - {c.checkpointing for c in small[pa.FIT]}


def test_the_fit_refuses_an_mfu_above_one():
    raw = _raw()
    _scale_step(raw, "small pretrain, single, fp32, ckpt none, 8x256", 0.1)  # 10x faster than possible
    with pytest.raises(pa.FitError, match=r"^mfu\.fp32 = .* beyond its upper bound 1\.0 .*single, fp32, ckpt none"):
        pa.fit(pa.predict_rows(raw))


def test_the_fit_refuses_a_recompute_that_makes_the_step_faster():
    raw = _raw()
    _scale_step(raw, "small pretrain, single, bf16, ckpt full, 8x256", 0.5)
    with pytest.raises(pa.FitError, match=r"compiled\.time_full = 0\.\d+ is beyond its lower bound 1\.0 \(recomputing"):
        pa.fit(pa.predict_rows(raw))


def test_a_constant_within_noise_of_its_bound_is_taken_at_the_bound():
    assert pa.bounded("time_full", 0.98, 1.0, []) == 1.0
    assert pa.bounded("mfu.bf16", 1.02, 1.0, []) == 1.0
    assert pa.bounded("time_full", 1.2, 1.0, []) == 1.2
    with pytest.raises(pa.FitError, match="collective_s.ddp = -0.1"):
        pa.bounded("collective_s.ddp", -0.1, 1.0, [])


def test_a_constant_beyond_its_bound_by_less_than_its_rows_noise_is_taken_at_the_bound():
    """The rows' own step-to-step spread (here 8%) is what a bound violation must exceed."""
    noisy = [{"config": "a row", "runs": [{"step_s": 1.04, "steps_s": [1.0, 1.08]}]}]
    assert pa.noise(noisy) == pytest.approx(0.08) and pa.noise([]) == pa.NOISE
    assert pa.bounded("time_selective", 0.95, 1.0, [], beside=noisy) == 1.0
    with pytest.raises(pa.FitError, match=r"time_selective = 0\.95 is beyond .* by more than its rows' noise \(3\.0%\)"):
        pa.bounded("time_selective", 0.95, 1.0, [])
    with pytest.raises(pa.FitError, match=r"noise \(8\.0%\)"):
        pa.bounded("time_selective", 0.9, 1.0, noisy)


def test_the_noise_includes_how_far_a_case_moves_between_its_processes():
    case = pa.Case("small", "single", "bf16", "none", 8, 256)
    first = {"case": asdict(case), "config": case.label, "runs": [{"step_s": 1.0, "steps_s": [1.0, 1.01]}]}
    again = {"case": asdict(replace(case, again=True)), "config": case.label + ", again",
             "runs": [{"step_s": 1.1, "steps_s": [1.1, 1.1]}]}
    assert pa.noise([first]) == pa.NOISE and pa.noise([first, again]) == pytest.approx(0.1)
    assert pa.bounded("compiled.time_selective", 0.92, 1.0, [], [first, again]) == 1.0
    with pytest.raises(pa.FitError, match="time_selective = 0.92"):
        pa.bounded("compiled.time_selective", 0.92, 1.0, [], [first])


def test_a_kept_constant_out_of_bounds_stops_the_fit(monkeypatch):
    """A constant no row refits keeps its value: it is checked too (the old compiled 0.955)."""
    table = {**catalogue.calibration("cpu"), "compiled": {"time_selective": 0.955}}
    rows = [r for r in pa.predict_rows(_raw()) if r["case"]["checkpointing"] != "selective"]
    with catalogue.calibrated("cpu", table), pytest.raises(pa.FitError, match="compiled.time_selective = 0.955"):
        pa.fit(rows)


def test_the_check_set_is_predicted_with_the_fit_of_the_fit_set():
    raw = _raw()
    for r in raw:  # the 2-rank rows and LoRA rows play the check set here
        if r["case"]["strategy"] != "single" or r["case"]["mode"] == "lora":
            r["set"] = pa.CHECK
    rows = pa.calibrate_and_predict(raw)
    assert {r["set"] for r in rows} == {pa.FIT, pa.CHECK}
    fitted = rows[0]["fitted"]
    assert fitted == pa.fit([r for r in pa.predict_rows(raw) if r["set"] == pa.FIT])
    text = pa.table(rows)
    assert text.index("Check set") < text.index("Fit set") and "[calibration.cpu]" in text
    from shoestring.bench.goals import verdicts, MatmulPeaks

    judged = verdicts("planner", rows, MatmulPeaks(1e11, 4e11))
    assert all("check-set rows within" in v.measured for v in judged)
    # a refused fit: predicted with the calibration in force, and the table says why
    _scale_step(raw, "small pretrain, single, fp32, ckpt none, 8x256", 0.1)
    refused = pa.calibrate_and_predict(raw)
    assert "fitted" not in refused[0] and "the fit refused: mfu.fp32" in pa.table(refused)


def test_this_machines_calibration_is_used_for_this_machine_only(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("SHOESTRING_LOCAL_CALIBRATION")
    shipped = copy.deepcopy(catalogue.calibration("cpu"))
    mine = {**shipped, "mfu": {"fp32": 0.5, "bf16": 0.2}}
    try:
        path = pa.write_local_calibration(mine, "test")
        assert catalogue.calibration("cpu")["mfu"] == {"fp32": 0.5, "bf16": 0.2}
        Path(path).write_text(Path(path).read_text().replace(catalogue.machine_key(), "another CPU"))
        catalogue.calibration.cache_clear()
        assert catalogue.calibration("cpu")["mfu"] == shipped["mfu"]
    finally:
        catalogue.calibration.cache_clear()


def test_calibrate_is_one_command_that_writes_only_a_fit_that_holds(tmp_path, monkeypatch, capsys):
    from shoestring.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    raw = _raw()
    monkeypatch.setattr(pa, "run", lambda size, rounds, progress: pa.calibrate_and_predict(raw))
    try:
        assert main(["calibrate", "--size", "smoke"]) == 0
        assert "wrote this machine's calibration" in capsys.readouterr().out
        assert catalogue.local_calibration_path().exists()
        catalogue.local_calibration_path().unlink()
        _scale_step(raw, "small pretrain, single, fp32, ckpt none, 8x256", 0.1)
        assert main(["calibrate", "--size", "smoke"]) == 1
        assert "calibration not written: mfu.fp32 = " in capsys.readouterr().err
        assert not catalogue.local_calibration_path().exists()
    finally:
        catalogue.calibration.cache_clear()


def test_a_tiny_fitted_constant_keeps_its_digits():
    """A micro model's MFU on a loaded machine (0.0004) is small, not zero (it divides later)."""
    assert pa._sig(0.000412345) == 0.000412 and pa._sig(1.15349) == 1.15


def _one_thread_row(raw: list[dict], gain: float) -> dict:
    """The single bf16 row again as one process on one of two threads at half the batch, with a
    probe that halves the peak: the same FLOPs at the peak, `gain` times the MFU."""
    row = copy.deepcopy(next(r for r in raw if pa.Case(**r["case"]).label == "small pretrain, single, bf16, ckpt none, 8x256"))
    row["case"].update(batch=4, threads=1)
    row["probe"] = {**row["probe"], "threads": 1, "cores": 2, "tflops": {k: v / 2 for k, v in row["probe"]["tflops"].items()}}
    for run in row["runs"]:
        run["step_s"] /= gain
    return row


def test_a_rank_on_part_of_the_cores_gets_its_own_fitted_gain():
    raw = _raw()
    fitted = pa.fit(pa.predict_rows([*raw, _one_thread_row(raw, 1.1)]))
    assert fitted["rank_mfu_gain"] == pytest.approx(1.1, rel=1e-2)
    from shoestring.plan.catalogue import cpu_device
    from shoestring.plan.throughput import achievable_mfu

    with catalogue.calibrated("cpu", fitted):
        whole, rank = (cpu_device({**raw[0]["probe"], "threads": t, "cores": 2}) for t in (2, 1))
        assert achievable_mfu(rank, "fp32") == pytest.approx(1.1 * achievable_mfu(whole, "fp32"))


def test_the_fit_refuses_a_gain_that_lifts_an_mfu_above_one():
    raw = _raw()
    with pytest.raises(pa.FitError, match=r"mfu\.fp32 = .* beyond its upper bound 1\.0"):
        pa.fit(pa.predict_rows([*raw, _one_thread_row(raw, 3.0)]))


def test_a_cpu_with_slow_bf16_runs_every_case_in_fp32_once():
    cases = {c: which for which, cs in pa.SIZES["small"].items() for c in cs}
    assert pa.for_this_machine(cases, bf16_fast=True) == cases
    slow = pa.for_this_machine(cases, bf16_fast=False)
    assert {(c.precision, c.lora_base_dtype) for c in slow} == {("fp32", "fp32")}
    assert len({c.label for c in slow}) == len(slow) < len(cases)
    assert pa.CHECK in slow.values() and pa.FIT in slow.values()


def _with_heap(rows: list[dict], base: float, share: float, compiled_extra: float, compiled_share: float) -> list[dict]:
    """Rows whose peak is exactly base + (1 + share) x their counted tensors (compiled: their own)."""
    parts = ("fragmentation", "framework", "compile_runtime")
    out = []
    for r in rows:
        tensors = sum(v for k, v in r["predicted"]["components"].items() if k not in parts)
        c = r["predicted"]["compiled"]
        out.append({**r, "memory_measured": base + (compiled_extra if c else 0) + (1 + (compiled_share if c else share)) * tensors})
    return out


def test_the_heap_share_and_the_process_base_are_told_apart():
    rows = [r for r in pa.predict_rows(_raw())]
    assert {r["predicted"]["compiled"] for r in rows} == {True, False}
    fitted = pa.fit(_with_heap(rows, 0.35e9, 0.2, 0.08e9, 0.05))
    assert fitted["rss_base_gb"] == pytest.approx(0.35, abs=2e-3) and fitted["fragmentation"] == pytest.approx(0.2, rel=1e-2)
    assert fitted["compiled"]["rss_compile_gb"] == pytest.approx(0.08, abs=2e-3)
    assert fitted["compiled"]["fragmentation"] == pytest.approx(0.05, rel=2e-2)


def test_the_fit_refuses_a_heap_smaller_than_its_tensors():
    rows = _with_heap(pa.predict_rows(_raw()), 0.35e9, -0.3, 0.08e9, 0.05)
    with pytest.raises(pa.FitError, match=r"^fragmentation = -0\.3 is beyond its lower bound 0\.0"):
        pa.fit(rows)


def test_a_narrower_model_spends_more_of_its_step_outside_the_matmuls():
    from shoestring.plan.model import model_info
    from shoestring.plan.throughput import compute_seconds, elementwise_per_mflop, elementwise_scale

    fitted = pa.fit(pa.predict_rows(_raw()))
    small, tiny = (elementwise_per_mflop(model_info(p)) for p in ("small", "tiny"))
    assert fitted["elementwise_ref"] == pytest.approx(small, rel=1e-3)  # the fit set's model
    assert elementwise_scale(fitted, small) == pytest.approx(1.0, rel=1e-3)
    assert elementwise_scale(fitted, tiny) > 1.5 and elementwise_scale({}, tiny) == 1.0
    assert compute_seconds(1.0, 1.0, 0.1, 0.5, 0.5, elementwise_scale(fitted, tiny)) > compute_seconds(1.0, 1.0, 0.1, 0.5, 0.5)


def _with_long_row(raw: list[dict], table: dict) -> list[dict]:
    """The recorded fit set, its single-process bf16 rows without checkpointing (8 x 256, and the
    same tokens at 2 x 1024, added) timed as the planner predicts them under the rates of `table`."""
    short = next(r for r in raw if pa.Case(**r["case"]).label == "small pretrain, single, bf16, ckpt none, 8x256")
    long = copy.deepcopy(short)
    long["case"].update(batch=2, seq_len=1024)
    from shoestring.plan.model import model_info
    from shoestring.plan.throughput import elementwise_per_mflop

    made = {**catalogue.calibration("cpu"), **table, "elementwise_ref": elementwise_per_mflop(model_info("small"))}
    with catalogue.calibrated("cpu", made):
        for row in (short, long):
            tokens_per_s = pa.predict_rows([row])[0]["tokens_per_s_predicted"]
            for run in row["runs"]:
                run["step_s"] = 2048 / tokens_per_s
                run["steps_s"] = [run["step_s"]]
    return [*raw, long]


def test_attentions_rate_comes_back_out_of_two_sequence_lengths():
    compiled = {**catalogue.calibration("cpu")["compiled"], "mfu": {"bf16": 0.6, "bf16-pure": 0.6}, "attention_mfu": {"bf16": 0.3}}
    fitted = pa.fit(pa.predict_rows(_with_long_row(_raw(), {"compiled": compiled})))
    assert fitted["compiled"]["attention_mfu"]["bf16"] == pytest.approx(0.3, rel=1e-2)
    assert fitted["compiled"]["mfu"]["bf16"] == pytest.approx(0.6, rel=1e-2)


def test_a_case_measured_again_widens_the_noise_and_sets_no_rate():
    compiled = {**catalogue.calibration("cpu")["compiled"], "mfu": {"bf16": 0.6, "bf16-pure": 0.6}, "attention_mfu": {"bf16": 0.3}}
    raw = _with_long_row(_raw(), {"compiled": compiled})
    again = copy.deepcopy(next(r for r in raw if pa.Case(**r["case"]).label == "small pretrain, single, bf16, ckpt none, 8x256"))
    again["case"]["again"] = True
    for run in again["runs"]:  # a slow phase of the host: 60% slower
        run["step_s"] *= 1.6
        run["steps_s"] = [run["step_s"]]
    rows = pa.predict_rows([*raw, again])
    fitted = pa.fit(rows)
    assert fitted["compiled"]["attention_mfu"]["bf16"] == pytest.approx(0.3, rel=1e-2)
    assert fitted["compiled"]["mfu"]["bf16"] == pytest.approx(0.6, rel=1e-2)
    first = next(r for r in rows if r["config"] == "small pretrain, single, bf16, ckpt none, 8x256")
    assert pa.noise([first]) < 0.1 and pa.noise([first, rows[-1]]) == pytest.approx(0.6)


def test_the_fit_refuses_attention_faster_than_the_peak():
    compiled = {**catalogue.calibration("cpu")["compiled"], "mfu": {"bf16": 0.6, "bf16-pure": 0.6}, "attention_mfu": {"bf16": 1.5}}
    with pytest.raises(pa.FitError, match=r"^compiled\.attention_mfu\.bf16 = 1\.\d+ is beyond its upper bound 1\.0"):
        pa.fit(pa.predict_rows(_with_long_row(_raw(), {"compiled": compiled})))


def test_the_fit_refuses_attention_that_takes_no_time():
    compiled = {**catalogue.calibration("cpu")["compiled"], "mfu": {"bf16": 0.6, "bf16-pure": 0.6}, "attention_mfu": {"bf16": 0.3}}
    raw = _with_long_row(_raw(), {"compiled": compiled})
    _scale_step(raw, "small pretrain, single, bf16, ckpt none, 2x1024", 0.6)  # faster than the same tokens at 256
    with pytest.raises(pa.FitError, match=r"^compiled\.attention_mfu\.bf16 = inf is beyond its upper bound"):
        pa.fit(pa.predict_rows(raw))


def test_attention_at_its_own_rate_makes_longer_sequences_slower_at_the_same_tokens():
    from shoestring.plan.catalogue import cpu_device
    from shoestring.plan.throughput import attention_mfu

    probe = next(r["probe"] for r in RAW if r["case"]["strategy"] == "single")
    step = {}
    for rate in (None, 0.3):
        table = copy.deepcopy(catalogue.calibration("cpu"))
        table["compiled"].pop("attention_mfu", None)
        if rate:
            table["compiled"]["attention_mfu"] = {"bf16": rate}
        with catalogue.calibrated("cpu", table):
            step[rate] = {s: pa.predict(pa.Case("small", "single", "bf16", "none", 2048 // s, s), probe, True)["step"]["compute"]
                          for s in (256, 1024)}
            device = cpu_device(probe)
            assert attention_mfu(device, "bf16-pure", True) == (rate or pytest.approx(table["compiled"]["mfu"]["bf16-pure"]))
            assert attention_mfu(device, "bf16", False) == pytest.approx(table["mfu"]["bf16"])  # eager: not calibrated
    assert step[0.3][1024] / step[0.3][256] > step[None][1024] / step[None][256] > 1


# The AVX2-emulated run of 2026-12-01, whose DDP step hid most of its all-reduce (docs/planner.md)
AVX2 = json.loads((Path(__file__).parents[1] / "benchmarks" / "planner_accuracy_raw_avx2_20261201.json").read_text())


def _with_comm(overlap: dict[str, float], per_call: dict[str, float]) -> tuple[list[dict], dict]:
    """The recorded AVX2 fit set with each 2-rank row's step replaced by what the planner predicts
    when its strategy hides `overlap` of its bytes' time and pays `per_call` per collective (every
    other constant: the fit of the single-process rows), and that calibration."""
    raw = [copy.deepcopy(r) for r in AVX2 if r["set"] == pa.FIT]
    base = pa.fit(pa.predict_rows([r for r in raw if r["case"]["strategy"] == "single"]))
    known = {**base, "comm_overlap": overlap, "collective_s": per_call}
    with catalogue.calibrated("cpu", known):
        for r, row in zip(raw, pa.predict_rows(raw)):
            if r["case"]["strategy"] != "single":
                for run in r["runs"]:
                    run["step_s"] = row["case"]["batch"] * row["case"]["seq_len"] / row["tokens_per_s_predicted"]
                    run["steps_s"] = [run["step_s"]]
    return raw, known


def test_the_hidden_share_and_the_per_call_cost_come_back_out_of_the_rows():
    """A strategy that hides part of its bytes gets that share and no per-call cost; one that
    waits for more than its bytes gets the per-call cost and hides none (`split_exposed`)."""
    overlap, per_call = {"ddp": 0.6, "fsdp2": 0.0, "yafsdp": 0.25}, {"ddp": 0.0, "fsdp2": 0.012, "yafsdp": 0.0}
    raw, known = _with_comm(overlap, per_call)
    with catalogue.calibrated("cpu", known):
        fitted = pa.fit(pa.predict_rows(raw))
    for k in overlap:
        assert fitted["comm_overlap"][k] == pytest.approx(overlap[k], abs=2e-3), k
        assert fitted["collective_s"][k] == pytest.approx(per_call[k], abs=1e-4), k


def test_the_fit_refuses_a_step_that_hides_more_than_all_of_its_communication():
    raw = [copy.deepcopy(r) for r in AVX2 if r["set"] == pa.FIT]
    _scale_step(raw, "small pretrain, ddp, fp32, ckpt none, 8x256", 0.7)  # shorter than its compute alone
    with pytest.raises(pa.FitError, match=r"^comm_overlap\.ddp = \d+\.\d+ is beyond its upper bound 1\.0 .*ddp, fp32"):
        pa.fit(pa.predict_rows(raw))
    with pytest.raises(pa.FitError, match=r"comm_overlap\.fsdp2 = -0\.2 is beyond its lower bound 0\.0"):
        pa.bounded("comm_overlap.fsdp2", -0.2, 1.0, [])


def test_the_prediction_hides_the_calibrated_share_and_the_fit_inverts_it():
    from shoestring.plan.throughput import cpu_exposed_comm, split_exposed

    case = pa.Case("small", "ddp", "fp32", "none", 8, 256)
    probe = next(r["probe"] for r in AVX2 if r["case"]["strategy"] == "ddp")
    steps = {}
    for share in (0.0, 0.5):
        table = {**catalogue.calibration("cpu"), "comm_overlap": {"ddp": share}, "collective_s": {"ddp": 0.01}}
        with catalogue.calibrated("cpu", table):
            steps[share] = pa.predict(case, probe, False)["step"]
    total = steps[0.0]["comm"] - 0.01 * 5  # DDP's 5 bucket calls on `small`
    assert total > 0 and steps[0.5]["comm"] == pytest.approx(steps[0.0]["comm"] - 0.5 * total)
    assert steps[0.5]["compute"] == steps[0.0]["compute"]
    # one rule: whatever the split of a measured exposed time, the prediction gives it back
    for exposed in (0.05, 0.1, 0.3):
        share, per_call = split_exposed(exposed, 0.1, 4)
        cal = {"comm_overlap": {"ddp": share}, "collective_s": {"ddp": per_call}}
        assert cpu_exposed_comm(cal, "ddp", 0.1, 2.0, 4) == pytest.approx(exposed)
        assert min(share, per_call) == 0.0 and 0.0 <= share <= 1.0
    # never more hidden than the compute beside it; a table from before the share was per strategy
    assert cpu_exposed_comm({"comm_overlap": {"ddp": 1.0}}, "ddp", 0.3, 0.1, 1) == pytest.approx(0.2)
    assert cpu_exposed_comm({"comm_overlap": 0.5}, "fsdp2", 0.2, 1.0, 3) == pytest.approx(0.1)


def test_the_recorded_avx2_rows_fit_with_ddps_hidden_all_reduce():
    """The AVX2 run's fit was refused (a negative per-call cost for DDP) before the CPU model had
    a hidden share: its DDP step is shorter than compute + bytes over the probed bandwidth."""
    fitted = pa.fit([r for r in pa.predict_rows(AVX2) if r["set"] == pa.FIT])
    assert fitted["comm_overlap"]["ddp"] > 0.5 and fitted["collective_s"]["ddp"] == 0.0


def test_fit_and_check_cases_alternate_in_their_own_orders():
    """The cases run one after another: alternating the sets makes a slow phase of the machine
    fall on fit and check rows alike."""
    fit_set, check_set = pa.SIZES["small"]["fit"], pa.SIZES["small"]["check"]
    order = pa._alternating(fit_set, check_set)
    assert [c for c, w in order if w == "fit"] == fit_set and [c for c, w in order if w == "check"] == check_set
    assert [w for _, w in order[:6]] == ["fit", "check", "fit", "fit", "fit", "check"]
