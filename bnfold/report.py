"""Result values returned by the passes: what was folded, what was kept and why, how close.

Every class here serialises with `to_dict()` to plain JSON types; the CLI and the service print
or return exactly these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum

__all__ = [
    "Action",
    "BNEntry",
    "ComposeEntry",
    "FoldReport",
    "MergeEntry",
    "OutputError",
    "VerifyCase",
    "VerifyReport",
]


class Action(StrEnum):
    FOLDED_BACKWARD = "folded_backward"  # merged into the affine layer that produces its input
    FOLDED_FORWARD = "folded_forward"  # merged into the affine layer(s) that consume its output
    PRECOMPUTED = "precomputed"  # its input is a constant (weight standardization): computed once
    MERGED = "merged"  # a branch of a sum (identity BN of RepVGG/MobileOne) merged into one conv
    KEPT = "kept"


@dataclass
class BNEntry:
    """One BatchNorm occurrence (a call site: a module applied twice gives two entries)."""

    name: str  # graph node / ONNX node name
    kind: str  # BatchNorm2d, FrozenBatchNorm2d, F.batch_norm, BatchNormalization, ...
    action: Action
    targets: list[str] = field(default_factory=list)  # the layer(s) it was merged into
    reason: str = ""  # why it was kept, or a note on how it was folded

    def to_dict(self) -> dict:
        d = asdict(self)
        d["action"] = str(self.action)
        return d


@dataclass
class MergeEntry:
    """One sum of parallel branches (RepVGG, MobileOne, ACNet blocks): merged or not, and why."""

    name: str  # the node of the sum
    branches: list[str] = field(default_factory=list)
    into: str | None = None  # the merged conv, when merged
    macs_before: int | None = None  # multiply-adds per output position
    macs_after: int | None = None
    reason: str = ""  # why it was not merged

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ComposeEntry:
    """Two sequential affine layers (nothing nonlinear between): composed into one, or why not."""

    name: str
    layers: list[str] = field(default_factory=list)
    into: str | None = None
    macs_before: int | None = None  # multiply-adds per output position (per sample: Linear)
    macs_after: int | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldReport:
    entries: list[BNEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # model-level facts: train mode, capture
    merges: list[MergeEntry] = field(default_factory=list)
    compositions: list[ComposeEntry] = field(default_factory=list)

    def add(self, entry: BNEntry) -> BNEntry:
        self.entries.append(entry)
        return entry

    @property
    def folded(self) -> list[BNEntry]:
        return [e for e in self.entries if e.action is not Action.KEPT]

    @property
    def kept(self) -> list[BNEntry]:
        return [e for e in self.entries if e.action is Action.KEPT]

    def counts(self) -> dict[str, int]:
        counts = {str(a): 0 for a in Action}
        for e in self.entries:
            counts[str(e.action)] += 1
        counts["total"] = len(self.entries)
        return counts

    def to_dict(self) -> dict:
        return {
            "counts": self.counts(),
            "entries": [e.to_dict() for e in self.entries],
            "merges": [m.to_dict() for m in self.merges],
            "compositions": [c.to_dict() for c in self.compositions],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        """A few readable lines: counts, then each kept BN with its reason."""
        c = self.counts()
        lines = [
            f"BatchNorm: {c['total']} found, {c['folded_backward']} folded backward, "
            f"{c['folded_forward']} folded forward, {c['precomputed']} precomputed, "
            f"{c['merged']} merged, {c['kept']} kept"
        ]
        merged = [m for m in self.merges if m.into]
        if self.merges:
            lines.append(
                f"Branch sums: {len(merged)} merged into one conv, "
                f"{len(self.merges) - len(merged)} left"
            )
        lines += [f"  left sum {m.name}: {m.reason}" for m in self.merges if not m.into]
        composed = [c for c in self.compositions if c.into]
        if composed:
            lines.append(f"Sequential affine layers: {len(composed)} pairs composed into one")
        lines += [f"  kept {e.name} ({e.kind}): {e.reason}" for e in self.kept]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class OutputError:
    name: str
    max_abs_err: float
    max_rel_err: float  # max_abs_err / max|reference|: scale-aware, finite near zeros
    rel_l2_err: float  # ||candidate - reference|| / ||reference||
    max_abs_ref: float
    # against a float64 run of the reference, when asked for
    reference_vs_f64: float | None = None
    candidate_vs_f64: float | None = None


@dataclass
class VerifyCase:
    """One input set: the caller's, or a generated one (other batch size, constant-valued)."""

    name: str
    ok: bool
    outputs: list[OutputError]
    note: str = ""  # why the case was skipped or failed to run


@dataclass
class VerifyReport:
    ok: bool
    rtol: float
    atol: float
    outputs: list[OutputError]  # per output, the worst over all cases
    cases: list[VerifyCase] = field(default_factory=list)
    error: str | None = None  # set when a case could not run at all

    @property
    def max_abs_err(self) -> float:
        return max((o.max_abs_err for o in self.outputs), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((o.max_rel_err for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_abs_err"] = self.max_abs_err
        d["max_rel_err"] = self.max_rel_err
        return d

    def summary(self) -> str:
        head = "verification OK" if self.ok else "verification FAILED"
        lines = [f"{head} (rtol={self.rtol:g}, atol={self.atol:g}, {len(self.cases)} input sets)"]
        if self.error:
            lines.append(f"  error: {self.error}")
        for o in self.outputs:
            lines.append(
                f"  {o.name}: max_abs_err={o.max_abs_err:.3g} max_rel_err={o.max_rel_err:.3g} "
                f"rel_l2={o.rel_l2_err:.3g}"
            )
        return "\n".join(lines)
