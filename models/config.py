"""DiT-MoE configurations and the named presets of the public checkpoints (DESIGN section 3)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Literal

Objective = Literal["ddpm_eps", "rectified_flow"]


@dataclass(frozen=True)
class DiTMoEConfig:
    """Architecture of a DiT-MoE.

    Routed experts are bias-free SwiGLU with hidden ``mlp_ratio * hidden_size``; the shared expert has
    hidden ``shared_expert_ratio * hidden_size`` (0 disables it). ``qk_norm`` selects the XL/G
    attention variant (``attn.Wqkv``, per-head LayerNorm on q and k, ``attn.out_proj``).
    ``objective`` records how the model was trained, which picks its default sampler.
    """

    name: str = "custom"
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_experts: int = 8
    top_k: int = 2
    shared_expert_ratio: float = 2.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    qk_norm: bool = False
    qk_norm_eps: float = 1e-5
    objective: Objective = "ddpm_eps"

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k {self.top_k} must be in 1..num_experts ({self.num_experts})")
        if self.objective not in ("ddpm_eps", "rectified_flow"):
            problems.append(f"objective {self.objective!r} must be 'ddpm_eps' or 'rectified_flow'")
        if min(self.depth, self.hidden_size, self.num_classes, self.in_channels) < 1:
            problems.append("depth, hidden_size, num_classes and in_channels must be positive")
        if problems:
            raise ValueError("invalid DiTMoEConfig: " + "; ".join(problems))

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def expert_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def shared_hidden(self) -> int:
        return int(self.hidden_size * self.shared_expert_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DiTMoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DiTMoEConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the architecture (the name is excluded)."""
        body = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _imagenet(name: str, depth: int, hidden: int, heads: int, experts: int, **kw) -> DiTMoEConfig:
    return DiTMoEConfig(name=name, input_size=32, patch_size=2, in_channels=4, hidden_size=hidden,
                        depth=depth, num_heads=heads, num_experts=experts, top_k=2, num_classes=1000, **kw)


PRESETS: dict[str, DiTMoEConfig] = {
    "S/2-8E2A": _imagenet("S/2-8E2A", 12, 384, 6, 8),
    "S/2-16E2A": _imagenet("S/2-16E2A", 12, 384, 6, 16),
    "B/2-8E2A": _imagenet("B/2-8E2A", 12, 768, 12, 8),
    "XL/2-8E2A": _imagenet("XL/2-8E2A", 28, 1152, 16, 8, qk_norm=True, objective="rectified_flow"),
    "G/2-16E2A": _imagenet("G/2-16E2A", 40, 1408, 16, 16, qk_norm=True, objective="rectified_flow"),
    # The project's demo model: 8x8 scikit-learn digits, one channel, patch 1 -> 64 tokens.
    "demo": DiTMoEConfig(name="demo", input_size=8, patch_size=1, in_channels=1, hidden_size=96, depth=6,
                         num_heads=4, mlp_ratio=4.0, num_experts=8, top_k=2, shared_expert_ratio=2.0,
                         num_classes=10, class_dropout_prob=0.1, learn_sigma=False,
                         objective="rectified_flow"),
}


def get_preset(name: str) -> DiTMoEConfig:
    """Return the named preset; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
