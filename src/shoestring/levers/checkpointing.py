"""Activation-checkpointing lever: how to apply it, and what it saves and costs.

Modes (the `checkpointing.mode` config string):

| mode        | what autograd keeps per block between forward and backward        | recompute in backward          |
|-------------|--------------------------------------------------------------------|--------------------------------|
| `none`      | every tensor the block's ops save (norm inputs, linear inputs, q/k/v/out/lse, MLP intermediates) | nothing |
| `full`      | the block input only                                               | the block forward (up to the last needed tensor) |
| `every:K`   | blocks `i % K == 0` as `full`, the others as `none` (`every:1` is `full`) | those blocks' forwards |
| `selective` | block input + outputs of matmuls and of attention (op-level policy) | element-wise ops only (norms, RoPE, SiLU, mul, casts) |
| `offload`   | (device) nothing but weights: saved tensors go to pinned host memory | none; PCIe copies out and back |

The lever is applied from outside: `apply_checkpointing(model, mode)` replaces the `forward` of
each selected block *instance* with a checkpointed one. No module is wrapped or renamed, so
parameter names and state_dict keys are unchanged, and `torch.compile` of blocks and FSDP2's
`fully_shard` of blocks compose with it (both act on the block module and call its `forward`).
Checkpointing is non-reentrant (`use_reentrant=False`).

The cost half: `estimate_saved_activation_bytes` counts, from the model's shapes, the bytes
autograd keeps for the transformer blocks in each mode; `estimate_recompute_flops_fraction` gives
the extra matmul FLOPs relative to a step. `tests/test_checkpointing.py` holds the estimate to the
bytes `shoestring.measure.memory.SavedActivationCounter` counts (exact, eager mode, CPU).

What it costs in time is not the FLOP fraction alone. Measured on a 2-core AVX-512-BF16 CPU
(tiny preset, 16 x 256 tokens, bf16 autocast, torch 2.13, eager): element-wise ops are about
half of a block's forward time there (matmuls are fast, element-wise work is memory-bound and
unfused), and selective checkpointing routes every op of a region through two Python
`TorchDispatchMode`s (SAC's caching mode in forward, its cached mode in the recompute): about
10% of the step on their own, whatever the policy saves. So in eager mode on CPU `selective`
costs about as much time as `full` (+15-20%), and `every:2` is the better half-way point. Under
`torch.compile` (the compile lever, applied after this one) the policy is applied by the
partitioner instead, with no per-op dispatch: there `selective` costs about nothing (-1%, rounds
from -3% to +6%) and `full` what recomputing the forward costs (+15%, rounds from +8% to +20%).
Measured on the same CPU: `small` preset, 8 x 256 tokens, bf16, blocks compiled, the three modes
in one process, 9 interleaved rounds of 2 steps, one thread's CPU time per step (the machine was
shared, so CPU time rather than wall time; the planner's idle fit run found +15% / -4%,
`plan/hardware.toml` `[calibration.cpu.compiled]`). Under compile the saved tensors also differ
(fusion saves fewer): the estimate takes `compiled=True`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from shoestring.errors import UserError
from shoestring.measure import memory
from shoestring.models.attention import attention_forward
from shoestring.models.llama import ModelArgs

MODES_HELP = "none, full, every:K (K>=1), selective, offload"
_EVERY = re.compile(r"^every:([1-9]\d*)$")


def parse_mode(mode: str) -> tuple[str, int]:
    """`mode` string -> (kind, k). kind is one of none, full, every, selective, offload; k is the
    period for `every` (blocks i with i % k == 0 are checkpointed, so block 0 always is) and 1 for
    `full`, 0 otherwise. `every:1` normalises to ("full", 1)."""
    mode = mode.strip()
    if mode in ("none", "selective", "offload"):
        return mode, 0
    if mode == "full":
        return "full", 1
    m = _EVERY.match(mode)
    if m:
        k = int(m.group(1))
        return ("full", 1) if k == 1 else ("every", k)
    raise UserError(f"unknown activation-checkpointing mode {mode!r}", f"use one of {MODES_HELP}")


def checkpointed_blocks(n_layers: int, mode: str) -> list[int]:
    """Indices of the blocks the mode recomputes (or offloads)."""
    kind, k = parse_mode(mode)
    if kind == "none":
        return []
    if kind == "every":
        return [i for i in range(n_layers) if i % k == 0]
    return list(range(n_layers))


# --------------------------------------------------------------------------------------------
# Selective (op-level) policy
# --------------------------------------------------------------------------------------------

def _aten_ops(*names: str) -> frozenset:
    ops = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            ops.add(packet.default)
    return frozenset(ops)


# Outputs kept by `selective`: the matmuls, and attention (on CPU `F.scaled_dot_product_attention`
# dispatches to `_scaled_dot_product_flash_attention_for_cpu`, and so does the forward of
# `models/attention.py`'s blocked attention, unless windowed or soft-capped: then its own op; on CUDA to the flash / efficient / cuDNN
# kernels, or to the math path, which is made of bmm's). These are the ops whose recompute
# costs FLOPs; everything else in a block (RMSNorm, RoPE, SiLU, the SwiGLU product, dtype casts,
# views) is element-wise and cheap to recompute, so it is PREFER_RECOMPUTE.
SAVE_OPS = _aten_ops(
    "mm", "addmm", "bmm",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward",
    "_efficient_attention_forward",
) | {attention_forward._opoverload}  # windowed / soft-capped attention (models/attention.py)


def _resolve_op(name: str):
    """'aten.mm.default' -> torch.ops.aten.mm.default (ops do not pickle; their names do)."""
    obj = torch.ops
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _note_outputs(out: Any) -> None:
    if isinstance(out, torch.Tensor):
        memory.note_retained(out)
    elif isinstance(out, (tuple, list)):
        for o in out:
            _note_outputs(o)


def make_selective_policy(save_ops: frozenset = SAVE_OPS) -> Callable[..., CheckpointPolicy]:
    """The SAC policy: MUST_SAVE the outputs of `save_ops`, PREFER_RECOMPUTE everything else.

    The outputs SAC caches live in the checkpoint's own storage, not in autograd's saved
    tensors, so no saved-tensor hook sees them: while a `SavedActivationCounter` is active they
    are reported to it here (`ctx.op_output` is the very tensor SAC caches a detached alias of,
    so the storage is the same)."""

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in save_ops:
            if memory.counting() and not torch.compiler.is_compiling():
                _note_outputs(getattr(ctx, "op_output", None))
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


selective_policy = make_selective_policy(SAVE_OPS)


def _selective_context_fn(save_ops: frozenset = SAVE_OPS):
    policy = selective_policy if save_ops is SAVE_OPS else make_selective_policy(save_ops)
    return create_selective_checkpoint_contexts(policy)


# --------------------------------------------------------------------------------------------
# Offload
# --------------------------------------------------------------------------------------------

class OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors go to (pinned) host memory in forward and come back in backward.

    Like `torch.autograd.graph.save_on_cpu(pin_memory=True)`, with two differences that matter
    for training: parameters (and views/casts of them) stay where they are instead of being
    copied to the host and back every step, and a storage saved by several ops is copied once.
    Tensors already on the host are kept as they are unless `copy_host=True` (tests use it to run
    the real pack/unpack path on CPU).
    """

    def __init__(self, pin_memory: bool = True, copy_host: bool = False):
        self._packed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

        def pack(t: torch.Tensor):
            if memory._derived_from_parameter(t, set()) or (t.device.type == "cpu" and not copy_host):
                return (None, t.detach())  # an alias: no reference cycle through t's own grad_fn
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            hit = self._packed.get(key)
            if hit is None:
                pin = pin_memory and torch.cuda.is_available() and not t.is_sparse
                host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
                host.copy_(t, non_blocking=pin)
                # Keep the source until the region ends: once packed, autograd lets it go, and a
                # new tensor at the same address would otherwise hit this entry.
                self._packed[key] = hit = (t, host)
                memory.note_offloaded(host)
            return (t.device, hit[1])

        def unpack(packed):
            device, t = packed
            return t if device is None else t.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)

    def __exit__(self, *exc: Any) -> None:
        self._packed = {}  # the host copies live on in the graph; drop our index and the sources
        super().__exit__(*exc)


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------

