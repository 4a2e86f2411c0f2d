"""`python tests/capped.py MIB RANKS ARGS...`: the shoestring command line ARGS, its data
segment capped (RLIMIT_DATA) at what it holds after its imports plus MIB MiB on the ranks named
in RANKS ("0", "0,1", "1"; a plain process is rank 0). Linux counts every private writable
mapping against the cap, so an allocation past it fails the way a full machine fails it: the
CPU allocator raises "can't allocate memory"."""

from __future__ import annotations

import os
import re
import resource
import sys

import torch  # noqa: F401  (imported, with the command's modules, before the cap is measured)

from shoestring import dist
from shoestring.cli import main
from shoestring.train import trainer  # noqa: F401


def data_bytes() -> int:
    return int(re.search(r"VmData:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


if __name__ == "__main__":
    mib, ranks, argv = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
    if os.environ.get("RANK", "0") in ranks:
        resource.setrlimit(resource.RLIMIT_DATA, (data_bytes() + mib * 2**20, resource.RLIM_INFINITY))
    dist.exit_process(main(argv))
