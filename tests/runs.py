"""Helpers for tests that run shoestring as a user would: config files on disk."""

from __future__ import annotations

from pathlib import Path


def to_toml(tree: dict) -> str:
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


def write_config(make_config, path: Path, **overrides) -> Path:
    cfg = make_config(**overrides).to_dict()
    path.write_text(to_toml({k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in cfg.items()}))
    return path
