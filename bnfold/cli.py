"""The ``bnfold`` command line.

    bnfold fold IN [-o OUT.onnx] [--report REPORT.json] [--verify] [--input-shape NAME=1,3,H,W]
    bnfold fold ARCH [--weights W.safetensors] [--arch-args JSON] [-o OUT.onnx] [--verify]
    bnfold optimize IN.onnx|zoo:NAME -o OUT.onnx [--calibration DATA.npz] [--labels L.npy]
        [--min-top1-agreement 0.99] [--max-accuracy-drop 0.5] [--target cpu] [--report R.json]
    bnfold serve [--host 127.0.0.1] [--port 8000] [--store DIR] [--require-gpu]   (service/)

IN is an ONNX file; ARCH is ``zoo:NAME``, ``torchvision:NAME`` or ``timm:NAME``, folded in
torch with the weights given (the zoo's shipped ones, or the library's random initialization,
when none are). The summary goes to stdout, progress to stderr. Exit codes: 0 done (and
verified, when asked), 1 verification failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """A user mistake: reported in one line, exit code 2."""


class _Progress:
    """Stage lines on stderr with the time since start; a bar for many verification cases."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def stage(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def cases(self, what: str):
        bar = None

        def update(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, desc=what, unit="input set", file=sys.stderr, leave=False)
            bar.update(done - bar.n)
            if done == total:
                bar.close()

        return update


def _parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise BadInput(f"bad --input-shape {item!r}; expected NAME=D1,D2,... (positive ints)")
        shapes[name] = shape
    return shapes


_NOT_LOADED = (
    "bnfold does not load PyTorch checkpoints (pickles run code when loaded): export the model "
    "to ONNX (torch.onnx.export) and fold that, or save its state dict with safetensors and run "
    "`bnfold fold torchvision:NAME|timm:NAME|zoo:NAME --weights W.safetensors`"
)


