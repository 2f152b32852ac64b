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
        """(met, reasons it is not) for a candidate's accuracy dict (see `accuracy.compare`).

        Top-1 agreement alone decides only where a constant answer would not meet it: where
        the reference gives one class on a share of the inputs >= `min_top1_agreement`
        (`reference_top1_majority`), the candidate is held to relative L2 as well
        (`max_rel_l2`, else `DEFAULT_REL_L2`), as it is where there is no top-1.
        """
        reasons = []
        top1 = accuracy.get("top1_agreement")
        rel_l2 = accuracy["rel_l2"]
        if not math.isfinite(accuracy.get("max_abs_err", rel_l2)):
            # an inf or NaN output (an fp16 overflow) can still agree on top-1 by chance
            reasons.append("an output is not finite (inf or NaN), e.g. an fp16 overflow")
        if self.min_top1_agreement is not None and top1 is not None:
            if top1 < self.min_top1_agreement:
                reasons.append(f"top-1 agreement {top1:.4f} < {self.min_top1_agreement}")
        limit, why = self.rel_l2_limit(accuracy), ""
        majority = accuracy.get("reference_top1_majority")
        limited_top1 = top1 is not None and self.min_top1_agreement is not None
        if self.max_rel_l2 is None and limited_top1 and majority is not None and limit is not None:
            # the default limit stands in for a top-1 limit that a constant answer meets
            why = (
                f" (top-1 says little here: the original gives one class on {majority:.0%}"
                " of these inputs)"
            )
        if limit is not None and not rel_l2 <= limit:
            reasons.append(f"relative L2 error {rel_l2:.4f} > {limit}{why}")
        if self.max_accuracy_drop is not None:
            drop = accuracy.get("accuracy_drop_points")
            if drop is None:
                reasons.append("max_accuracy_drop needs labels")
            elif drop > self.max_accuracy_drop:
                reasons.append(f"accuracy drop {drop:.2f} points > {self.max_accuracy_drop}")
        return not reasons, reasons

    def rel_l2_limit(self, accuracy: dict) -> float | None:
        """The relative L2 a candidate is held to: `max_rel_l2`, else `DEFAULT_REL_L2` where
        top-1 agreement does not decide (never leave a candidate unchecked), else none."""
        if self.max_rel_l2 is not None:
            return self.max_rel_l2
        return None if self.top1_decides(accuracy) else DEFAULT_REL_L2

    def top1_decides(self, accuracy: dict) -> bool:
        """Whether top-1 agreement is a test here: there is a top-1, a limit on it, and a
        constant answer (the reference's most common class) would not meet that limit."""
        if accuracy.get("top1_agreement") is None or self.min_top1_agreement is None:
            return False
        return accuracy.get("reference_top1_majority", 0.0) < self.min_top1_agreement

    def to_dict(self) -> dict:
        return asdict(self)
