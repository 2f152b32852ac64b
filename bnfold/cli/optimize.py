"""``bnfold optimize``: the fastest verified graph (fp32, INT8, fp16 for CUDA) within an
accuracy budget, with calibration inputs and labels read from .npz / .npy files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bnfold.array_files import LABELS
from bnfold.cli.console import (
    ARCHITECTURE_PREFIXES,
    EXIT_OK,
    BadInput,
    Progress,
    check_writable,
    parse_shapes,
)
from bnfold.cli.loading import architecture_model, load_onnx

__all__ = ["add_optimize"]

CALIBRATION_BATCH = 8


def _read_file(flag: str, path: Path) -> dict:
    """The arrays of `path` (``bnfold.array_files``: .npy, .npz, .safetensors, by suffix where
    it names one, else by the file's first bytes)."""
    from bnfold.array_files import FORMATS, ArrayFileError, read_arrays

    if not path.is_file():
        raise BadInput(f"{flag} {path}: no such file")
    suffix = path.suffix.lower().lstrip(".")
    try:
        return read_arrays(path.read_bytes(), suffix if suffix in FORMATS else None)
    except ArrayFileError as exc:
        raise BadInput(f"{flag} {path}: {exc}") from None


def _read_calibration(path: Path, names: list[str]) -> tuple[list[tuple], object]:
    """DATA (.npz, .safetensors: one array per graph input name, or one array for a one-input
    model, and optionally a ``labels`` array of class indices; .npy: the one input), split in
    batches; (batches, labels or None)."""
    arrays = _read_file("--calibration", path)
    labels = arrays.pop(LABELS) if LABELS in arrays and LABELS not in names else None
    if len(arrays) == len(names) and (len(names) == 1 or not set(names) & set(arrays)):
        ordered = list(arrays.values())  # one array per input, in the file's order
    elif set(names) <= set(arrays):
        ordered = [arrays[n] for n in names]
    else:
        raise BadInput(
            f"--calibration {path}: holds {sorted(arrays)}; the model's inputs are {names} "
            "(one array for a one-input model, else one per input name)"
        )
    bad = [a.dtype for a in ordered if a.dtype.kind not in "biuf"]
    if bad:
        raise BadInput(f"--calibration {path}: holds a {bad[0]} array; inputs are numbers")
    count = len(ordered[0]) if ordered[0].ndim else 0
    if count == 0 or any(a.ndim == 0 or len(a) != count for a in ordered):
        raise BadInput(f"--calibration {path}: arrays must share a non-zero first dimension")
    batches = [
        tuple(_float32(a[i : i + CALIBRATION_BATCH]) for a in ordered)
        for i in range(0, count, CALIBRATION_BATCH)
    ]
    return batches, labels


def _float32(array):
    """float64 arrays (numpy's default) as float32; other dtypes as they are, checked against
    the graph's inputs by optimize."""
    import numpy as np

    return array.astype(np.float32) if array.dtype == np.float64 else array


def _read_labels(path: Path):
    """LABELS (.npy, or a file holding one array, or one named ``labels``)."""
    arrays = _read_file("--labels", path)
    if len(arrays) != 1 and LABELS not in arrays:
        raise BadInput(f"--labels {path}: holds {sorted(arrays)}; expected one array of labels")
    return arrays.get(LABELS, next(iter(arrays.values())))


def _stage_bars():
    """A tqdm bar per optimize stage, on stderr."""
    from tqdm import tqdm

    bars: dict[str, object] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=True)
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def _cmd_optimize(args) -> int:
    import onnx

    import bnfold
    from bnfold.optimizer.progress import reporting

    if not args.output:
        raise BadInput("optimize needs -o OUT.onnx")
    check_writable("-o", args.output)
    check_writable("--report", args.report)
    args.input_shapes = parse_shapes(args.input_shape)
    args.weights = args.arch_args = None
    progress = Progress()
    try:
        budget = bnfold.Budget(
            min_top1_agreement=args.min_top1_agreement,
            max_rel_l2=args.max_rel_l2,
            max_accuracy_drop=args.max_accuracy_drop,
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    example = None
    if args.input.startswith(ARCHITECTURE_PREFIXES):
        _architecture, model, example = architecture_model(args, progress)
        # not exported yet: the inputs have no names, an .npz gives them in order
        names = [f"input {i}" for i in range(len(example))]
    else:
        model = load_onnx(Path(args.input))
        initializers = {t.name for t in model.graph.initializer}
        names = [v.name for v in model.graph.input if v.name not in initializers]
        if args.input_shapes:
            import numpy as np

            missing = [n for n in names if n not in args.input_shapes]
            if missing:
                raise BadInput(f"--input-shape missing for input(s) {missing}")
            rng = np.random.default_rng(0)
            example = tuple(
                rng.standard_normal(args.input_shapes[n]).astype(np.float32) for n in names
            )
    calibration, labels = (
        _read_calibration(Path(args.calibration), names) if args.calibration else (None, None)
    )
    if args.labels:
        if labels is not None:
            raise BadInput(
                f"--labels given, and --calibration {args.calibration} holds {LABELS!r} too: "
                "give them once"
            )
        labels = _read_labels(Path(args.labels))
        if calibration is None:
            raise BadInput("--labels are the classes of the --calibration inputs: give both")
    if labels is not None:
        from bnfold.optimizer.accuracy import class_indices

        where = f"--labels {args.labels}" if args.labels else f"{LABELS!r} in --calibration"
        try:
            labels = class_indices(labels, None, what=f"{where}:")
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        samples = sum(len(batch[0]) for batch in calibration)
        if len(labels) != samples:
            raise BadInput(f"{where}: {len(labels)} labels for {samples} calibration samples")
    if args.max_accuracy_drop is not None and labels is None:
        raise BadInput("--max-accuracy-drop needs --labels (and --calibration)")
    progress.stage(f"optimizing for {args.target}")
    update, close = _stage_bars()
    try:
        with reporting(update):
            result = bnfold.optimize(
                model,
                example,
                target=args.target,
                budget=budget,
                calibration=calibration,
                labels=labels,
            )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    finally:
        close()
    print(result.report.table())
    for note in result.report.notes:
        print(f"note: {note}")
    print(f"chosen: {result.report.chosen} ({result.report.why})")
    onnx.save(result.model, args.output)
    progress.stage(f"wrote {args.output}")
    if args.report:
        out = {"input": args.input, "optimize": result.report.to_dict()}
        Path(args.report).write_text(json.dumps(out, indent=2) + "\n")
        progress.stage(f"report written to {args.report}")
    return EXIT_OK


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in [0, 1]")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def add_optimize(sub) -> None:
    opt = sub.add_parser(
        "optimize",
        help="the fastest verified graph on this machine (fp32 or INT8), within a budget",
        description="Fold BatchNorm, build fp32 and INT8 candidates (data-free from the BN "
        "statistics, calibrated, mixed per operator), measure their accuracy against the "
        "original and their latency here, and write the fastest one within the budget.",
    )
    opt.add_argument(
        "input", metavar="IN", help="an .onnx file, or zoo:NAME, torchvision:NAME, timm:NAME"
    )
    opt.add_argument("-o", "--output", metavar="OUT.onnx", help="write the chosen graph")
    opt.add_argument(
        "--calibration",
        metavar="DATA.npz",
        help="calibration inputs (.npz, .safetensors, .npy): one array, or one per input name "
        "(first axis: samples), and optionally 'labels', their class indices",
    )
    opt.add_argument(
        "--labels",
        metavar="LABELS.npy",
        help="class indices of the calibration samples (or a 'labels' array in DATA)",
    )
    opt.add_argument(
        "--min-top1-agreement",
        type=_fraction,
        default=0.99,
        metavar="F",
        help="fraction of inputs whose top-1 class must not change (0.99)",
    )
    opt.add_argument(
        "--max-rel-l2",
        type=_non_negative,
        default=None,
        metavar="E",
        help="largest relative L2 error of the outputs",
    )
    opt.add_argument(
        "--max-accuracy-drop",
        type=_non_negative,
        default=None,
        metavar="POINTS",
        help="largest accuracy drop against --labels, in points",
    )
    opt.add_argument(
        "--target",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: also an fp16 candidate, checked here but not timed without a device",
    )
    opt.add_argument("--report", metavar="R.json", help="write the report as JSON")
    opt.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D1,D2,...",
        help="shape of a graph input with symbolic dims (no --calibration)",
    )
    opt.set_defaults(func=_cmd_optimize)