def _refuse_non_onnx(path: Path) -> None:
    """Name what the file is when it is clearly not ONNX, rather than a protobuf parse error."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix in (".pt", ".pth"):
        raise BadInput(f"{path}: looks like a PyTorch checkpoint; {_NOT_LOADED}")
    if path.suffix == ".safetensors" or (len(head) == 8 and head[:1] != b"\x08" and _is_st(path)):
        raise BadInput(
            f"{path}: safetensors weights need their architecture: "
            f"`bnfold fold torchvision:NAME|timm:NAME|zoo:NAME --weights {path}`"
        )


def _is_st(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except Exception:  # noqa: BLE001 - any failure means: not safetensors
        return False


def _load_onnx(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a file")
    _refuse_non_onnx(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise BadInput(f"{path}: not an ONNX model ({exc})") from None
    if not model.graph.output:
        raise BadInput(f"{path}: not an ONNX model (no graph outputs)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise BadInput(f"{path}: invalid ONNX model: {first}") from None
    return model


def _fold_onnx_file(args, progress: _Progress, out: dict) -> int:
    import onnx

    from bnfold.onnx.external_data import ExternalDataError
    from bnfold.onnx.fold import fold_onnx
    from bnfold.onnx.verify import verify_onnx

    progress.stage(f"loading {args.input}")
    model = _load_onnx(Path(args.input))
    progress.stage(f"folding BatchNormalization ({len(model.graph.node)} nodes)")
    try:
        result = fold_onnx(model, base_dir=args.base_dir)
    except ExternalDataError as exc:
        raise BadInput(str(exc)) from None
    print(result.report.summary())
    print(f"nodes: {result.nodes_before} before, {result.nodes_after} after")
    out["fold"] = result.to_dict()
    if args.output:
        progress.stage(f"writing {args.output}")
        onnx.save(result.model, args.output)
    if not args.verify:
        return EXIT_OK
    original = model if args.base_dir is None else _with_data(model, args.base_dir)
    progress.stage("verifying in onnxruntime")
    try:
        check = verify_onnx(
            original,
            result.model,
            input_shapes=args.input_shapes,
            progress=progress.cases("verify"),
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    print(check.summary())
    out["verify_onnx"] = check.to_dict()
    return EXIT_OK if check.ok else EXIT_VERIFY_FAILED


def _with_data(model, base_dir):
    from bnfold.onnx.external_data import load_external_data

    return load_external_data(model, base_dir)


def _architecture_model(args, progress: _Progress):
    """The module and example inputs for ARCH, with --weights and --arch-args applied."""
    from bnfold.architectures import ArchitectureError, load_weights, parse_architecture

    try:
        architecture = parse_architecture(args.input, args.arch_args)
        progress.stage(f"building {architecture.spec}")
        model = architecture.build()
        if args.weights:
            progress.stage(f"loading weights from {args.weights}")
            model = load_weights(model, _read_weights(Path(args.weights)), architecture.spec)
        elif architecture.source != "zoo":
            progress.stage("no --weights: folding the architecture's random initialization")
    except ArchitectureError as exc:
        raise BadInput(str(exc)) from None
    except ImportError as exc:
        raise BadInput(f"{args.input}: its library is not installed ({exc.name})") from None
    shapes = list(args.input_shapes.values()) or None
    if shapes is not None and len(shapes) != len(architecture.input_shapes()):
        raise BadInput(
            f"{architecture.spec} takes {len(architecture.input_shapes())} input(s), "
            f"--input-shape gives {len(shapes)}"
        )
    batch = shapes[0][0] if shapes else 2
    inputs = architecture.example_inputs(batch=batch, shapes=shapes)
    return architecture, model, inputs


def _read_weights(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BadInput(f"--weights {path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"PK" or head[:1] == b"\x80":
            raise BadInput(f"--weights {path}: a PyTorch checkpoint; {_NOT_LOADED}") from None
        raise BadInput(f"--weights {path}: not a safetensors file ({exc})") from None


def _fold_architecture(args, progress: _Progress, out: dict) -> int:
    import bnfold

    architecture, model, inputs = _architecture_model(args, progress)
    progress.stage("folding BatchNorm (torch)")
    result = bnfold.fold(model, inputs)
    print(result.report.summary())
    out["fold"] = {"report": result.report.to_dict()}
    progress.stage("verifying (torch)")
    check = bnfold.verify(model, result.module, inputs)
    print(check.summary())
    out["verify"] = check.to_dict()
    status = EXIT_OK if check.ok else EXIT_VERIFY_FAILED
    if not args.output:
        return status
    from bnfold.onnx.export import export_onnx
    from bnfold.onnx.fold import count_nodes
    from bnfold.onnx.verify import verify_onnx

    progress.stage(f"exporting the folded model to {args.output}")
    folded = export_onnx(result.module, inputs, path=args.output)
    bn_left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    print(f"ONNX: {count_nodes(folded)} nodes, {bn_left} BatchNormalization")
    out["onnx"] = {"nodes": count_nodes(folded), "batch_norm_nodes": bn_left}
    if args.verify:
        progress.stage("exporting the original for comparison")
        original = export_onnx(model, inputs)
        out["onnx"]["nodes_original"] = count_nodes(original)
        # the inputs' own shapes; the exported graph leaves spatial dims symbolic
        shapes = {v.name: list(x.shape) for v, x in zip(original.graph.input, inputs, strict=False)}
        progress.stage("verifying the exported graphs in onnxruntime")
        try:
            onnx_check = verify_onnx(
                original, folded, input_shapes=shapes, progress=progress.cases("verify")
            )
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        print("ONNX " + onnx_check.summary())
        out["verify_onnx"] = onnx_check.to_dict()
        if not onnx_check.ok:
            status = EXIT_VERIFY_FAILED
    return status


_ARCHITECTURE_PREFIXES = ("zoo:", "torchvision:", "timm:")


def _cmd_fold(args) -> int:
    args.input_shapes = _parse_shapes(args.input_shape)
    _check_writable("-o", args.output)
    _check_writable("--report", args.report)
    progress = _Progress()
    out: dict = {"input": args.input}
    if args.input.startswith(_ARCHITECTURE_PREFIXES):
        status = _fold_architecture(args, progress, out)
    else:
        for flag in ("weights", "arch_args"):
            if getattr(args, flag):
                raise BadInput(
                    f"--{flag.replace('_', '-')} goes with an architecture "
                    "(zoo:NAME, torchvision:NAME, timm:NAME), not with an ONNX file"
                )
        status = _fold_onnx_file(args, progress, out)
    if args.report:
        Path(args.report).write_text(json.dumps(out, indent=2) + "\n")
        progress.stage(f"report written to {args.report}")
    return status


CALIBRATION_BATCH = 8


def _read_calibration(path: Path, names: list[str]) -> list[tuple]:
    """DATA.npz: one array (one-input models) or one per graph input name, split in batches."""
    import numpy as np

    if not path.is_file():
        raise BadInput(f"--calibration {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise BadInput(f"--calibration {path}: not an .npz file ({exc})") from None
    if len(arrays) == len(names) and (len(names) == 1 or not set(names) & set(arrays)):
        ordered = list(arrays.values())  # one array per input, in the file's order
    elif set(names) <= set(arrays):
        ordered = [arrays[n] for n in names]
    else:
        raise BadInput(
            f"--calibration {path}: holds {sorted(arrays)}; the model's inputs are {names} "
            "(one array for a one-input model, else one per input name)"
        )
    count = len(ordered[0])
    if count == 0 or any(len(a) != count for a in ordered):
        raise BadInput(f"--calibration {path}: arrays must share a non-zero first dimension")
    return [
        tuple(_float32(a[i : i + CALIBRATION_BATCH]) for a in ordered)
        for i in range(0, count, CALIBRATION_BATCH)
    ]


def _float32(array):
    """float64 arrays (numpy's default) as float32; other dtypes as they are, checked against
    the graph's inputs by optimize."""
    import numpy as np

    return array.astype(np.float32) if array.dtype == np.float64 else array


def _check_writable(flag: str, path: str | None) -> None:
    """Refuse an output path that cannot be written before the work, not after it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise BadInput(f"{flag} {path}: is a directory; give a file name")
    parent = target.parent
    if not parent.is_dir():
        raise BadInput(f"{flag} {path}: directory {parent} does not exist")
    import os

    if not os.access(parent, os.W_OK):
        raise BadInput(f"{flag} {path}: directory {parent} is not writable")


def _read_labels(path: Path):
    import numpy as np

    if not path.is_file():
        raise BadInput(f"--labels {path}: no such file")
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BadInput(f"--labels {path}: not an .npy file ({exc})") from None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise BadInput(f"--labels {path}: expected a 1-d array of class indices")
    return labels


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
    _check_writable("-o", args.output)
    _check_writable("--report", args.report)
    args.input_shapes = _parse_shapes(args.input_shape)
    args.weights = args.arch_args = None
    progress = _Progress()
    try:
        budget = bnfold.Budget(
            min_top1_agreement=args.min_top1_agreement,
            max_rel_l2=args.max_rel_l2,
            max_accuracy_drop=args.max_accuracy_drop,
        )
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    example = None
    if args.input.startswith(_ARCHITECTURE_PREFIXES):
        _architecture, model, example = _architecture_model(args, progress)
        # not exported yet: the inputs have no names, an .npz gives them in order
        names = [f"input {i}" for i in range(len(example))]
    else:
        model = _load_onnx(Path(args.input))
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
    calibration = _read_calibration(Path(args.calibration), names) if args.calibration else None
    labels = _read_labels(Path(args.labels)) if args.labels else None
    if labels is not None and calibration is None:
        raise BadInput("--labels are the classes of the --calibration inputs: give both")
    if labels is not None and len(labels) != sum(len(batch[0]) for batch in calibration):
        samples = sum(len(batch[0]) for batch in calibration)
        raise BadInput(f"--labels: {len(labels)} labels for {samples} calibration samples")
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


def _add_optimize(sub) -> None:
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
        help="calibration inputs: one array, or one per input name (first axis: samples)",
    )
    opt.add_argument(
        "--labels", metavar="LABELS.npy", help="class indices of the calibration samples"
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other bad input
        self.exit(EXIT_BAD_INPUT, f"bnfold: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnfold",
        description="Fold trained BatchNorm into the layers around it, verify the result "
        "against the original, export ONNX, and serve it.",
        epilog="Exit codes: 0 done, 1 verification failed, 2 bad input.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fold = sub.add_parser(
        "fold",
        help="fold BatchNorm in an ONNX file or an architecture's weights",
        description="Fold BatchNorm in an ONNX file, or in a zoo / torchvision / timm "
        "architecture with safetensors weights (folded in torch, exported to ONNX).",
    )
    fold.add_argument(
        "input",
        metavar="IN",
        help="an .onnx file, or zoo:NAME, torchvision:NAME, timm:NAME (PyTorch checkpoints, "
        "which are pickles, are not loaded)",
    )
    fold.add_argument(
        "--weights",
        metavar="W.safetensors",
        help="the architecture's weights (default: the zoo's own; torchvision/timm: random)",
    )
    fold.add_argument(
        "--arch-args",
        metavar="JSON",
        help="constructor arguments, e.g. '{\"num_classes\": 10}' (num_classes, in_chans, "
        "global_pool, drop_rate, width_mult, aux_logits)",
    )
    fold.add_argument("-o", "--output", metavar="OUT.onnx", help="write the folded ONNX graph")
    fold.add_argument("--report", metavar="REPORT.json", help="write the reports as JSON")
    fold.add_argument("--verify", action="store_true", help="compare with the original")
    fold.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D1,D2,...",
        help="shape of a graph input with symbolic dims, for generated verification inputs",
    )
    fold.add_argument(
        "--base-dir",
        metavar="DIR",
        help="directory allowed for the model's external data files (only this one is read)",
    )
    fold.set_defaults(func=_cmd_fold)
    _add_optimize(sub)
    # listed for --help; main() hands `bnfold serve ...` to service.cli before parsing
    sub.add_parser("serve", help="run the HTTP service (bnfold serve --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        # The service depends on the library, never the other way: imported only here.
        from service.cli import main as serve

        return serve(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BadInput as exc:
        print(f"bnfold: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bnfold: error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, never a traceback
        print(f"bnfold: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_VERIFY_FAILED


if __name__ == "__main__":
    sys.exit(main())
