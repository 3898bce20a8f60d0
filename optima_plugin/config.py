"""PruneConfig: every option of a pruning run, validated in one place.

The field names are the CLI's flag names (the hosts' names where they exist).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .sparsity import Pattern, parse_pattern


@dataclass
class PruneConfig:
    prune_method: str = "wanda"
    sparsity_ratio: float = 0.5
    sparsity_type: str = "unstructured"
    weight_update: str = "optima"
    solver: str = "pcg"
    allocation: str = "uniform"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    calibration_dataset: str = "pydoc"
    skip_attention: bool = False
    double_precision: bool = False
    damp: float = 0.01
    tol: Optional[float] = None
    max_iter: Optional[int] = None
    device: str = "auto"
    offload: Optional[bool] = None
    batch_size: int = 1
    eval_ppl: list = field(default_factory=list)
    eval_dense: bool = False
    eval_max_windows: Optional[int] = None
    save_model: Optional[str] = None
    overwrite: bool = False
    report: Optional[str] = None

    @property
    def pattern(self) -> Pattern:
        return parse_pattern(self.sparsity_type)

    def validate(self) -> "PruneConfig":
        """Raise ``ValueError`` with a flag-named message for bad values; return self."""
        if not 0.0 <= self.sparsity_ratio < 1.0:
            raise ValueError(f"--sparsity_ratio must be in [0, 1), got {self.sparsity_ratio}")
        self.pattern  # parses and checks N:M
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.damp < 0:
            raise ValueError(f"--damp must be >= 0, got {self.damp}")
        if isinstance(self.eval_ppl, str):
            self.eval_ppl = [s for s in self.eval_ppl.split(",") if s]
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_options(cls, **options) -> "PruneConfig":
        """Build from keyword options; unknown names raise ``TypeError`` listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options).validate()
