"""Typed run configuration: TOML file + `--set section.key=value` overrides.

Every field is validated up front so that a mistake costs one line at start-up, not a crash an
hour into a rented GPU. Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shoestring.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which network to train. `preset` names an entry of `shoestring.models.presets`."""

    preset: str = "tiny"
    # None: taken from the tokenizer the data was prepared with.
    vocab_size: int | None = Field(default=None, gt=0)
    max_seq_len: int | None = Field(default=None, gt=0)
    # A pretrained model to start from: "hf:DIR" (local HF directory) or "gguf:FILE". When set,
    # its architecture, weights and tokenizer replace `preset` and the data's tokenizer.
    source: str | None = None

    @field_validator("source")
    @classmethod
    def _source_form(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("hf:", "gguf:")):
            raise ValueError(f"{v!r} must be 'hf:DIR' or 'gguf:FILE'")
        return v

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from shoestring.models.presets import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v


class DataSection(Section):
    """Where tokens come from. `corpus` is a bundled corpus name or a path to .txt/.jsonl files."""

    corpus: str = "shakespeare"
    # Prepared shards live here; derived from the corpus name when not given.
    prepared_dir: str | None = None
    vocab_size: int = Field(default=4096, ge=256)
    val_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    seq_len: int = Field(default=256, gt=1)
    # "instruct": `corpus` is a .jsonl of {"prompt","response"} or {"messages"} lines, the loss
    # covers response tokens only (see shoestring.data.instruct). Needs model.source's tokenizer.
    format: Literal["text", "instruct"] = "text"
    skip_malformed: bool = False  # instruct: skip (and count) malformed lines instead of stopping
    # instruct: several examples per row, kept apart by a document mask (no compute on padding);
    # false: one example per row, right-padded to seq_len.
    packing: bool = True


