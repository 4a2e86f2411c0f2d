"""The point-to-point all-gather and reduce-scatter yafsdp uses on gloo equal torch's collectives
(integer-valued data: every summation order gives the same bits), at 2 and 3 ranks, with the
bytes `CommMeter` counts for them: (N-1)/N of the buffer per rank, a ring's."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.multiprocessing as mp

from shoestring.dist import free_port

CHUNK = 1000


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as tdist

    from shoestring.parallel.comm import CommMeter
    from shoestring.parallel.yafsdp import Collectives

    tdist.init_process_group("gloo")
    g = torch.Generator().manual_seed(rank)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        full = torch.randint(-50, 50, (world * CHUNK,), generator=g).to(dtype)
        shard = full[:CHUNK].clone()
        for name, comm in (("p2p", Collectives(p2p=True)), ("native", Collectives())):
            recv = torch.full(((world - 1) * CHUNK,), float("nan"), dtype=dtype)
            gathered = torch.full((world * CHUNK,), float("nan"), dtype=dtype)
            with CommMeter(world) as meter:
                works = [comm.reduce_scatter(recv, full), comm.all_gather(gathered, shard)]
                for w in works:
                    w.wait()
            out[name, dtype] = (recv[:CHUNK].clone(), gathered, meter.stats.by_collective)
    tdist.destroy_process_group()
    queue.put(pickle.dumps(out))


@pytest.mark.parametrize("world", [2, 3])
def test_p2p_collectives_equal_torchs(world):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()  # for the group's store
    procs = [ctx.Process(target=_worker, args=(r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = [pickle.loads(queue.get(timeout=120)) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    for out in results:
        for dtype in (torch.float32, torch.bfloat16):
            (rs, ag, sent), (rs_ref, ag_ref, _) = out["p2p", dtype], out["native", dtype]
            assert torch.equal(rs, rs_ref) and torch.equal(ag, ag_ref)
            # Each rank sends its shard to N-1 peers and N-1 chunks of the gradient: a ring's bytes.
            assert sent == {"gloo:send": 2 * (world - 1) * CHUNK * dtype.itemsize, "gloo:recv": 0}
