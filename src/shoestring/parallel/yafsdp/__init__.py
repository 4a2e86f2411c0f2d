"""A YaFSDP-style sharded data-parallel engine (`parallel.strategy = "yafsdp"`).

Each transformer block's matrices form one flat padded unit (`flat.FlatLayout`), sharded evenly:
rank r owns a contiguous 1/N slice. Units stream through two reused gather buffers and two reused
gradient buffers (plus one pair for embedding and head), and every all-gather and reduce-scatter
is issued in an explicit order so that it overlaps with compute. Read in this order:

* `units`: what a unit and a slot (a unit's buffers) are, and how the model is cut into units;
* `engine`: the `YaFSDP` strategy; its section "the schedule" is one micro-step's events in order;
* `collectives`: the all-gather and reduce-scatter (point-to-point ones on gloo), counted;
* `relayout`: checkpoints, cut again on load for any world size; the full weights for export;
* `cost`: the static model of state bytes, buffers and bytes communicated, which the planner
  asks `YaFSDP` for.
"""

from shoestring.parallel.yafsdp.collectives import REDUCE_DTYPES, Collectives
from shoestring.parallel.yafsdp.cost import FrozenBase
from shoestring.parallel.yafsdp.engine import YaFSDP

__all__ = ["REDUCE_DTYPES", "Collectives", "FrozenBase", "YaFSDP"]
