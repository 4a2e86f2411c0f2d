"""Data-parallel strategies behind one interface (`Strategy`). The trainer never asks which one
it holds; `strategy_class` maps the config's `parallel.strategy` to its module, imported only
when chosen (DeepSpeed is an optional extra)."""

from __future__ import annotations

import importlib

from shoestring.parallel.base import OptimizerSettings, StepResult, Strategy

_CLASSES = {
    "single": "shoestring.parallel.single:SingleDevice",
    "ddp": "shoestring.parallel.ddp:DDP",
    "fsdp2": "shoestring.parallel.fsdp2:FSDP2",
    "yafsdp": "shoestring.parallel.yafsdp:YaFSDP",
    "deepspeed": "shoestring.parallel.deepspeed:DeepSpeed",
}


def strategy_class(name: str) -> type[Strategy]:
    module, cls = _CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["OptimizerSettings", "StepResult", "Strategy", "strategy_class"]
