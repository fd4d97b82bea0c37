"""The `tinylm` command line.

Each feature module owns its sub-commands: it defines `add_cli(subparsers)`, which adds its
parsers and sets `func` to the handler. Handlers import their heavy dependencies lazily so that
`tinylm --help` stays fast. This file only lists the modules, in the order users meet them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module that defines each group of sub-commands (order = order in `tinylm --help`).
COMMAND_MODULES = [
    "tinylm.quickstart",   # quickstart
    "tinylm.text.tokenizer",    # tokenizer train
    "tinylm.export.interop",      # init, info, import
    "tinylm.export.gguf_export",  # export (transformers directory or GGUF file)
    "tinylm.data.prepare",      # data check, data prepare, data clean
    "tinylm.train",        # train
    "tinylm.inference.chat",         # chat, generate
    "tinylm.serving.server",       # serve
    "tinylm.evaluation.evaluate",     # eval
    "tinylm.evaluation.report",       # report
    "tinylm.export.hub",          # download
]


class CLIError(Exception):
    """An error caused by user input: printed as one clear line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm",
        description="Build, train, evaluate, chat with and serve a small LLM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CLIError, OSError, ValueError) as e:
        # User-facing errors: one line naming the file/field, never a deep traceback.
        print(f"tinylm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
