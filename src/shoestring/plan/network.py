"""A step's collectives priced on the links they cross (the alpha-beta model).

A strategy lists its collectives with the ranks each spans (`parallel/cost.py`: its shard group,
across groups, the world); here each becomes a ring of N ranks over M nodes, with ranks numbered
node by node (torchrun's order, and the order shard groups take consecutive ranks in):

    time = calls x (call latency + intra-node steps x intra latency + inter-node steps x inter latency)
           + bytes one rank sends / per-device bandwidth of the slowest link the ring crosses

Steps: N-1 for an all-gather or a reduce-scatter, 2(N-1) for an all-reduce, of which M-1, resp.
2(M-1), cross nodes (NCCL's own ring model, src/graph/tuning.cc). Hybrid sharding is then
hierarchical by construction: its reduce-scatter and all-gather run within a group (inside a
node when the group fits in one), and only the all-reduce of the gradient shards crosses nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoestring.parallel.cost import Collective, Cost
from shoestring.plan.catalogue import Device


@dataclass(frozen=True)
class Ring:
    ranks: int
    nodes: int


def ring_of(c: Collective, world: int, group: int, per_node: int) -> Ring:
    """The ring a collective runs on: its ranks and how many nodes they span."""
    def nodes(consecutive: int) -> int:
        return -(-consecutive // per_node)

    if c.size:  # a sub-group of consecutive ranks
        return Ring(c.size, nodes(c.size))
    if c.span == "world":
        return Ring(world, nodes(world))
    if c.span == "group":
        return Ring(group, nodes(group))
    replicas = world // group  # one rank per group: as many nodes as groups, or all of them
    return Ring(replicas, min(replicas, nodes(world) if group < per_node else replicas))


def _steps(kind: str, n: int) -> int:
    return (2 if kind == "all_reduce" else 1) * (n - 1)


@dataclass(frozen=True)
class Priced:
    seconds: float
    sent_bytes: float
    link: str  # "intra" (inside a node) or "inter" (crosses nodes)


def price(c: Collective, world: int, group: int, device: Device) -> Priced:
    ring = ring_of(c, world, group, device.per_node)
    if ring.ranks <= 1:
        return Priced(0.0, 0.0, "intra")
    inter = ring.nodes > 1
    across_steps = _steps(c.kind, ring.nodes)
    alpha = (device.call_latency_us + (_steps(c.kind, ring.ranks) - across_steps) * device.intra_latency_us
             + across_steps * device.inter_latency_us) * 1e-6
    sent = c.sent_bytes(ring.ranks)
    bandwidth = (device.inter_gbs if inter else device.intra_gbs) * 1e9
    return Priced(c.calls * alpha + sent / bandwidth, sent, "inter" if inter else "intra")


@dataclass(frozen=True)
class Communication:
    seconds: float  # all of it, before any overlap with compute
    bytes_by_link: dict[str, float]  # bytes one device sends per step: inside nodes, across nodes
    calls: int


def communication(cost: Cost, world: int, group: int, device: Device) -> Communication:
    seconds, links, calls = 0.0, {"intra": 0.0, "inter": 0.0}, 0
    for c in cost.collectives:
        p = price(c, world, group, device)
        seconds += p.seconds
        links[p.link] += p.sent_bytes
        calls += c.calls
    return Communication(seconds, links, calls)
