"""Data-parallel strategies behind one interface (`Strategy`). The trainer never asks which one
it holds."""

from __future__ import annotations

from shoestring.parallel.base import OptimizerSettings, StepResult, Strategy
from shoestring.parallel.single import SingleDevice

__all__ = ["OptimizerSettings", "SingleDevice", "StepResult", "Strategy"]