class _CheckpointedForward:
    """Replaces a block instance's `forward`. A module-level class, not a closure, so the model
    still pickles, and `copy.deepcopy` of the model points the copy at the copied block."""

    def __init__(self, module: nn.Module, kind: str, previous: Callable | None, save_ops: frozenset = SAVE_OPS):
        self.module = module
        self.kind = kind
        self.previous = previous  # an instance-level forward someone set before us, if any
        self.save_ops = save_ops  # selective only

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["save_ops"] = None if self.save_ops is SAVE_OPS else sorted(str(op) for op in self.save_ops)
        return state

    def __setstate__(self, state: dict) -> None:
        names = state.get("save_ops")
        state["save_ops"] = SAVE_OPS if names is None else frozenset(_resolve_op(n) for n in names)
        self.__dict__.update(state)

    def _inner(self) -> Callable:
        if self.previous is not None:
            return self.previous
        return functools.partial(type(self.module).forward, self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._inner()
        if self.kind == "offload":
            _require_cuda(args)
            with OffloadHooks(pin_memory=True):
                return fn(*args, **kwargs)
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)  # no graph, nothing to save: no checkpoint overhead
        if self.kind == "selective":
            # a plain function or a functools.partial: the two context_fn forms dynamo can trace
            context_fn = (_selective_context_fn if self.save_ops is SAVE_OPS
                          else functools.partial(_selective_context_fn, self.save_ops))
            out = checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
        else:
            out = checkpoint(fn, *args, use_reentrant=False, **kwargs)
        if not torch.compiler.is_compiling() and memory.counting():
            # The region keeps its inputs for the recompute (recent PyTorch also saves them
            # through the saved-tensor hooks; the counter de-duplicates storages).
            for a in (*args, *kwargs.values()):
                memory.note_retained(a)
        return out


