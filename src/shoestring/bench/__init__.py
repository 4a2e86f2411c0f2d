"""Side-by-side benchmarks: each configuration measured in its own fresh process (so peak memory
is that configuration's alone), rounds interleaved across configurations (so machine noise hits
all of them alike), medians reported."""
