"""The `stepdistill` entry point: environment first (offline, quiet libraries), then the parser, then the chosen
subcommand's module, imported by name (:func:`command_function`) so that `--help` and argument errors answer
without loading torch or diffusers. Every failure is one line on stderr."""

from __future__ import annotations

import importlib
import os
import sys

from stepdistill.cli.parser import build_parser
from stepdistill.core.errors import InputError


def command_function(spec: str):
    """The function ``"module:function"`` names (a subcommand's ``func`` default), its module imported now."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _set_threads(threads: int | None) -> None:
    if threads:
        importlib.import_module("torch").set_num_threads(threads)


def _one_line(err: BaseException, command: str = "") -> str:
    """The error's message on one line (library messages sometimes span several), without a leading
    ``stepdistill <command>:`` that the caller prints itself."""
    text = " ".join(str(err).split()) or type(err).__name__
    prefix = f"stepdistill {command}: " if command else None
    while prefix and text.startswith(prefix):
        text = text[len(prefix):]
    return text


def _quiet_libraries() -> None:
    """Keep stderr for stepdistill's own lines: diffusers/transformers advisory warnings and their model-loading
    progress bars off (STEPDISTILL_DEBUG=1 keeps them)."""
    if os.environ.get("STEPDISTILL_DEBUG"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        from transformers.utils import logging as tlogging

        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def _guarded(command: str, fn) -> int:
    """Run ``fn()``; any failure is one clear line on stderr and a non-zero exit (2: invalid input, a missing or
    damaged file, an unavailable metric; 1: anything else; 130: interrupted). STEPDISTILL_DEBUG=1 adds the
    traceback."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"stepdistill {command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (InputError, ValueError, OSError) as err:
        if os.environ.get("STEPDISTILL_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"stepdistill {command}: error: {_one_line(err, command)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one clear line instead of a traceback
        if os.environ.get("STEPDISTILL_DEBUG"):
            import traceback

            traceback.print_exc()
        print(f"stepdistill {command}: error: {type(err).__name__}: {_one_line(err, command)} (set STEPDISTILL_DEBUG=1 for "
              "the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "passes_options_on", False):  # only gpu-scale hands its options on
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.options = unknown
    command = args.command if args.command != "toy" else f"toy {args.toy_cmd}"

    def run() -> int:
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
        _set_threads(args.threads)
        _quiet_libraries()
        return int(command_function(args.func)(args) or 0)

    return _guarded(command, run)
