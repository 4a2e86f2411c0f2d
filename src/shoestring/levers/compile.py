"""Compile lever: `torch.compile` each transformer block on its own (regional compilation).

All blocks share one architecture, so dynamo compiles the first and reuses the code for the
rest: compile time is that of one block, not of the whole model.
"""

from __future__ import annotations

from shoestring.models.llama import Llama


def compile_blocks(model: Llama) -> None:
    for block in model.layers:
        block.compile()
