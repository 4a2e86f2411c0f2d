"""Exact memory accounting: what autograd keeps for backward, what the model state holds, and the
real peak of the process / device.

The planner *predicts* these figures (each lever owns its estimate); this module *counts* them,
and tests hold the two together.

* `SavedActivationCounter` counts the bytes of distinct storages that stay alive between forward
  and backward because autograd (or a checkpointed region) keeps them. Weights are not
  activations and are reported apart (`weight_bytes`), as are constant views of buffers or input
  data (`constant_bytes`).
* `note_retained(tensor)` is how code that keeps tensors alive outside autograd's saved-tensor
  hooks reports them to the active counters (the checkpointing lever uses it for the inputs a
  checkpointed region keeps and for the op outputs selective checkpointing caches).
* `model_state_bytes` counts parameters, gradients and optimizer state, once per storage.
* `PeakRSS` reads the process high-water mark from /proc and can reset it.
* `device_memory` gives the peak figures of a device: the CUDA allocator's, or the process RSS on
  CPU.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

MiB = 2**20

# --------------------------------------------------------------------------------------------
# Saved activations
# --------------------------------------------------------------------------------------------

_state = threading.local()

# Autograd nodes a weight passes through on its way to being saved by a matmul: a dtype cast
# (autocast's bf16 copy), a transpose/view (`linear` saves `weight.t()`), an expand. A tensor
# whose grad_fn chain is made only of these and ends at a parameter's AccumulateGrad is a copy of
# a weight, not an activation.
_WEIGHT_SHAPING_NODES = frozenset({
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0",
    "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "AliasBackward0",
    "CloneBackward0", "SliceBackward0", "SelectBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
})


def _active_counters() -> list["SavedActivationCounter"]:
    stack = getattr(_state, "counters", None)
    if stack is None:
        stack = _state.counters = []
    return stack


def counting() -> bool:
    """True while a `SavedActivationCounter` is active in this thread (cheap; lets callers skip
    bookkeeping when nobody is counting)."""
    return bool(getattr(_state, "counters", None))


def note_retained(tensor: Any) -> None:
    """Report a tensor that stays alive until backward by a route saved-tensor hooks do not see
    (e.g. the op outputs a selective-checkpoint region caches). Every active counter records it;
    storages already counted are not counted twice. Non-tensors are ignored."""
    if not isinstance(tensor, torch.Tensor):
        return
    for counter in _active_counters():
        counter._record(tensor, retained=True)


def note_offloaded(tensor: torch.Tensor) -> None:
    """Report a saved tensor that was moved to host memory (offload): active counters add it to
    `offloaded_bytes`, not to `bytes` (which is what stays on the device)."""
    for counter in _active_counters():
        counter.offloaded_bytes += tensor.numel() * tensor.element_size()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank actually holds (a DTensor's local shard)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _storage_key(t: torch.Tensor) -> tuple[str, int, int, int]:
    """(device, data_ptr, nbytes, fallback id) of the storage behind `t`, and its size in bytes."""
    t = _local(t)
    try:
        s = t.untyped_storage()
        ptr, nbytes = s.data_ptr(), s.nbytes()
        if ptr == 0:  # empty storage: nothing held
            return (str(t.device), 0, 0, id(s))
        return (str(t.device), ptr, nbytes, 0)
    except (RuntimeError, NotImplementedError, TypeError):  # subclasses without a storage
        return (str(t.device), id(t), t.numel() * t.element_size(), id(t))


def _storage_nbytes(key: tuple[str, int, int, int]) -> int:
    return key[2]


def _derived_from_parameter(t: torch.Tensor, excluded: set) -> bool:
    """Whether `t` is a parameter, or a view / dtype cast of one (followed through at most a few
    single-input view/cast nodes)."""
    if isinstance(t, nn.Parameter):
        return True
    base = getattr(t, "_base", None)
    if isinstance(base, nn.Parameter):
        return True
    fn = t.grad_fn
    for _ in range(6):
        if fn is None:
            return False
        name = type(fn).__name__
        if name == "AccumulateGrad":
            var = fn.variable
            return isinstance(var, nn.Parameter) or _storage_key(var) in excluded
        if name not in _WEIGHT_SHAPING_NODES:
            return False
        nexts = [f for f, _ in fn.next_functions if f is not None]
        if len(nexts) != 1:
            return False
        fn = nexts[0]
    return False


class SavedActivationCounter:
    """Count the bytes autograd keeps alive from forward to backward.

    Use around a forward (or a whole forward+backward: recomputation during backward is not
    counted, and nothing else saves tensors in a backward without `create_graph`)::

        with SavedActivationCounter(model) as counter:
            loss = loss_fn(model(x), y)
        counter.bytes            # activations kept for backward
        loss.backward()

    Each distinct storage counts once, at its full size (a saved view keeps its whole storage
    alive). Not counted in `bytes`:

    * `weight_bytes`: parameters and their views / dtype casts (autocast's bf16 weight copies are
      saved by the matmuls; they are weight-sized, not activation-sized, and the precision lever
      accounts for them);
    * `constant_bytes`: storages of the model's buffers (RoPE tables) and views of tensors that
      do not require grad and have no history (buffer slices, input data).

    Pass `model` to recognise its parameters and buffers by storage; without it, parameters are
    recognised by type/history, and buffers by being history-less views.

    Saved-tensor hooks see only what autograd saves directly. A checkpointed region keeps its
    inputs and (selective checkpointing) cached op outputs by other routes; the checkpointing
    lever reports those through `note_retained`, so `bytes` is what really stays alive.
    Recent PyTorch also routes a non-reentrant checkpoint's saved inputs through the hooks; the
    storage de-duplication makes the two routes count once.

    The hooks return the tensor unchanged (a detached alias, so no reference cycle through the
    tensor's own grad_fn): counting never changes numerics or memory.
    """

    def __init__(self, model: nn.Module | None = None, exclude: Iterable[torch.Tensor] = ()):
        self._param_keys: set = set()
        self._const_keys: set = set()
        if model is not None:
            self._param_keys |= {_storage_key(p) for p in model.parameters()}
            self._const_keys |= {_storage_key(b) for b in model.buffers()}
        self._const_keys |= {_storage_key(t) for t in exclude}
        self._seen: set = set()
        self.bytes = 0
        self.retained_bytes = 0  # part of `bytes` reported through note_retained
        self.weight_bytes = 0
        self.constant_bytes = 0
        self.offloaded_bytes = 0  # moved to host memory by the offload lever
        self.tensors = 0  # distinct activation storages counted
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    # -- recording ---------------------------------------------------------------------------
    def _record(self, t: torch.Tensor, retained: bool = False) -> None:
        key = _storage_key(t)
        if key in self._seen:
            return
        self._seen.add(key)
        n = _storage_nbytes(key)
        if key in self._param_keys or _derived_from_parameter(t, self._param_keys):
            self.weight_bytes += n
        elif key in self._const_keys or (
            not t.requires_grad and t.grad_fn is None and getattr(t, "_base", None) is not None
        ):
            self.constant_bytes += n
        else:
            self.bytes += n
            self.tensors += 1
            if retained:
                self.retained_bytes += n

    @staticmethod
    def _pack(t: torch.Tensor) -> torch.Tensor:
        for counter in _active_counters():
            counter._record(t)
        # A detached alias: same storage and version counter, but no link back to the grad_fn
        # that is saving it (which would make a reference cycle for saved outputs).
        return t.detach()

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "SavedActivationCounter":
        stack = _active_counters()
        stack.append(self)
        # Only the innermost hooks fire; `_pack` fans out to every active counter.
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        stack = _active_counters()
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None
        if self in stack:
            stack.remove(self)

    def summary(self) -> dict[str, int]:
        return {"activations": self.bytes, "retained": self.retained_bytes,
                "weights": self.weight_bytes, "constants": self.constant_bytes, "offloaded": self.offloaded_bytes}


# --------------------------------------------------------------------------------------------
# Model state
# --------------------------------------------------------------------------------------------

def _held(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors holding `t`'s bytes: a wrapper subclass (a quantised NF4 weight, also as
    a DTensor's local shard) holds its inner tensors, not the storage its shape suggests."""
    t = _local(t)
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        yield t
        return
    for name in flatten()[0]:
        yield from _held(getattr(t, name))


def _unique_bytes(tensors: Iterable[torch.Tensor], seen: set) -> int:
    total = 0
    for t in (inner for outer in tensors if outer is not None for inner in _held(outer)):
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        total += _storage_nbytes(key)
    return total


def _state_tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)


