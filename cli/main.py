"""The ``moeca`` command: one subcommand per stage, each registered by the package that owns it."""
from __future__ import annotations

import argparse
import importlib
import sys

from moeca.common.inputs import check_utf8_arguments
from moeca.common.outputs import describe_os_error

COMMAND_MODULES = (
    "moeca.cli.pipeline",   # run: the main job end to end
    "moeca.cli.models",     # sample, train-demo, evaluate-demo
    "moeca.tracer.cli",     # trace, trace-info
    "moeca.analysis.cli",   # analyze
    "moeca.cli.schedule",   # schedule show|derive|build (the composition root: policy + replay calibration)
    "moeca.replay.cli",     # replay
    "moeca.replay.calibrate_cli",  # calibrate: wall-clock unit costs for --target-speedup
    "moeca.integrations.diffusers_cli",  # trace/replay --diffusers: HiDream-I1 (the [diffusers] extra, imported on use)
    "moeca.bench.cli",      # bench NAME
    "moeca.app.cli",        # app
)

DESCRIPTION = """\
moeca: expert-branch-level caching for Mixture-of-Experts diffusion transformers (DiT-MoE).

Typical flow on the shipped demo model:
  moeca trace --model demo --out out/trace          record branch activity while sampling
  moeca analyze out/trace --out out/report          token- vs branch-level redundancy report
  moeca schedule derive out/trace --target-speedup 1.5 --out out/schedule.json
  moeca replay --schedule out/schedule.json --model demo --out out/replay
or all of it at once:  moeca run --out out
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeca", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # a command that takes the rest of the line (``moeca bench NAME ...``: its module parses it) gets the
    # arguments this parser does not know; any other command is refused them, as parse_args would
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "takes_rest", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        check_utf8_arguments(argv)
        result = args.func(args)
    except (ValueError, FloatingPointError) as exc:
        print(f"moeca {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno is None:  # raised by moeca with its own message (FileNotFoundError("... does not exist"))
            print(f"moeca {args.command}: error: {exc}", file=sys.stderr)
        else:                  # raised by the OS (full or read-only disk, permissions) outside the writers
            print(f"moeca {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
