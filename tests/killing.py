"""Test harness: run the shoestring CLI, SIGKILLing the process in the middle of its Nth durable
file write (half the bytes on disk), to prove a kill at any byte of a save loses nothing.

usage: python tests/killing.py N shoestring-args...   (N = 0: never kill)
"""

import os
import signal
import sys

from shoestring.cli import main
from shoestring.train import checkpoint as ckpt

target = int(sys.argv[1])
calls = 0
original = ckpt._write_bytes_durably


def write_then_die(path, data):
    global calls
    calls += 1
    if calls == target:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    original(path, data)


ckpt._write_bytes_durably = write_then_die
sys.exit(main(sys.argv[2:]))
