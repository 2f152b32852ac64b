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

One module per command (`fold`, `optimize`); `loading`: the model from an ONNX file or an
architecture; `console`: exit codes, the one-line error, progress, argument checks.
"""

from __future__ import annotations

import argparse
import os
import sys

from bnfold.cli.console import EXIT_BAD_INPUT, EXIT_INTERNAL, BadInput
from bnfold.cli.fold import add_fold
from bnfold.cli.optimize import add_optimize

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other bad input
        self.exit(EXIT_BAD_INPUT, f"bnfold: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnfold",
        description="Fold trained BatchNorm into the layers around it, verify the result "
        "against the original, export ONNX, and serve it.",
        epilog="Exit codes: 0 done, 1 verification failed, 2 bad input, 3 an error inside "
        "bnfold (its one-line message is worth reporting).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_fold(sub)
    add_optimize(sub)
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
        status = args.func(args)
        sys.stdout.flush()  # a pipe closed early is met here, not in the interpreter's exit
        return status
    except BadInput as exc:
        print(f"bnfold: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bnfold: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `bnfold ... | head`: the reader left, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 141  # 128 + SIGPIPE, as a shell reports a command the pipe closed on
    except Exception as exc:  # noqa: BLE001 - one line for the user, never a traceback
        print(f"bnfold: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
