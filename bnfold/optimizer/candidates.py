"""Candidate, OptimizeReport, OptimizeResult: the values `optimize` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from bnfold.optimizer.choice import geometric_speedup

__all__ = ["Candidate", "OptimizeReport", "OptimizeResult"]


@dataclass
class Candidate:
    """One graph `optimize` measured: how it was made, its accuracy and its latency."""

    name: str
    precision: str  # "fp32" | "int8"
    how: str
    model: onnx.ModelProto = field(repr=False)
    accuracy: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)  # "batch=N" -> {"median_ms", "ratio"} (to fp32)
    budget_met: bool = False
    budget_reasons: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """fp32 time over this one's: the geometric mean over the batch sizes timed."""
        if not self.latency:
            return None
        return geometric_speedup({b: v["ratio"] for b, v in self.latency.items()})

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "precision": self.precision,
            "how": self.how,
            "accuracy": self.accuracy,
            "latency": self.latency,
            "speedup_vs_fp32": self.speedup,
            "budget_met": self.budget_met,
            "budget_reasons": self.budget_reasons,
            "excluded_nodes": self.excluded_nodes,
            "notes": self.notes,
        }


@dataclass
class OptimizeReport:
    target: str
    cpu: dict
    budget: dict
    chosen: str
    why: str
    inputs: dict
    timing: dict
    steps: dict
    candidates: list[dict]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def table(self) -> str:
        """The candidates as a text table (the CLI prints it)."""
        rows = [
            ("candidate", "top-1 agr", "rel L2", "acc drop", "ms b1", "ms b8", "x fp32", "budget")
        ]
        for c in self.candidates:
            acc, lat = c["accuracy"], c["latency"]
            batches = sorted(lat, key=lambda k: int(k.split("=")[1]))
            ms = [f"{lat[b]['median_ms']:.2f}" for b in batches] + ["-", "-"]
            top1 = acc.get("top1_agreement")
            drop = acc.get("accuracy_drop_points")
            speed = c["speedup_vs_fp32"]
            rows.append(
                (
                    ("* " if c["name"] == self.chosen else "  ") + c["name"],
                    "-" if top1 is None else f"{top1:.4f}",
                    f"{acc['rel_l2']:.4f}",
                    "-" if drop is None else f"{drop:.2f}",
                    ms[0],
                    ms[1],
                    "-" if speed is None else f"{speed:.2f}",
                    "met" if c["budget_met"] else "not met",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows
        )


@dataclass
class OptimizeResult:
    model: onnx.ModelProto = field(repr=False)
    candidates: list[Candidate]
    report: OptimizeReport

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.name == self.report.chosen)

    def to_dict(self) -> dict:
        return self.report.to_dict()
