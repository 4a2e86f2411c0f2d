"""`shoestring bench`: every benchmark section at one size, in one run, into one report.

A section is a module with `run(size, ..., progress=...) -> list[dict]` (its own rounds, each
configuration in its own processes, rounds in turns, medians kept) and `table(rows) -> str` (Markdown). Sections
are imported only when run, so a missing one (or its missing extra) costs one line in the
output and the document instead of the whole suite. The report: docs/benchmarks.md filled
between its markers (bench/report.py), charts in docs/img/, raw rows in benchmarks.json.
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from shoestring.bench import report
from shoestring.bench.goals import MatmulPeaks, verdicts

SIZES = ("smoke", "small", "full")
# name -> (module, title in the report); the order they run in
SECTIONS = {
    "levers": ("shoestring.bench.levers", "Precision and activation checkpointing (single process)"),
    "strategies": ("shoestring.bench.strategies", "Data-parallel strategies (2 ranks)"),
    "incumbents": ("shoestring.bench.incumbents", "Against the incumbents: HF Trainer, plain FSDP2, DeepSpeed"),
    "planner": ("shoestring.bench.planner_accuracy", "Planner accuracy"),
    "finetune": ("shoestring.bench.finetune", "Fine-tuning: LoRA vs full"),
}


@dataclass
class Outcome:
    name: str
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)
    table: str = ""
    problem: str | None = None  # "not available: ..." or "failed: ..."
    failed: bool = False


def run_section(name: str, size: str, progress) -> Outcome:
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(SECTIONS[name][0])
        kwargs = {"progress": progress} if "progress" in inspect.signature(module.run).parameters else {}
        rows = module.run(size, **kwargs)
        return Outcome(name, time.perf_counter() - t0, rows, module.table(rows))
    except ImportError as err:  # the section or an extra it needs is not installed
        return Outcome(name, time.perf_counter() - t0, problem=f"not available: {err}")
    except Exception as err:  # noqa: BLE001 - one broken section must not lose the others' figures
        return Outcome(name, time.perf_counter() - t0, problem=f"failed: {type(err).__name__}: {err}", failed=True)


@dataclass(frozen=True)
class RunFacts:
    """What the report says about the run as a whole, taken once before any section runs or
    anything is written: where it ran, and the matmul rates that decide which goals apply."""

    provenance: report.Provenance
    peaks: MatmulPeaks

    @classmethod
    def now(cls) -> "RunFacts":
        return cls(report.Provenance.now(), MatmulPeaks.probed())


def section_body(o: Outcome, size: str, command: str, charts: list[Path] | str, out: Path, facts: RunFacts) -> str:
    parts = [report.stamp(command, o.seconds, facts.provenance), ""]
    if size == "smoke":
        parts += ["**Smoke size: this checks that the section runs; its figures say nothing about the goals.**", ""]
    if o.problem:
        return "\n".join(parts + [f"Section {o.name} {o.problem.splitlines()[0][:300]}"])
    parts += [o.table, ""]
    if isinstance(charts, str):
        parts += [f"({charts})", ""]
    else:
        parts += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in charts] + [""]
    lines = [v.line() for v in verdicts(o.name, o.rows, facts.peaks)]
    if lines:
        parts += ["Goals:", "", *lines]
    return "\n".join(parts)


def draw(o: Outcome, out: Path) -> list[Path] | str:
    try:
        from shoestring.bench.charts import section_charts

        return section_charts(o.name, o.rows, out / "img")
    except ImportError:
        return "charts skipped: matplotlib is not installed (pip install 'shoestring[plots]')"


def write(outcomes: list[Outcome], size: str, command: str, out: Path, facts: RunFacts) -> Path:
    """Fill OUT/benchmarks.md (kept prose, new figures) and merge the rows into OUT/benchmarks.json."""
    out.mkdir(parents=True, exist_ok=True)
    doc_path, raw_path = out / "benchmarks.md", out / "benchmarks.json"
    doc = doc_path.read_text() if doc_path.exists() else report.skeleton({k: v[1] for k, v in SECTIONS.items()})
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    for o in outcomes:
        body = section_body(o, size, command, [] if o.problem else draw(o, out), out, facts)
        doc = report.fill(doc, o.name, SECTIONS[o.name][1], body)
        raw[o.name] = {"command": command, "seconds": o.seconds, "problem": o.problem, "machine": facts.provenance.machine,
                       "matmul_peaks": asdict(facts.peaks), "rows": o.rows}
    doc_path.write_text(doc)
    raw_path.write_text(json.dumps(raw, indent=1, default=str) + "\n")
    return doc_path


def run_suite(size: str, names: list[str], out: Path, command: str, console: Console) -> list[Outcome]:
    """Run the named sections in order under one progress bar, then write the report."""
    facts = RunFacts.now()
    if "-dirty" in facts.provenance.versions:
        console.print("warning: the source tree has uncommitted changes, so every stamp will say -dirty; "
                      "commit first to record figures",
                      markup=False, highlight=False)
    outcomes = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} sections"),
               TimeElapsedColumn(), TextColumn("{task.fields[step]}", style="dim", markup=False))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("bench", total=len(names), step="")
        for name in names:
            bar.update(task, description=f"bench {size}: {name}", step="")
            o = run_section(name, size, lambda msg: bar.update(task, step=msg))
            outcomes.append(o)
            bar.advance(task)
            bar.console.print(f"{name}: {o.problem or 'done'} ({o.seconds:.0f} s)", markup=False, highlight=False)
    doc = write(outcomes, size, command, out, facts)
    console.print(f"wrote {doc} ({sum(o.seconds for o in outcomes) / 60:.1f} min in all)", markup=False, highlight=False)
    return outcomes
