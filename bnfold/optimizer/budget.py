"""Budget: how much accuracy a faster candidate may give up, and the check against it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["DEFAULT_REL_L2", "Budget"]

# a graph whose output is not class scores has no top-1; it is then held to this error
DEFAULT_REL_L2 = 0.05


@dataclass(frozen=True)
class Budget:
    """Limits against the eval-mode original.

    `min_top1_agreement`: fraction of inputs whose arg-max class is unchanged (0.99).
    `max_rel_l2`: ||y - y_ref|| / ||y_ref|| over all outputs. `max_accuracy_drop`: points of
    accuracy against `labels` (0.5 means half a percentage point); needs labels.
    """

    min_top1_agreement: float | None = 0.99
    max_rel_l2: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if self.min_top1_agreement is not None and not 0 <= self.min_top1_agreement <= 1:
            raise ValueError("min_top1_agreement is a fraction in [0, 1]")
        for name in ("max_rel_l2", "max_accuracy_drop"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")

    def check(self, accuracy: dict) -> tuple[bool, list[str]]:
        """(met, reasons it is not) for a candidate's accuracy dict (see `accuracy.compare`)."""
        reasons = []
        top1 = accuracy.get("top1_agreement")
        rel_l2 = accuracy["rel_l2"]
        if not math.isfinite(accuracy.get("max_abs_err", rel_l2)):
            # an inf or NaN output (an fp16 overflow) can still agree on top-1 by chance
            reasons.append("an output is not finite (inf or NaN), e.g. an fp16 overflow")
        if self.min_top1_agreement is not None and top1 is not None:
            if top1 < self.min_top1_agreement:
                reasons.append(f"top-1 agreement {top1:.4f} < {self.min_top1_agreement}")
        limit = self.max_rel_l2
        if limit is None and (top1 is None or self.min_top1_agreement is None):
            limit = DEFAULT_REL_L2  # never leave a candidate unchecked
        if limit is not None and not rel_l2 <= limit:
            reasons.append(f"relative L2 error {rel_l2:.4f} > {limit}")
        if self.max_accuracy_drop is not None:
            drop = accuracy.get("accuracy_drop_points")
            if drop is None:
                reasons.append("max_accuracy_drop needs labels")
            elif drop > self.max_accuracy_drop:
                reasons.append(f"accuracy drop {drop:.2f} points > {self.max_accuracy_drop}")
        return not reasons, reasons

    def to_dict(self) -> dict:
        return asdict(self)
