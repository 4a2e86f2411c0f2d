"""Test harness: run the shoestring CLI and signal it from the inside at a chosen moment.

    python tests/killing.py kill-write N  shoestring-args...   SIGKILL midway through the Nth durable
                                                                file write (half its bytes on disk)
    python tests/killing.py term-step K   shoestring-args...   SIGTERM at the start of step K
    python tests/killing.py term-twice K  shoestring-args...   two SIGTERMs at the start of step K
    python tests/killing.py none 0        shoestring-args...   no signal

Signalling from inside makes the moment exact and independent of machine speed.
"""

import os
import signal
import sys

from shoestring import checkpoint as ckpt
from shoestring import dist
from shoestring.cli import main
from shoestring.train import trainer

mode, n = sys.argv[1], int(sys.argv[2])
calls = 0

if mode == "kill-write":
    original_write = ckpt._write_bytes_durably

    def write_then_die(path, data):
        global calls
        calls += 1
        if calls == n:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        original_write(path, data)

    ckpt._write_bytes_durably = write_then_die
elif mode in ("term-step", "term-twice"):
    original_lr_at = trainer.lr_at

    def lr_then_term(step, **kw):
        if step == n:
            for _ in range(2 if mode == "term-twice" else 1):
                os.kill(os.getpid(), signal.SIGTERM)
        return original_lr_at(step, **kw)

    trainer.lr_at = lr_then_term

dist.exit_process(main(sys.argv[3:]))