def _require_cuda(tensors) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "cuda":
            raise UserError(
                f"checkpointing mode 'offload' moves saved activations from a CUDA device to pinned host "
                f"memory; this model runs on {t.device.type}",
                "use checkpointing.mode = full or selective on CPU",
            )


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "model"):  # Hugging Face *ForCausalLM
        layers = getattr(model.model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__} has no `layers` ModuleList of transformer blocks to checkpoint")
    return layers


def apply_checkpointing(model: nn.Module, mode: str) -> None:
    """Apply `mode` to the blocks of `model.layers`, in place.

    Idempotent: applying again first restores the blocks' own forwards, so `none` undoes any
    earlier mode. Parameter names and state_dict keys are unchanged. `offload` needs the model on
    a CUDA device (a CPU model raises `UserError`; a meta model is checked at the first forward).
    """
    kind, _ = parse_mode(mode)
    layers = _blocks(model)
    if kind == "offload":
        devices = {p.device.type for p in model.parameters()}
        if devices - {"cuda", "meta"}:
            _require_cuda([next(p for p in model.parameters() if p.device.type not in ("cuda", "meta"))])
    selected = set(checkpointed_blocks(len(layers), mode))
    for i, block in enumerate(layers):
        current = block.__dict__.get("forward")
        if isinstance(current, _CheckpointedForward):
            previous = current.previous
            if previous is None:
                del block.__dict__["forward"]
            else:
                block.__dict__["forward"] = previous
        else:
            previous = current
        if i in selected:
            block.__dict__["forward"] = _CheckpointedForward(block, "offload" if kind == "offload" else
                                                            "selective" if kind == "selective" else "full", previous)


