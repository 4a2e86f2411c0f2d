"""Planning: the hardware catalogue, the local probe, the memory, throughput and cost models, and
the search over devices, levers and strategies (`shoestring plan`, `train --auto`). It asks the
levers and strategies for their costs; the trainer asks it (the probe's facts, `--auto`)."""
