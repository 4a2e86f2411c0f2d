"""Optional packages imported without their import-time noise (a leaf: imports nothing of ours).

torchao (QLoRA's NF4, and imported by transformers whenever it is installed) logs a warning
for every CUDA kernel library its wheel carries that this machine cannot load, none of which
NF4 uses, and torch logs a deprecation note for each enum torchao registers with its pytree.
A newcomer's `make finetune` should not open with those."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