def checkpointing_mode_of(model: nn.Module) -> list[str]:
    """Per block: 'none', 'full', 'selective' or 'offload' (for reports and tests)."""
    out = []
    for block in _blocks(model):
        f = block.__dict__.get("forward")
        out.append(f.kind if isinstance(f, _CheckpointedForward) else "none")
    return out


# --------------------------------------------------------------------------------------------
# Cost: saved-activation bytes
# --------------------------------------------------------------------------------------------

_PRECISIONS = {
    # precision: (autocast?, residual-stream element size, compute element size)
    "fp32": (False, 4, 4),
    "bf16": (True, 4, 2),
    "fp16": (True, 4, 2),
    "bf16-pure": (False, 2, 2),
}


def _precision(precision: str | int) -> tuple[bool, int, int]:
    if isinstance(precision, int):  # element size of activations, as the precision lever reports it
        precision = {4: "fp32", 2: "bf16"}.get(precision, "")
    if precision not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(_PRECISIONS)} (or 4 / 2)")
    return _PRECISIONS[precision]


def _fused_rms_norm(device_type: str) -> bool:
    # On CPU `F.rms_norm` decomposes into pow/mean/rsqrt/mul (measured). On CUDA recent PyTorch
    # runs the fused `_fused_rms_norm` kernel, which saves only input and rstd (not measured here:
    # no GPU was at hand; verify with the counter on a GPU).
    return device_type == "cuda" and hasattr(torch.ops.aten, "_fused_rms_norm")