class Budget(NamedTuple):
    """A parsed `train.budget`: wall seconds, or dollars (priced into seconds at the run's start)."""
    amount: float
    unit: Literal["s", "$"]


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(_NUMBER + r"(h|min|m|s)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
SECONDS_PER = {"h": 3600, "min": 60, "m": 60, "s": 1}


def parse_budget(text: str) -> Budget:
    """'90s', '3min', '1h30m' (units h, min or m, s) -> seconds; '$0.05' -> dollars."""
    t = text.strip().lower().replace(" ", "")
    budget = None
    if t.startswith("$") and re.fullmatch(_NUMBER, t[1:]):
        budget = Budget(float(t[1:]), "$")
    elif _DURATION.fullmatch(t):
        budget = Budget(sum(float(n) * SECONDS_PER[u] for n, u in _DURATION_PART.findall(t)), "s")
    if budget is None or budget.amount <= 0:
        raise ValueError(f"{text!r} is not a budget: write a wall time ('90s', '3min', '1h30m') or dollars ('$0.05'), "
                         "more than zero")
    return budget


_BYTES = re.compile(_NUMBER + r"\s*([kmgt]i?b|b)?", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'24GiB', '500MB', '1.5g' -> bytes (binary multiples either way: memory is sized in them)."""
    m = _BYTES.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not an amount of memory: write e.g. '24GiB' or '500MB'")
    unit = (m.group(2) or "b").lower()[0]
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(unit))


class TrainSection(Section):
    # The most optimizer steps; with `budget`, the run takes the steps that fit, up to this many.
    steps: int = Field(default=400, gt=0)
    # Stop on a budget instead of a step count: a wall time ("90s", "3min", "1h30m") or dollars
    # ("$0.05": wall x devices x run.price_per_hour, or the catalogue price of the device). The
    # run times its first warm-up steps, one eval and one checkpoint save, and plans how many
    # steps fit (the LR schedule is planned for that many; see shoestring.train.budget). The
    # budget covers the trainer from its start to its final save: data preparation, model
    # build, compile, steps, evals and saves; not the interpreter's start-up before it.
    # "none": no budget (useful as --set train.budget=none on a config that has one).
    budget: str | None = None
    # Global batch in sequences per optimizer step, over all ranks and accumulation steps.
    batch_size: int = Field(default=16, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    # Sequences per rank per micro-step. "auto": the largest that the planner predicts fits in
    # `memory_budget`, at most batch_size / (grad_accum x ranks); on an out-of-memory error it
    # halves and accumulation doubles (the global batch, hence the optimisation, unchanged), and
    # the run keeps the smaller one from then on, across resumes (shoestring.train.adapt). A
    # number fixes it (accumulation = batch_size / (micro_batch x ranks)); an OOM then stops.
    micro_batch: int | Literal["auto"] = "auto"
    # Bytes a rank may use for the automatic micro-batch ("24GiB", "500MB"); None: the device's
    # free memory (CPU: available host memory, or the RLIMIT_DATA cap, shared by the node's
    # ranks) less a 10% margin.
    memory_budget: str | None = None
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=40, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    eval_every: int = Field(default=100, gt=0)
    eval_batches: int = Field(default=8, gt=0)
    log_every: int = Field(default=10, gt=0)
    seed: int = 1337
    # Regional torch.compile of the blocks: true | false | "auto" (on where it pays: CUDA, and a
    # CPU whose half-precision matmuls are fast, when the run uses them; see shoestring.levers.compile).
    compile: bool | Literal["auto"] = "auto"
    # Keep the host memory a step frees in the process (glibc's malloc would give it back, and the
    # next step fault it in again): faster steps, a resident set that does not shrink between
    # steps. true | false | "auto" (on where it was measured to pay: a run of one process; see
    # shoestring.levers.host_memory). false: the C library's defaults.
    keep_host_memory: bool | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # What a non-finite loss does: stop (keeping the last good checkpoint) or skip the batch.
    nan_policy: Literal["stop", "skip"] = "stop"
    max_nan_skips: int = Field(default=5, ge=0)

    @field_validator("micro_batch")
    @classmethod
    def _micro_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or a number of sequences >= 1")
        return v

    @field_validator("memory_budget")
    @classmethod
    def _memory_parses(cls, v: str | None) -> str | None:
        if v is None or v.strip().lower() in ("none", "auto"):
            return None
        parse_bytes(v)
        return v

    @field_validator("budget")
    @classmethod
    def _budget_parses(cls, v: str | None) -> str | None:
        if v is None or v.strip().lower() == "none":
            return None
        parse_budget(v)
        return v

    @model_validator(mode="after")
    def _budget_measurable(self) -> "TrainSection":
        if self.budget and self.warmup_steps < 2:
            raise ValueError("train.budget needs train.warmup_steps >= 2: the run is timed on warm-up steps, "
                             "whose LR does not depend on the number of steps")
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainSection":
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be divisible by "
                f"train.grad_accum ({self.grad_accum})"
            )
        return self


PrecisionMode = Literal["auto", "fp32", "bf16", "fp16", "bf16-pure"]


class PrecisionSection(Section):
    # "auto": chosen at start-up from what this device measured (shoestring.levers.precision:
    # bf16 on CUDA with bf16 tensor cores, else fp16; on a CPU, bf16 where its matmuls run
    # >= 1.5x fp32's, else fp32), written into the run's config.json and kept on resume.
    mode: PrecisionMode = "auto"
    # fp16 dynamic loss scaling (torch.amp.GradScaler).
    init_scale: float = Field(default=2.0**16, gt=0)
    growth_interval: int = Field(default=2000, gt=0)


CHECKPOINTING_PATTERN = re.compile(r"^(none|full|selective|offload|every:[1-9]\d*)$")


class CheckpointingSection(Section):
    """Activation checkpointing: none | full | every:K | selective | offload."""

    mode: str = "none"

    @field_validator("mode")
    @classmethod
    def _valid_mode(cls, v: str) -> str:
        if not CHECKPOINTING_PATTERN.match(v):
            raise ValueError(f"{v!r} is not one of none, full, every:K (K>=1), selective, offload")
        return v


class LoRASection(Section):
    """LoRA (shoestring.levers.lora): off unless `enabled`; then only the adapters train."""

    enabled: bool = False
    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # dtype the frozen base weights are held in; bf16 halves them (needs autocast: bf16, fp16 or
    # bf16-pure); nf4 (QLoRA) holds the blocks' linears in 4 bits, the rest in the compute dtype.
    base_dtype: Literal["fp32", "bf16", "nf4"] = "fp32"

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        from shoestring.levers.lora import ALL_TARGETS

        bad = [t for t in v if t not in ALL_TARGETS]
        if bad or not v:
            raise ValueError(f"targets {bad or v} invalid; choose from {', '.join(ALL_TARGETS)}")
        return v
class ParallelSection(Section):
    """How the ranks torchrun starts share the work (`shoestring train --nproc N`).

    `train.batch_size` stays the global batch: each rank takes batch_size / (grad_accum x ranks)
    sequences per micro-step, so changing the number of ranks keeps the optimisation the same.
    """

    strategy: Literal["single", "ddp", "fsdp2", "yafsdp", "deepspeed"] = "single"
    # Seconds a collective may wait for a peer before the rank gives up (a dead peer must not
    # hang the others; torchrun also tears the group down when one rank fails).
    timeout_s: float = Field(default=300, gt=0)
    # ddp: gradient bucket size, and gradients as views into the buckets (saves one copy).
    bucket_cap_mb: float = Field(default=25, gt=0)
    gradient_as_bucket_view: bool = True
    # fsdp2: free gathered weights after forward (true), keep them (false), or reshard to groups
    # of this many ranks (int); offload sharded state to host memory (CUDA); blocks prefetched
    # ahead explicitly (0: FSDP2's implicit prefetch only).
    reshard_after_forward: bool | int = True
    cpu_offload: bool = False
    prefetch: int = Field(default=1, ge=0)
    # fsdp2, yafsdp: where the state is sharded. None: over every rank (flat); "node": within each
    # node (LOCAL_WORLD_SIZE ranks); N: within groups of N consecutive ranks (N divides the world).
    # The state is replicated across groups, whose gradient shards are all-reduced once a step
    # (hybrid sharding, HSDP): the heavy gathers stay inside a group. `reshard_after_forward = N`
    # differs: it shards the state over every rank and only re-shards the gathered weights to
    # groups of N after forward, so that backward's gathers stay inside those groups.
    shard_group: Literal["node"] | int | None = None
    # yafsdp: prefetch the next block's gather and overlap gradient reduce-scatters with backward
    # (true), or wait for every collective where it is issued (false: no overlap, same result);
    # dtype gradients are reduce-scattered in (they are accumulated in fp32 either way).
    async_collectives: bool = True
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    # yafsdp on gloo: all-gather and reduce-scatter made of isend/irecv pairs (p2p: a ring's bytes,
    # no temporaries) or torch's collectives (native: gloo's reduce-scatter is an all-reduce).
    gloo_collectives: Literal["p2p", "native"] = "p2p"
    # deepspeed: ZeRO stage, and offload of optimizer state / parameters to host memory (CUDA).
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _options_fit(self) -> "ParallelSection":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("parallel.offload_params needs parallel.zero_stage = 3 (only ZeRO-3 partitions parameters)")
        if not isinstance(self.reshard_after_forward, bool) and self.reshard_after_forward < 2:
            raise ValueError("parallel.reshard_after_forward must be true, false or a group size >= 2")
        if isinstance(self.shard_group, int) and self.shard_group < 1:
            raise ValueError("parallel.shard_group must be \"node\" or a group size >= 1")
        return self


class RunSection(Section):
    dir: str = "runs/default"
    save_every: int = Field(default=200, ge=0)  # 0: only at the end and on a signal
    keep_last: int = Field(default=2, ge=1)
    # Dollars per device-hour for the report; None: the catalogue price of the detected device.
    price_per_hour: float | None = Field(default=None, ge=0)


class Config(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    precision: PrecisionSection = PrecisionSection()
    checkpointing: CheckpointingSection = CheckpointingSection()
    lora: LoRASection = LoRASection()
    parallel: ParallelSection = ParallelSection()
    run: RunSection = RunSection()

    @model_validator(mode="after")
    def _finetune_consistent(self) -> "Config":
        if (self.data.format == "instruct") != bool(self.model.source):
            raise ValueError("data.format = 'instruct' and model.source go together: instruction data needs the "
                             "source's tokenizer, and raw-text training of a source model is not supported yet")
        # A bf16 base needs autocast (or bf16-pure) to meet the activations: fp16's casts it per use;
        # "auto" resolves to a low precision for it (levers/precision.py).
        if self.lora.enabled and self.lora.base_dtype == "bf16" and self.precision.mode == "fp32":
            raise ValueError("lora.base_dtype = 'bf16' needs precision.mode auto, bf16, bf16-pure or fp16, not 'fp32'")
        if self.lora.enabled and self.lora.base_dtype == "nf4" and self.parallel.strategy in ("yafsdp", "deepspeed"):
            raise ValueError(f"lora.base_dtype = 'nf4' does not run with parallel.strategy = '{self.parallel.strategy}': it "
                             "packs or moves every weight as a plain tensor, and an NF4 weight is a tensor subclass "
                             "(codes + scales); use ddp or fsdp2")
        return self

    @model_validator(mode="after")
    def _seq_fits_model(self) -> "Config":
        from shoestring.models.presets import PRESETS

        ctx = self.model.max_seq_len or PRESETS[self.model.preset].max_seq_len
        if self.data.seq_len > ctx and not self.model.source:  # a source's context is checked on load
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) is longer than the model's context ({ctx}); "
                f"lower data.seq_len or raise model.max_seq_len"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value), value parsed as a TOML literal when it is one."""
    if "=" not in text:
        raise UserError(f"override {text!r} has no '='", "write it as section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise UserError(f"override key {key!r} must name a section and a key", "e.g. train.lr=1e-3")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as precision.mode=bf16
    return path, value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {'.'.join(path)!r}: {part!r} is not a section")
    node[path[-1]] = value


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    where = ".".join(str(p) for p in e["loc"]) or "config"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{where}: {msg}"


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"{source}: {_first_error(err)}", "fix the value (see configs/ for documented examples)") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML (or a run's config.json) file, or start from defaults when `path` is None;
    apply overrides; validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {str(p)!r} not found", "give the path of a TOML file, e.g. configs/tiny.toml")
        try:
            text = p.read_text(encoding="utf-8")
            # A run directory's config.json (the resolved config) is accepted too, so the
            # resume command printed at a stop works as is.
            tree = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'TOML'} ({err})") from None
        source = str(p)
    for text in overrides:
        apply_override(tree, *parse_override(text))
    return build_config(tree, source)
