"""adaskip command line: calibrate, run, export, demo, eval, report, bench. Each subcommand is a module
here with its own `register(subparsers)` (bench: adaskip.benchmarks); `main` puts them together
and turns a user's error into one line."""
from __future__ import annotations

import argparse
import os

from . import calibrate, demo, evaluate, export, report, run

# In the order `adaskip --help` lists them.
SUBCOMMANDS = (calibrate, run, export, demo, evaluate, report)

# Errors a user's input causes (a bad value, a missing or unreadable file, a malformed JSON or
# config): one line, no traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def parser() -> argparse.ArgumentParser:
    from ..benchmarks import register as register_bench

    p = argparse.ArgumentParser(prog="adaskip", description="Adaptive sublayer skipping for long-context inference")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: ADASKIP_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(sub)
    register_bench(sub)
    _add_debug(sub)
    return p


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    a.argv = None if argv is None else list(argv)  # for the `command` a result file records
    debug = a.debug or os.environ.get("ADASKIP_DEBUG", "") not in ("", "0")
    try:
        a.func(a)
    except USER_ERRORS as e:
        if debug:  # the traceback, for a bug report
            raise
        raise SystemExit(user_error_line(e)) from None
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit("adaskip: interrupted (what was already written stays; see the lines above)") from None


def _add_debug(subparsers) -> None:
    """--debug on every subcommand, nested ones (bench e2e) included: `adaskip run ... --debug`
    as well as `adaskip --debug run ...` (SUPPRESS: a subcommand's default does not undo the latter)."""
    for q in subparsers.choices.values():
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error (also: ADASKIP_DEBUG=1)")
        for action in q._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_debug(action)


def user_error_line(e: BaseException) -> str:
    """The one line printed for a user error: its message, prefixed once with 'adaskip:'."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text if text.startswith("adaskip:") else f"adaskip: error: {text}"
