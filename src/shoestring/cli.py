"""The `shoestring` command.

Every user mistake ends as one line naming the problem and the fix, with exit status 2; a run
time failure (NaN loss, full disk) exits 1. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from shoestring.errors import ShoestringError

console = Console(soft_wrap=True)  # messages stay one line each, whatever the width
err_console = Console(stderr=True, soft_wrap=True)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="TOML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")


def _worker_argv(args: argparse.Namespace, restart: bool = False) -> list[str]:
    """The `train` command line each rank runs: this one without the launch flags (`restart`:
    continuing the run from its last checkpoint, never wiping it)."""
    argv = ["--debug"] if args.debug else []
    argv += ["train", args.config, *(f"--set={o}" for o in args.overrides)]
    if restart or args.resume:
        argv.append(f"--resume={'auto' if restart else args.resume}")
    return argv + (["--overwrite"] if args.overwrite and not restart else [])


def cmd_train(args: argparse.Namespace) -> int:
    from shoestring.config import load_config
    from shoestring import dist
    from shoestring.parallel.launch import LaunchOptions, check_elastic, launch
    from shoestring.train.adapt import RestartSmaller
    from shoestring.train.report import print_summary
    from shoestring.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any rank starts
    if args.auto:  # resolved once, here; the ranks get the choice as --set overrides
        from shoestring.plan.auto import auto_overrides, describe_choice

        chosen, plan = auto_overrides(cfg, args.nproc or dist.world_size())
        console.print(describe_choice(plan, chosen))
        args.overrides, args.auto = [*args.overrides, *chosen], False
        cfg = load_config(args.config, args.overrides)
    if (args.nproc or args.nnodes != "1") and not dist.launched():
        opts = LaunchOptions(args.nproc or 1, args.nnodes, args.node_rank, args.rdzv_endpoint, args.max_restarts)
        check_elastic(opts, cfg.train.batch_size, cfg.train.micro_batch, cfg.parallel.strategy)
        return launch(opts, _worker_argv(args), _worker_argv(args, restart=True))
    resume, overwrite = args.resume, args.overwrite
    while True:
        trainer = Trainer(cfg, console=console)
        try:
            summary = trainer.run(resume=resume, overwrite=overwrite)
            break
        except RestartSmaller as err:
            if dist.launched():  # the launcher (or torchrun's --max-restarts) restarts every rank
                raise
            console.print(f"[yellow]{err.problem}[/]", highlight=False)  # alone: restart here
            cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": str(trainer.run_dir)})})
            resume, overwrite = "auto", False
    print_summary(trainer.console, summary, Path(cfg.run.dir))  # quiet on ranks other than 0
    return 0


def _parse_amount(text: str, what: str, units: dict[str, float], example: str) -> float:
    """'2e9', '4M', '48h' -> a number; `units` maps a one-letter suffix to its multiplier."""
    from shoestring.errors import UserError

    t, mult = text.strip().lower(), 1.0
    if t and t[-1] in units:
        t, mult = t[:-1], units[t[-1]]
    try:
        return float(t) * mult
    except ValueError:
        raise UserError(f"{what} {text!r} is not a number", f"write e.g. {example}") from None


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from shoestring.plan.catalogue import interruptions_at
    from shoestring.plan.report import print_result, result_dict
    from shoestring.plan.search import Request, require_fit, search

    counts = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
    req = Request(
        model=args.model, tokens=_parse_amount(args.tokens, "--tokens", counts, "2e9 or 500M"), hardware=tuple(args.hardware or ()),
        mode=args.mode, seq_len=args.seq_len,
        global_batch_tokens=int(_parse_amount(args.global_batch_tokens, "--global-batch-tokens", counts, "4M")),
        deadline_h=_parse_amount(args.deadline, "--deadline", {"h": 1, "d": 24}, "48h or 3d") if args.deadline else None,
        spot=args.spot, lora_rank=args.lora_rank, lora_base_dtype=args.lora_base_dtype,
        interruptions=interruptions_at(args.interruptions_per_day, args.checkpoint_write_gbs, args.checkpoint_read_gbs,
                                       args.restart_minutes),
    )
    result = search(req)
    require_fit(result)
    if args.json:
        print(json.dumps(result_dict(result, args.top), indent=1))
    else:
        print_result(Console(soft_wrap=False, width=max(console.width, 190)), result, args.top)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.hf:
        from shoestring.export_hf import export_hf

        console.print(f"wrote {export_hf(Path(args.run_dir), Path(args.hf), adapter_only=args.adapter)}")
        return 0
    if args.adapter:
        from shoestring.errors import UserError

        raise UserError("--adapter applies to --hf exports", "add --hf OUT_DIR")
    from shoestring.export import export_safetensors

    out, ref = export_safetensors(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"wrote {out} (step {ref.step})")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from shoestring.config import load_config
    from shoestring.data.shards import prepare
    from shoestring.data.sources import prepared_dir

    overrides = list(args.overrides)
    if args.corpus:
        overrides.append(f"data.corpus={args.corpus!r}".replace("'", '"'))
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else prepared_dir(cfg)
    manifest = prepare(cfg.data.corpus, out, cfg.data.vocab_size, cfg.data.val_fraction)
    console.print(f"prepared {out}: {manifest['tokens']['train']:,} train / {manifest['tokens']['val']:,} val tokens")
    return 0


def cmd_data_instruct_demo(args: argparse.Namespace) -> int:
    from shoestring.data.demo import write_reverse_words

    console.print(f"wrote {write_reverse_words(Path(args.out), args.examples, args.seed)} ({args.examples} examples)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from shoestring.compare import compare

    c = compare(Path(args.run_dir), args.prompts, args.max_new_tokens)
    hits = [sum(getattr(a, side) == a.expected for a in c.answers) for side in ("before", "after")]
    console.print(f"held-out loss ({c.val_examples} validation examples, fp32): {c.val_loss_before:.3f} before -> "
                  f"{c.val_loss_after:.3f} after; exact answers {hits[0]}/{len(c.answers)} before, {hits[1]}/{len(c.answers)} after",
                  highlight=False)
    for a in c.answers:
        console.print(f"\nprompt:   {a.prompt}\nexpected: {a.expected}\nbefore:   {a.before}\nafter:    {a.after}",
                      markup=False, highlight=False)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from shoestring.generate import generate_text

    text = generate_text(Path(args.run), args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, chat=args.chat)
    console.print(text, markup=False, highlight=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from shoestring.train.report import plot_run

    for path in plot_run(Path(args.run_dir)):
        console.print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from shoestring.bench.suite import SECTIONS, run_suite

    names = args.only or list(SECTIONS)
    command = f"shoestring bench --size {args.size}" + (f" --only {' '.join(names)}" if args.only else "")
    outcomes = run_suite(args.size, names, Path(args.out), command, console)
    return 1 if any(o.failed for o in outcomes) else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from shoestring.bench.planner_accuracy import FitError, calibrate, table
    from shoestring.errors import RunError

    def say(msg: str) -> None:
        console.print(msg, markup=False, highlight=False)

    try:
        rows, path = calibrate(args.size, args.rounds, progress=say)
    except FitError as err:
        raise RunError(f"calibration not written: {err}") from None
    say(table(rows))
    say(f"wrote this machine's calibration to {path}; the planner uses it from now on on this CPU")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoestring", description="Train and fine-tune LLMs on a shoestring.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a config")
    _add_config_args(p)
    p.add_argument("--resume", metavar="DIR|auto", help="continue a run: its run directory, a checkpoint, or 'auto'")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is in run.dir")
    p.add_argument("--auto", action="store_true",
                   help="choose the levers the config leaves unset (precision, checkpointing, strategy, grad_accum) "
                        "with the planner for this machine")
    launch = p.add_argument_group("launch (torchrun's meaning; see README)")
    launch.add_argument("--nproc", type=int, metavar="N", help="ranks per node, started through torchrun")
    launch.add_argument("--nnodes", default="1", metavar="N|MIN:MAX", help="number of nodes")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's rank (multi-node)")
    launch.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address, the same on every node")
    launch.add_argument("--max-restarts", type=int, default=0, help="restart the ranks this often after a failure, resuming")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="what fits, how fast, what it costs: ranked candidate plans")
    p.add_argument("--model", required=True, help="model preset (see shoestring.models.presets)")
    p.add_argument("--tokens", required=True, help="training tokens, e.g. 2e9 or 500M")
    p.add_argument("--hardware", action="append", metavar="DEVICE[:COUNT]",
                   help="catalogue device and count (repeatable; no count: try 1-64; 'local': this machine); "
                        "default: every catalogue device")
    p.add_argument("--mode", default="pretrain", choices=["pretrain", "full-finetune", "lora"])
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-base-dtype", choices=["bf16", "fp32", "nf4"],
                   help="dtype of LoRA's frozen base weights (nf4: QLoRA's 4 bits); default: bf16 and nf4 are both tried")
    p.add_argument("--seq-len", type=int, help="default: the model's context, at most 4096")
    p.add_argument("--global-batch-tokens", default="1M", help="tokens per optimizer step (default 1M)")
    p.add_argument("--deadline", help="wall-time limit, e.g. 48h or 3d")
    p.add_argument("--spot", action="store_true", help="price at spot rates where the catalogue has them")
    lost = p.add_argument_group("interruptions (defaults and their sources: plan/hardware.toml [interruptions])")
    lost.add_argument("--interruptions-per-day", type=float, default=0.0, metavar="R",
                      help="interruptions per node per day to price: restarts, steps redone, saves, and the "
                           "save interval that costs least (default 0: not priced)")
    lost.add_argument("--restart-minutes", type=float, metavar="M", help="from an interruption to the job running again")
    lost.add_argument("--checkpoint-write-gbs", type=float, metavar="GB/S", help="checkpoint bytes one node writes per second")
    lost.add_argument("--checkpoint-read-gbs", type=float, metavar="GB/S", help="and reads back on a restart")
    p.add_argument("--top", type=int, default=10, help="rows to show")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="write a run's newest weights as one safetensors file")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output file (default: RUN_DIR/model-step_N.safetensors)")
    p.add_argument("--hf", metavar="OUT_DIR", help="write a Hugging Face directory instead (config, safetensors, tokenizer)")
    p.add_argument("--adapter", action="store_true", help="with --hf, LoRA runs: the adapter alone (peft layout), not merged weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("data", help="data preparation")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="train the tokenizer and write token shards")
    _add_config_args(p, required=False)
    p.add_argument("--corpus", help="bundled corpus name (shakespeare, stdlib) or a path to .txt/.jsonl files")
    p.add_argument("--out", help="output directory (default: derived from the corpus)")
    p.set_defaults(func=cmd_data_prepare)
    p = data_sub.add_parser("instruct-demo", help="write the project's small instruction set (reverse four words) as .jsonl")
    p.add_argument("out", help="output .jsonl file")
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_instruct_demo)

    p = sub.add_parser("compare", help="a fine-tuned run before and after: held-out answers and loss")
    p.add_argument("run_dir")
    p.add_argument("--prompts", type=int, default=5, help="held-out prompts to answer (greedy)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message (chat template); prints the reply")
    p.set_defaults(func=cmd_generate)

    from shoestring.bench.suite import SECTIONS, SIZES

    p = sub.add_parser("bench", help="run the benchmark suite side by side; write the report and its charts")
    p.add_argument("--size", default="small", choices=SIZES, help="smoke: seconds; small: minutes; full: the long run")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                   help="run these sections only (" + ", ".join(SECTIONS) + "); the report keeps the others' figures")
    p.add_argument("--out", default="docs", help="where benchmarks.md, benchmarks.json and img/ go (default: docs)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("calibrate", help="measure the planner's calibration set on this CPU, fit it, check it on "
                                         "configurations it never saw, and keep it for this machine")
    p.add_argument("--size", default="small", choices=("smoke", "small", "full"))
    p.add_argument("--rounds", type=int, default=1, help="fresh-process rounds per configuration (interleaved)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="plot a run's loss, throughput and memory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    return parser


def _rank_prefix() -> str:
    """Under torchrun every rank's errors reach the console; say whose."""
    return escape(f"[rank {os.environ['RANK']}] ") if "RANK" in os.environ else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ShoestringError as err:
        if args.debug:
            raise
        err_console.print(f"{_rank_prefix()}[bold red]error:[/] {escape(err.line())}", highlight=False)
        return err.exit_code
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        err_console.print(f"{_rank_prefix()}[bold red]aborted:[/] {err or 'interrupted'}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
