"""choose: which measured candidate `optimize` returns, from its timings and budget alone.

The candidates are timed in one interleaved run against the folded fp32 graph, with an A/A
control: a second session of the fp32 graph in the same rounds. Its ratio to the first says
how far two sessions of one graph differ in this run; a candidate closer to fp32 than that is
not measurably faster or slower. The rule:

1. The run's noise is the largest |A/A - 1| over the batch sizes timed.
2. A candidate is eligible when it meets the accuracy budget and is not slower than fp32 at
   any batch beyond the noise: its time over fp32's is at most 1 + min(noise, MAX_NOISE) at
   every batch. (The cap: a very noisy run must not admit a graph that much slower.)
3. The objective is the geometric mean over batches of fp32's time over the candidate's.
   The eligible candidate with the largest objective is chosen if that objective beats fp32's
   (1.0) by more than the noise, uncapped; otherwise fp32 is: a lossy graph is not worth a gain
   that two sessions of the same graph also show.

So "never slower than the folded fp32 graph" holds in the sense a run can measure: at no
batch is the chosen graph slower by more than the A/A control of the same run, and over the
batches it is faster by more than that control.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["MAX_NOISE", "Choice", "choose", "geometric_speedup", "run_noise"]

MAX_NOISE = 0.05


@dataclass
class Choice:
    chosen: str
    why: str
    noise: float
    objective: dict[str, float] = field(default_factory=dict)  # name -> geometric speedup
    rejected: dict[str, str] = field(default_factory=dict)  # name -> reason

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def run_noise(aa: Mapping[str, float]) -> float:
    """Step 1: the largest |A/A - 1| over the batch sizes timed (`aa`: batch -> ratio)."""
    return max((abs(r - 1.0) for r in aa.values()), default=0.0)


def geometric_speedup(ratios: Mapping[str, float]) -> float:
    """fp32 time over the candidate's, geometric mean over batches (ratios: candidate / fp32)."""
    return 1.0 / math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))


def choose(
    ratios: Mapping[str, Mapping[str, float]],
    budget_met: Mapping[str, bool],
    aa: Mapping[str, float],
    *,
    reference: str = "fp32",
) -> Choice:
    """Apply the module's rule. `ratios`: candidate -> batch -> its time over the reference's
    (the reference included or not); `aa`: batch -> A/A ratio of the same run."""
    noise = run_noise(aa)  # step 1
    slack = min(noise, MAX_NOISE)
    objective: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for name, by_batch in ratios.items():
        if name == reference:
            continue
        if not budget_met.get(name, False):
            rejected[name] = "accuracy budget not met"
            continue
        if not by_batch:
            rejected[name] = "not timed"
            continue
        slower = {b: r for b, r in by_batch.items() if r > 1.0 + slack}  # step 2
        if slower:
            worst = max(slower, key=slower.get)
            rejected[name] = (
                f"slower than fp32 at {worst} ({slower[worst]:.3f}x its time) beyond the "
                f"run's noise ({noise:.3f})"
            )
            continue
        objective[name] = geometric_speedup(by_batch)
    if not objective:
        return Choice(
            reference,
            "no candidate within the budget is not slower than fp32 beyond the timing noise "
            f"(A/A {noise:.3f}) at every batch",
            noise,
            objective,
            rejected,
        )
    best = max(objective, key=objective.get)  # step 3
    if objective[best] <= 1.0 + noise:
        for name, gain in objective.items():
            rejected[name] = f"{gain:.3f}x fp32 (geometric mean) is within the noise ({noise:.3f})"
        return Choice(
            reference,
            f"no candidate's gain over fp32 exceeds the timing noise (best: {best} at "
            f"{objective[best]:.3f}x, A/A {noise:.3f})",
            noise,
            objective,
            rejected,
        )
    return Choice(
        best,
        f"fastest within the budget: {objective[best]:.2f}x the fp32 graph (geometric mean "
        f"over batches; A/A noise {noise:.3f}), not slower beyond the noise at any batch",
        noise,
        objective,
        rejected,
    )
