"""Numerical comparison of a candidate (folded) model against its reference.

Both models run, in eval mode and without gradients, on the caller's inputs and on generated
ones: other batch sizes (1 and 3) and a constant-valued input, which exposes border errors of a
padded conv that was folded forward. Errors are per output, worst over all input sets:

    max_abs_err = max |c - r|,  max_rel_err = max_abs_err / max |r|,  rel_l2 = ||c - r|| / ||r||

and an output passes when max_abs_err <= atol + rtol * max |r|. With `float64_reference`, both
are also measured against the reference run in float64.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bnfold.report import OutputError, VerifyCase, VerifyReport

__all__ = ["flatten_outputs", "generated_cases", "verify"]


def flatten_outputs(out: Any, name: str = "output") -> list[tuple[str, Tensor]]:
    """Named tensors of a (nested) model output: 'output', 'output[0]', "output['logits']"."""
    if isinstance(out, Tensor):
        return [(name, out)]
    if isinstance(out, dict):
        return [kv for k, v in out.items() for kv in flatten_outputs(v, f"{name}[{k!r}]")]
    if isinstance(out, list | tuple):
        return [kv for i, v in enumerate(out) for kv in flatten_outputs(v, f"{name}[{i}]")]
    return []


def _resize_batch(x: Any, batch: int, gen: torch.Generator) -> Any:
    if not isinstance(x, Tensor) or x.dim() == 0:
        return x
    if not x.is_floating_point():
        idx = torch.arange(batch) % x.shape[0]
        return x[idx]
    std, mean = torch.std_mean(x.detach().to(torch.float32)) if x.numel() > 1 else (1.0, 0.0)
    fresh = torch.randn((batch, *x.shape[1:]), generator=gen) * float(std) + float(mean)
    return fresh.to(x.dtype)


def _constant_like(x: Any) -> Any:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return x
    mean = float(x.detach().to(torch.float32).abs().mean()) if x.numel() else 1.0
    return torch.full_like(x, mean or 1.0)


def generated_cases(inputs: tuple, seed: int = 0) -> list[tuple[str, tuple]]:
    """The caller's inputs, the same at batch sizes 1 and 3, and a constant-valued input."""
    gen = torch.Generator().manual_seed(seed)
    cases = [("given", inputs)]
    batch = next((x.shape[0] for x in inputs if isinstance(x, Tensor) and x.dim() > 0), None)
    if batch is not None:
        for b in (1, 3):
            if b != batch:
                cases.append((f"batch={b}", tuple(_resize_batch(x, b, gen) for x in inputs)))
    cases.append(("constant", tuple(_constant_like(x) for x in inputs)))
    return cases


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore each submodule's own flag afterwards."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in saved:
            m.training = flag


def _to64(x: Any) -> Any:
    return x.to(torch.float64) if isinstance(x, Tensor) and x.is_floating_point() else x


def _compare(name: str, cand: Tensor, ref: Tensor, ref64: Tensor | None) -> OutputError:
    r = ref.detach().to(torch.float64)
    c = cand.detach().to(torch.float64)
    if c.shape != r.shape:
        inf = float("inf")
        return OutputError(name, inf, inf, inf, float(r.abs().max()) if r.numel() else 0.0)
    diff = (c - r).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_ref = float(r.abs().max()) if r.numel() else 0.0
    norm_ref = float(r.norm())
    err = OutputError(
        name=name,
        max_abs_err=max_abs,
        max_rel_err=max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else float("inf")),
        rel_l2_err=float(diff.norm()) / norm_ref if norm_ref > 0 else float(diff.norm()),
        max_abs_ref=max_ref,
    )
    if ref64 is not None:
        err.reference_vs_f64 = float((r - ref64).abs().max()) if r.numel() else 0.0
        err.candidate_vs_f64 = float((c - ref64).abs().max()) if c.numel() else 0.0
    return err


def _worst(errors: list[OutputError]) -> OutputError:
    worst = copy.copy(max(errors, key=lambda e: e.max_abs_err))
    worst.max_rel_err = max(e.max_rel_err for e in errors)
    worst.rel_l2_err = max(e.rel_l2_err for e in errors)
    for key in ("reference_vs_f64", "candidate_vs_f64"):
        values = [getattr(e, key) for e in errors if getattr(e, key) is not None]
        setattr(worst, key, max(values) if values else None)
    return worst


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    float64_reference: bool = False,
    generate: bool = True,
) -> VerifyReport:
    """Compare `candidate` with `reference` on the inputs plus generated ones."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    cases_in = generated_cases(inputs) if generate else [("given", inputs)]
    reference64 = copy.deepcopy(reference).to(torch.float64) if float64_reference else None
    cases: list[VerifyCase] = []
    per_output: dict[str, list[OutputError]] = {}
    error = None
    models = [reference, candidate] + ([reference64] if reference64 is not None else [])
    with _eval_mode(*models):
        for case_name, args in cases_in:
            try:
                ref = flatten_outputs(reference(*args))
            except Exception as exc:  # a generated batch size the model does not accept
                if case_name == "given":
                    raise
                cases.append(VerifyCase(case_name, True, [], note=f"reference failed: {exc}"))
                continue
            try:
                cand = flatten_outputs(candidate(*args))
            except Exception as exc:
                error = f"candidate failed on '{case_name}' inputs: {type(exc).__name__}: {exc}"
                cases.append(VerifyCase(case_name, False, [], note=error))
                continue
            if [n for n, _ in cand] != [n for n, _ in ref]:
                error = (
                    f"outputs differ in structure: {[n for n, _ in ref]} vs {[n for n, _ in cand]}"
                )
                cases.append(VerifyCase(case_name, False, [], note=error))
                continue
            ref64 = None
            if reference64 is not None:
                ref64 = [t for _, t in flatten_outputs(reference64(*[_to64(x) for x in args]))]
            errors = [
                _compare(n, c, r, None if ref64 is None else ref64[i].detach())
                for i, ((n, c), (_, r)) in enumerate(zip(cand, ref, strict=True))
            ]
            ok = all(e.max_abs_err <= atol + rtol * e.max_abs_ref for e in errors)
            cases.append(VerifyCase(case_name, ok, errors))
            for e in errors:
                per_output.setdefault(e.name, []).append(e)
    outputs = [_worst(errs) for errs in per_output.values()]
    ok = error is None and all(c.ok for c in cases) and bool(outputs)
    return VerifyReport(ok=ok, rtol=rtol, atol=atol, outputs=outputs, cases=cases, error=error)