def block_saved_tensors(args: ModelArgs, batch: int, seq_len: int, precision: str | int = "fp32",
                        device_type: str = "cpu", compiled: bool = False) -> dict[str, list[tuple[str, int]]]:
    """What one block keeps for backward, tensor by tensor: {"none": [(name, bytes), ...],
    "input": [...], "saved_ops": [...]} — `none` mode's saved tensors, the block input a
    checkpointed region retains, and the outputs the selective policy caches.

    Derived from what autograd saves in `Block.forward` (checked op by op with saved-tensor hooks,
    PyTorch 2.13 CPU):

    * RMSNorm (CPU, composite): x as fp32 (the input itself, or its fp32 upcast when the input is
      bf16), x*rstd in fp32, rstd (one fp32 per token). Fused (CUDA): the input and rstd.
    * each Linear saves its input (the weight is not an activation). Under autocast every Linear
      casts its fp32 input to bf16 separately (autocast caches only weight casts), so q/k/v
      save three bf16 copies of the normed x, gate/up two; without autocast they share one.
    * RoPE saves cos and sin, not x: in bf16 (autocast or bf16-pure) as fresh casts of the fp32
      tables (4 per block, seq x head_dim each); in fp32 the tables themselves (made once per
      forward from a buffer: constants, not activations).
    * SDPA (flash on CPU/CUDA) saves q and k after RoPE, v, its output and the fp32 logsumexp
      (batch x heads x seq). o_proj's input is a view of that output.
    * SiLU (or GeGLU's tanh-GELU) saves its input (gate), the gated product saves act(gate) and
      up, down_proj its input. The residual adds save nothing; biases add no saved tensor.
    * The family switches (models/llama.py): q/k norms (Qwen3, Gemma 3) save what a norm saves,
      over each head's q and k, and their output only reaches RoPE (which saves no q or k);
      post-norms (Gemma 2/3) add the norms of the attention and MLP outputs, whose inputs they
      save (as fp32 upcasts under autocast); Gemma's norm offset saves each norm's (1 + weight);
      a sliding window or soft-capped scores (models/attention.py's blocked attention) save what
      flash attention does: q, k, v, out, logsumexp.

    `compiled`: the block runs as one `torch.compile`d graph (the compile lever), whose
    partitioner saves its own set (counted with the trainer's counter, small preset, CPU, torch
    2.13): the block input and the two rstd; each normed x once in the matmul dtype (the casts
    are fused, so q/k/v and gate/up share one copy); q, k, v, attention out and its logsumexp;
    o_proj's input as its own contiguous copy; gate, up and their product (silu(gate) is
    recomputed); RoPE's cos/sin casts twice, not four times; with q/k norms, q and k before them
    and their rstd; with post-norms, both sub-block outputs and two more rstd, but no copy of
    o_proj's input (biases, the norm offset, GeGLU, windows and soft-caps save nothing more:
    counted). Checkpointed blocks keep
    their input (`full`) or the matmul and attention outputs but down_proj's, which backward does
    not need (`selective`) unless a post-norm follows it.
    """
    autocast, r, c = _precision(precision)
    d, f, h = args.dim, args.ffn_dim, args.n_heads
    q_dim, kv_dim = args.q_dim, args.kv_dim
    bt = batch * seq_len
    fused = _fused_rms_norm(device_type)
    if compiled:
        return _compiled_block_saved_tensors(args, batch, seq_len, r, c)

    def norm(name: str, consumers: int, width: int = d, rows: int = bt, in_size: int = r) -> list[tuple[str, int]]:
        """A norm over `width` features of `rows` rows whose input is `in_size` bytes an element,
        and whose output `consumers` linears save."""
        if fused:
            saved = [(f"{name}.input", rows * width * in_size), (f"{name}.rstd", rows * 4)]
        else:
            saved = [(f"{name}.input_fp32", rows * width * 4), (f"{name}.x_rstd", rows * width * 4), (f"{name}.rstd", rows * 4)]
        # the normed output, as saved by the Linears that consume it
        copies = consumers if autocast else min(consumers, 1)
        saved += [(f"{name}.out_as_linear_input[{i}]", rows * width * c) for i in range(copies)]
        return saved

    none = norm("input_layernorm", 3)
    if args.qk_norm:  # per head, on q and k as q_proj / k_proj made them (RoPE then saves no q or k)
        none += norm("q_norm", 0, args.head_dim, bt * h, c) + norm("k_norm", 0, args.head_dim, bt * args.n_kv_heads, c)
    if c == 2:  # the fp32 tables cast to the activations' dtype, per use (autocast or bf16-pure)
        none += [(f"rope.cos_sin_cast[{i}]", seq_len * args.head_dim * c) for i in range(4)]
    none += [
        ("attn.q_rope", bt * q_dim * c), ("attn.k_rope", bt * kv_dim * c), ("attn.v", bt * kv_dim * c),
        ("attn.out", bt * q_dim * c), ("attn.logsumexp", batch * h * seq_len * 4),
    ]
    if args.post_norms:  # Gemma: the attention and MLP outputs are normed (their norms save them), and
        # the pre-MLP norm is pre_feedforward_layernorm
        none += norm("post_attention_layernorm", 0, in_size=c) + norm("pre_feedforward_layernorm", 2)
    else:
        none += norm("post_attention_layernorm", 2)
    none += [("mlp.gate", bt * f * c), ("mlp.act_gate", bt * f * c), ("mlp.up", bt * f * c), ("mlp.hidden", bt * f * c)]
    if args.post_norms:
        none += norm("post_feedforward_layernorm", 0, in_size=c)
    if args.norm_offset:  # each norm's (offset + weight), made in forward and saved by its multiply
        w = 2 if precision == "bf16-pure" else 4
        none += [("norms.offset_weights", (args.norms_per_block() * d + 2 * args.head_dim * args.qk_norm) * w)]

    saved_ops = [
        ("q_proj.out", bt * q_dim * c), ("k_proj.out", bt * kv_dim * c), ("v_proj.out", bt * kv_dim * c),
        ("sdpa.out", bt * q_dim * c), ("sdpa.logsumexp", batch * h * seq_len * 4),
        ("o_proj.out", bt * d * c), ("gate_proj.out", bt * f * c), ("up_proj.out", bt * f * c),
        ("down_proj.out", bt * d * c),
    ]
    return {"none": none, "input": [("block.input", bt * d * r)], "saved_ops": saved_ops}


