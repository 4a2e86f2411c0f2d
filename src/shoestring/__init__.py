"""shoestring: train and fine-tune LLMs for the most model quality per dollar.

The package is layered and its arrows point down only: a module imports from its own layer or
the layers below it, never from one above, and no import cycle exists anywhere
(tests/test_layers.py holds both, function-local imports included). `LAYERS` is that order,
bottom first; a module or package not named in it fails the test until it is given a place.
A lower layer that needs something from a higher one is a sign that the thing lives in the
wrong place: move it down.
"""

__version__ = "0.1.0"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "quiet", "dist", "cache"),  # leaves: errors, quiet third-party imports, process-group plumbing, the user cache
    ("measure", "checkpoint"),  # memory accounting; checkpoint files that survive a kill at any byte
    ("models",),  # model definitions and the loss: nothing of precision, devices or parallelism
    ("levers",),  # precision, activation checkpointing, compile, LoRA: each owns apply + estimate
    ("config",),  # the validated config (its validators name presets and LoRA targets)
    ("rundir",),  # what a run directory holds
    ("parallel",),  # one module per data-parallel strategy behind one interface: apply + cost
    ("build",),  # config -> model + levers + strategy, in the fixed order
    ("data",),  # corpus, tokenizer, shards, samplers; a run's data from its config (`data.sources`)
    ("plan",),  # hardware catalogue and probe, memory/throughput/cost models, the search
    ("train",),  # the loop: trainer, budget, metrics, schedule, progress, report
    ("export", "export_hf", "generate", "compare", "bench", "cli", "__main__"),  # the commands
)