def tensor_bytes(objs: Any, seen: set | None = None) -> int:
    """Bytes of the distinct storages behind every tensor in `objs` (nested lists/dicts), each
    counted once (also across calls sharing `seen`)."""
    return _unique_bytes(_state_tensors(objs), set() if seen is None else seen)


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Exact bytes held for `params`, `grads` (where present) and `optimizer` state (every tensor
    in `optimizer.state`, step counters included). A storage shared by several tensors (tied
    weights, views into a flat buffer) counts once, at its full size; a sharded (DTensor)
    parameter counts its local shard."""
    seen: set = set()
    params = list(model.parameters())
    out = {"params": _unique_bytes(params, seen)}
    out["grads"] = _unique_bytes((p.grad for p in params), seen)
    opt = 0
    if optimizer is not None:
        opt = _unique_bytes((t for state in optimizer.state.values() for t in _state_tensors(state)), seen)
    out["optimizer"] = opt
    return out


# --------------------------------------------------------------------------------------------
# Process / device peaks
# --------------------------------------------------------------------------------------------

class PeakRSS:
    """Resident-set size of this process: current and high-water mark (VmRSS / VmHWM on Linux).

    `reset()` writes "5" to /proc/self/clear_refs, which resets VmHWM to the current RSS. Where
    that is not permitted (some containers, non-Linux), `reset()` returns False, `reset_ok` says
    so, and `peak_bytes()` keeps reporting the peak since the process started.
    """

    def __init__(self) -> None:
        self.reset_ok: bool | None = None  # None: never tried
        self.reset_error: str | None = None

    @staticmethod
    def _status() -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        name, value = line.split(":", 1)
                        out[name] = int(value.split()[0]) * 1024  # kB
        except OSError:
            pass
        return out

    def current_bytes(self) -> int:
        status = self._status()
        if "VmRSS" in status:
            return status["VmRSS"]
        return self._ru_maxrss()  # no /proc: the best figure we have

    def peak_bytes(self) -> int:
        status = self._status()
        if "VmHWM" in status:
            return status["VmHWM"]
        return self._ru_maxrss()

    @staticmethod
    def _ru_maxrss() -> int:
        try:
            import resource
        except ImportError:  # Windows
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere

    def reset(self) -> bool:
        """Reset the high-water mark to the current RSS. Returns whether that worked."""
        try:
            fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
            try:
                os.write(fd, b"5")
            finally:
                os.close(fd)
            self.reset_ok, self.reset_error = True, None
        except OSError as err:
            self.reset_ok, self.reset_error = False, f"{type(err).__name__}: {err}"
        return self.reset_ok

    def as_dict(self) -> dict[str, int]:
        return {"peak_rss": self.peak_bytes(), "rss": self.current_bytes()}


def device_memory(device: torch.device | str, reset: bool = False) -> dict[str, int]:
    """Peak memory figures of `device` since the last reset.

    CUDA: the caching allocator's `peak_allocated` / `peak_reserved` (and current `allocated` /
    `reserved`). CPU: the process's `peak_rss` / `rss`. `peak` is the headline figure either way
    (peak allocated on CUDA, peak RSS on CPU). With `reset=True` the peaks are reset after being
    read (CUDA: `reset_peak_memory_stats`; CPU: the process high-water mark, see `PeakRSS`).
    The default leaves them alone, so a run's summary can read the peak of the whole run.
    """
    device = torch.device(device)
    if device.type == "cuda":
        out = {
            "peak_allocated": torch.cuda.max_memory_allocated(device),
            "peak_reserved": torch.cuda.max_memory_reserved(device),
            "allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
        }
        out["peak"] = out["peak_allocated"]
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return out
    rss = PeakRSS()
    out = rss.as_dict()
    out["peak"] = out["peak_rss"]
    if reset:
        rss.reset()
    return out


def release_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`), so that RSS is live
    memory again; a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RunPeak:
    """A run's peak memory on `device`, leaving out steps whose extra memory is the measuring's
    own: the profiled step of `CommMeter` holds the profiler's event buffers (~120 MiB per rank
    on the tiny preset), which would otherwise be read as the strategy's peak. The peak before
    such a step is kept; after it the freed heap goes back to the OS and the high-water mark
    restarts."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0
        device_memory(device, reset=True)  # the run's peak starts here, not at import

    def bytes(self) -> int:
        return max(self.before, device_memory(self.device)["peak"])

    @contextmanager
    def excluding(self, enabled: bool) -> Iterator[None]:
        if not enabled:
            yield
            return
        self.before = self.bytes()
        yield
        if self.device.type == "cpu":
            release_freed_heap()
        device_memory(self.device, reset=True)
