"""Planning: the hardware catalogue, the local probe, and (later) memory/throughput/cost models."""
