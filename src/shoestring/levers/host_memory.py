"""Host-memory lever: keep the memory a step frees in the process, so the next step does not
fault it in again.

glibc's malloc gives large freed blocks back to the kernel: a block above its mmap threshold is
unmapped when freed, and the top of its heap is trimmed once more than the trim threshold is
free. A training step frees its activations at the end of backward and asks for the same sizes in
the next forward, so every step maps, faults and zeroes the same pages again. On the `small`
preset (8 x 256, bf16, blocks compiled, 2 threads) that was 11,000-69,000 minor faults and
0.04-0.19 s of kernel time a step on a 2-core AMD EPYC (Zen 5) virtual machine, in a 0.7-0.9 s
step, and the step's time varied with them (docs/performance.md).

`keep_freed_memory()` turns glibc's mmap path off (`mallopt(M_MMAP_MAX, 0)`) and its trimming
(`M_TRIM_THRESHOLD` at its largest, which also stops glibc adjusting it): every block comes from
the heap and the heap is never trimmed. The process then reuses its own pages: faults fall to
about zero after the first step. Raising the mmap threshold instead is not enough: glibc takes
it only up to 32 MiB, and a bigger block (HF's `tokens x vocab` fp32 logits, 64 MiB at 8 x 256 x
8192; an embedding's gradient at a real vocabulary) was otherwise mapped, faulted and unmapped
every step: 24,600 faults a step in the HF model's step with the threshold alone
(docs/performance.md).

What it costs: freed memory stays in the process's resident set, so a later phase that needs
less does not give it back (the peak is unchanged: it is the most the process held at once), and
blocks that glibc would have mapped separately now share one heap, where they can fragment: the
peak rose by up to 10% in one configuration measured on a Zen 4 (yafsdp, pure bf16, full
checkpointing, 4 x 512), by 4% on our `small` step at 16 x 512, and not at all in others
(docs/performance.md). The planner does not model that separately: its memory calibration is
fitted on runs built with this lever on (the default).

Where it pays (`decide`, for `train.keep_host_memory = "auto"`, the default): in a process that
trains alone (one rank), where it was measured: 1.2x on the `small` step above, its faults gone.
On two ranks of one thread each (yafsdp and fsdp2, `small`, measured the same day through the
planner's rows, fresh processes either way) the step times did not move beyond their noise, and
the peak rose by 0-10%, so ranks keep glibc's defaults. `true` / `false` force it. Off glibc
(macOS, musl) there is no `mallopt`, and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from shoestring.levers.precision import Choice

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
NEVER_TRIM = 2**31 - 1  # an int: the largest trim threshold mallopt takes
NO_MMAP = 0  # the most blocks glibc may map on their own: none, every block comes from the heap


def decide(setting: bool | str, world_size: int) -> Choice:
    """Resolve `train.keep_host_memory` (True, False or "auto") for a run of `world_size` ranks,
    with the reason (module docstring: the rule)."""
    if setting != "auto":
        return Choice(bool(setting), f"train.keep_host_memory = {str(setting).lower()}")
    if world_size == 1:
        return Choice(True, "one process: its steps reuse the memory the last one freed instead of faulting it in")
    return Choice(False, f"{world_size} ranks: no gain measured on ranks, and up to 10% more peak memory")


@functools.cache
def keep_freed_memory() -> bool:
    """Keep every freed block in this process from now on. True where glibc took the setting;
    once per process (the setting is the process's, and lasts)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_MAX, NO_MMAP)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
