"""The `shoestring` command.

Every user mistake ends as one line naming the problem and the fix, with exit status 2; a run
time failure (NaN loss, full disk) exits 1. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from shoestring.errors import ShoestringError

console = Console(soft_wrap=True)  # messages stay one line each, whatever the width
err_console = Console(stderr=True, soft_wrap=True)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="TOML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from shoestring.config import load_config
    from shoestring.train.report import print_summary
    from shoestring.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    summary = Trainer(cfg, console=console).run(resume=args.resume, overwrite=args.overwrite)
    print_summary(console, summary, Path(cfg.run.dir))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from shoestring.config import load_config
    from shoestring.data.shards import prepare
    from shoestring.train.trainer import prepared_dir

    overrides = list(args.overrides)
    if args.corpus:
        overrides.append(f"data.corpus={args.corpus!r}".replace("'", '"'))
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else prepared_dir(cfg)
    manifest = prepare(cfg.data.corpus, out, cfg.data.vocab_size, cfg.data.val_fraction)
    console.print(f"prepared {out}: {manifest['tokens']['train']:,} train / {manifest['tokens']['val']:,} val tokens")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from shoestring.generate import generate_text

    text = generate_text(Path(args.run), args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed, chat=args.chat)
    console.print(text, markup=False, highlight=False)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from shoestring.export_hf import export_hf

    out = export_hf(Path(args.run_dir), Path(args.out_dir), adapter_only=args.adapter)
    console.print(f"wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from shoestring.train.report import plot_run

    for path in plot_run(Path(args.run_dir)):
        console.print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoestring", description="Train and fine-tune LLMs on a shoestring.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a config")
    _add_config_args(p)
    p.add_argument("--resume", metavar="DIR|auto", help="continue a run: its run directory, a checkpoint, or 'auto'")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is in run.dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="data preparation")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="train the tokenizer and write token shards")
    _add_config_args(p, required=False)
    p.add_argument("--corpus", help="bundled corpus name (shakespeare, stdlib) or a path to .txt/.jsonl files")
    p.add_argument("--out", help="output directory (default: derived from the corpus)")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("generate", help="sample text from a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="treat the prompt as a user message (chat template); prints the reply")
    p.set_defaults(func=cmd_generate)

    # To become `shoestring export RUN_DIR --hf OUT_DIR` when the export command lands.
    p = sub.add_parser("export-hf", help="write a run as a Hugging Face directory (transformers loads it)")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--adapter", action="store_true", help="LoRA runs: the adapter alone (PEFT layout), not merged weights")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("report", help="plot a run's loss, throughput and memory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ShoestringError as err:
        if args.debug:
            raise
        err_console.print(f"[bold red]error:[/] {err.line()}", highlight=False)
        return err.exit_code
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        err_console.print(f"[bold red]aborted:[/] {err or 'interrupted'}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
