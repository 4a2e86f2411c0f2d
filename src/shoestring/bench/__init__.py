"""Side-by-side benchmarks: each configuration measured in its own processes (so peak memory is
that configuration's alone), timed rounds taken in turns across configurations (so machine noise
hits all of them alike, and no round overlaps another's), medians reported."""