def _compiled_block_saved_tensors(args: ModelArgs, batch: int, seq_len: int, r: int, c: int) -> dict[str, list[tuple[str, int]]]:
    d, f = args.dim, args.ffn_dim
    q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    bt = batch * seq_len
    attn = [("attn.q_rope", bt * q_dim * c), ("attn.k_rope", bt * kv_dim * c), ("attn.v", bt * kv_dim * c),
            ("attn.out", bt * q_dim * c), ("attn.logsumexp", batch * args.n_heads * seq_len * 4)]
    none = [("block.input", bt * d * r), ("norms.rstd[0]", bt * 4), ("norms.rstd[1]", bt * 4),
            ("input_layernorm.out", bt * d * c), *attn, ("post_attention_layernorm.out", bt * d * c),
            ("mlp.gate", bt * f * c), ("mlp.up", bt * f * c), ("mlp.hidden", bt * f * c)]
    if args.post_norms:  # both sub-block outputs (the post-norms' inputs) and their rstd; o_proj's
        # input then stays a view of the attention output (counted)
        none += [("o_proj.out", bt * d * c), ("down_proj.out", bt * d * c), ("norms.rstd[2]", bt * 4), ("norms.rstd[3]", bt * 4)]
    else:
        none += [("o_proj.input", bt * q_dim * c)]
    if c == 2:  # RoPE tables cast to the matmul dtype (fp32: views of the model's buffers)
        none += [(f"rope.cos_sin_cast[{i}]", seq_len * args.head_dim * c) for i in range(2)]
    if args.qk_norm:  # q and k as the projections made them, and the per-head rstd
        none += [("q_norm.input", bt * q_dim * c), ("k_norm.input", bt * kv_dim * c),
                 ("q_norm.rstd", bt * args.n_heads * 4), ("k_norm.rstd", bt * args.n_kv_heads * 4)]
    saved_ops = [("q_proj.out", bt * q_dim * c), ("k_proj.out", bt * kv_dim * c), ("v_proj.out", bt * kv_dim * c),
                 ("sdpa.out", bt * q_dim * c), ("sdpa.logsumexp", batch * args.n_heads * seq_len * 4),
                 ("o_proj.out", bt * d * c), ("gate_proj.out", bt * f * c), ("up_proj.out", bt * f * c)]
    if args.post_norms:  # post_feedforward_layernorm's backward needs down_proj's output
        saved_ops.append(("down_proj.out", bt * d * c))
    return {"none": none, "input": [("block.input", bt * d * r)], "saved_ops": saved_ops}


def estimate_saved_activation_bytes(args: ModelArgs, mode: str, batch: int, seq_len: int,
                                    precision: str | int = "fp32", device_type: str = "cpu", compiled: bool = False) -> int:
    """Bytes autograd keeps alive between forward and backward for the transformer blocks
    (not the embedding, final norm or loss), summed over blocks, for `mode`.

    `precision` is a precision mode ("fp32", "bf16" / "fp16" autocast, "bf16-pure"), or an
    activation element size (4 -> fp32, 2 -> bf16 autocast). Under autocast the residual stream
    and the norms' saved tensors stay fp32 while matmul inputs are bf16; the estimate follows
    each tensor's own dtype (see `block_saved_tensors`).

    `compiled`: blocks under `torch.compile` (the compile lever), whose graph saves its own,
    smaller set (`block_saved_tensors`).

    `offload` returns the device-resident bytes (0: everything but weights goes to the host);
    the host then holds `estimate(..., "none")` in pinned memory and each step copies that much
    out and back.
    """
    kind, _ = parse_mode(mode)
    per = block_saved_tensors(args, batch, seq_len, precision, device_type, compiled)
    none = sum(n for _, n in per["none"])
    inp = sum(n for _, n in per["input"])
    ops = sum(n for _, n in per["saved_ops"])
    n_ckpt = len(checkpointed_blocks(args.n_layers, mode))
    n_plain = args.n_layers - n_ckpt
    if kind == "offload":
        return 0
    if kind == "selective":
        return n_ckpt * (inp + ops) + n_plain * none
    return n_ckpt * inp + n_plain * none


