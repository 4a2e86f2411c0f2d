"""The hardware catalogue (`hardware.toml`): memory, speed and price of training devices."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import torch

CATALOGUE_PATH = Path(__file__).with_name("hardware.toml")


@cache
def catalogue() -> dict[str, dict[str, Any]]:
    return tomllib.loads(CATALOGUE_PATH.read_text())


def catalogue_key(device: torch.device) -> str:
    """Best catalogue entry for a local device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key in catalogue():
            if key.split("-")[0] in name:
                return key
    return "cpu"


def default_price(device: torch.device) -> tuple[float, str]:
    """(USD per device-hour, where that figure comes from)."""
    key = catalogue_key(device)
    entry = catalogue()[key]
    return entry["price_per_hour"], f"catalogue price for {key}: {entry['price_source']}"
