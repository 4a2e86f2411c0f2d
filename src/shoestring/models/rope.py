"""Rotary position embeddings: the frequencies of plain RoPE and of the scaled variants the
supported families ship with, and their application in the rotate-half layout.

Scalings (the `rope_type` of a Hugging Face config), each a fixed change of the frequencies:
* `linear`  (position interpolation): every frequency divided by `factor`.
* `llama3`  (Llama 3.1 / 3.2): low frequencies (wavelength above `original / low_freq_factor`)
            divided by `factor`, high ones (below `original / high_freq_factor`) kept, the band
            between interpolated smoothly.
* `yarn`    (Qwen2.5 long-context configs): frequencies blended between interpolated and kept
            by a linear ramp over the dimensions whose rotations within the original context
            fall between `beta_slow` and `beta_fast`; cos and sin are scaled by an attention
            factor (`0.1 ln(factor) + 1` unless given).
`dynamic` NTK scaling changes the frequencies with the length of each sequence, so a model that
trains on short rows would learn one RoPE and run another: it is refused (models/hf.py), as is
`longrope` (Phi-3 128k), whose frequencies also switch with the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALINGS = ("linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # one of SCALINGS
    factor: float
    original_max_seq_len: int = 0  # llama3, yarn: the context the model was pretrained at
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: None -> 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions

    def __post_init__(self) -> None:
        if self.kind not in SCALINGS:
            raise ValueError(f"rope scaling {self.kind!r}: one of {', '.join(SCALINGS)}")
        if self.kind in ("llama3", "yarn") and self.original_max_seq_len <= 0:
            raise ValueError(f"rope scaling {self.kind!r} needs original_max_seq_len")


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, device=None) -> torch.Tensor:
    """The head_dim / 2 rotation frequencies (fp32)."""
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    if scaling is None:
        return base
    if scaling.kind == "linear":
        return base / scaling.factor
    if scaling.kind == "llama3":
        return _llama3(base, scaling)
    return _yarn(base, head_dim, theta, scaling)


def attention_factor(scaling: RopeScaling | None) -> float:
    """The factor cos and sin are multiplied by (yarn's; 1 otherwise)."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0


def _llama3(base: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > low_wavelen, base / s.factor, base)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(base: torch.Tensor, head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times in the original context
        return head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(s.beta_fast), dimension(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=base.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return base / s.factor * (1 - keep) + base * keep


def rope_tables(freqs: torch.Tensor, positions: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (*positions.shape, head_dim) in the rotate-half layout, times `scale`.
    `positions` is arange(seq) for plain rows, (batch, seq) where positions restart at each
    document of a packed row. Made per forward (shared by all layers), not kept for the whole
    context: a 128k-token model would hold hundreds of MiB of tables otherwise."""
    angles = positions.to(torch.float32)[..., None] * freqs
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return (cos * scale, sin * scale) if scale != 1.0 else (cos, sin)


def document_positions(doc: torch.Tensor) -> torch.Tensor:
    """(batch, seq) document ids, each document one contiguous run -> each token's position
    within its document (0 at every document's first token)."""
    index = torch.arange(doc.shape[-1], device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return index - torch.cummax(torch.where(starts, index, 0), dim=-1).values


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (seq, head_dim) or, per row, (batch, 1, seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