# --------------------------------------------------------------------------------------------
# Cost: recompute FLOPs
# --------------------------------------------------------------------------------------------

def _forward_flops_per_token(args: ModelArgs, seq_len: int) -> dict[str, float]:
    """Forward matmul FLOPs per token, by part (attention scores and values counted unmasked,
    as `ModelArgs.flops_per_token` does)."""
    d, f = args.dim, args.ffn_dim
    q_dim, kv_dim = args.q_dim, args.kv_dim
    return {
        "qkv": 2 * d * (q_dim + 2 * kv_dim),
        "attention": args.attention_flops_per_token(seq_len) / 3 / args.n_layers,  # a block's, on average (windows)
        "o_proj": 2 * q_dim * d,
        "gate_up": 4 * d * f,
        "down_proj": 2 * f * d,
        "lm_head": 2 * d * args.vocab_size,
    }


def estimate_recompute_flops_fraction(mode: str, args: ModelArgs, seq_len: int | None = None) -> float:
    """Extra matmul FLOPs the mode adds, as a fraction of one training step's FLOPs without
    checkpointing (forward + backward = 3 forwards of every block and the LM head).

    * `full`: each block's forward runs again in backward, except its last matmul (down_proj):
      non-reentrant checkpoint stops recomputing once the last tensor backward needs (down_proj's
      input) exists. For a model whose LM head is small next to its blocks this is just under
      1/3 (~0.3 for 7B-class models at 2k context).
    * `every:K`: the same for the checkpointed blocks only.
    * `selective`: 0 matmul FLOPs; it recomputes only element-wise ops (norms, RoPE, SiLU, the
      SwiGLU product, casts), a few FLOPs per element. Their cost is memory traffic, which this
      FLOP fraction does not capture; the benchmark measures it.
    * `none`, `offload`: 0 (offload pays in host<->device copies instead).
    """
    kind, _ = parse_mode(mode)
    seq_len = args.max_seq_len if seq_len is None else seq_len
    parts = _forward_flops_per_token(args, seq_len)
    block = sum(v for k, v in parts.items() if k != "lm_head")
    step = 3 * (args.n_layers * block + parts["lm_head"])
    if kind in ("full", "every"):
        n_ckpt = len(checkpointed_blocks(args.n_layers, mode))
        return n_ckpt * (block - parts["down_proj"]) / step
    return 0.0


def describe(mode: str, args: ModelArgs, batch: int, seq_len: int, precision: str | int = "fp32",
             device_type: str = "cpu") -> dict[str, float]:
    """The lever's cost in one dict, for the planner and reports."""
    none = estimate_saved_activation_bytes(args, "none", batch, seq_len, precision, device_type)
    saved = estimate_saved_activation_bytes(args, mode, batch, seq_len, precision, device_type)
    out = {
        "saved_activation_bytes": saved,
        "saved_activation_fraction": saved / none if none else 0.0,
        "recompute_flops_fraction": estimate_recompute_flops_fraction(mode, args, seq_len),
    }
    if parse_mode(mode)[0] == "offload":
        out["host_bytes"] = none
        out["transfer_bytes_per_step"] = 2 * none
    return out


__all__ = [
    "MODES_HELP", "OffloadHooks", "SAVE_OPS", "apply_checkpointing", "block_saved_tensors",
    "checkpointed_blocks", "checkpointing_mode_of", "describe", "estimate_recompute_flops_fraction",
    "estimate_saved_activation_bytes", "make_selective_policy", "parse_mode", "selective_policy",
]
