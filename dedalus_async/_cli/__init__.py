"""The ``dedalus-async`` command line (also ``python -m dedalus_async``).

It sits on top of the Session like any other user of the library. ``run`` and
``run-many`` talk to the server named by ``DEDALUS_BASE_URL`` with the key in
``DEDALUS_API_KEY`` / ``DEDALUS_X_API_KEY``; with no key configured (or with ``--local``)
they start an in-process :class:`~dedalus_async._local.LocalBackend` instead and say so on
stderr; the lookups (``get``, ``output``, ``events``, ``cancel``, ``delete``, ``list``) do
with ``--local``, reading the records local backends keep on disk, and so do the
``machines`` subcommands (the local backend's machines are folders on disk). Errors are one line on
stderr, in the command line's terms (flags, environment variables; a library
:class:`~dedalus_async.ConfigurationError` is re-worded from its ``field``); ``--debug``
adds request logs and tracebacks. The
API key is never printed, except by ``serve-local``, whose job is to hand its key out.

The package is split by job: :mod:`._parser` (arguments and help), :mod:`._commands` (what
each subcommand does), :mod:`._sessions` (which server), :mod:`._inputs` (files read),
:mod:`._output` (what is written) and :mod:`._outcomes` (exit codes). This module runs
one invocation and turns every way it can end into an exit code and one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from dedalus_async._errors import ConfigurationError, DedalusError, JournalError

from ._commands import COMMANDS, Command
from ._machines import machine_document
from ._outcomes import (
    EXIT_API_ERROR,
    EXIT_CANCELLED,
    EXIT_EXPIRED,
    EXIT_INTERRUPTED,
    EXIT_REMOTE_FAILED,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    EXIT_WAIT_TIMEOUT,
    Terminated,
    UsageError,
    command_line_words,
    exit_code_for,
)
from ._output import PROG, Context, RedactingFormatter, result_document
from ._parser import build_parser
from ._sessions import DEFAULT_LOCAL_MACHINE, KEY_VARIABLES, configuration_message

__all__ = [
    "DEFAULT_LOCAL_MACHINE",
    "EXIT_API_ERROR",
    "EXIT_CANCELLED",
    "EXIT_EXPIRED",
    "EXIT_INTERRUPTED",
    "EXIT_REMOTE_FAILED",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "EXIT_WAIT_TIMEOUT",
    "build_parser",
    "exit_code_for",
    "main",
]


def _configure_logging(ctx: Context) -> Callable[[], None]:
    """Send the package's log records to stderr, masked; returns what undoes it (so that
    main() can be called in-process without leaving our handler behind)."""
    package = logging.getLogger("dedalus_async")
    saved = (package.handlers[:], package.level, package.propagate)

    def restore() -> None:
        package.handlers[:], package.level, package.propagate = saved

    handler = logging.StreamHandler(ctx.stderr)
    if ctx.debug:
        fmt = f"{PROG}: %(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        fmt = f"{PROG}: %(levelname)s: %(message)s"
    handler.setFormatter(RedactingFormatter(ctx, fmt))
    package.handlers[:] = [handler]
    package.setLevel(logging.DEBUG if ctx.debug else logging.WARNING)
    package.propagate = False
    return restore


async def _main_task(command: Command, args: argparse.Namespace, ctx: Context) -> int:
    # SIGTERM stops like Ctrl-C: local commands run in their own process groups and would
    # outlive an abrupt exit, and --cancel-remote must get its chance to run
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop = asyncio.get_running_loop()
    watch = args.subcommand != "serve-local"  # serve-local handles its own signals
    if watch:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await command(args, ctx)
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        if watch:
            loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (see ``--help``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ctx = Context(debug=args.debug)
    ctx.secrets.update(os.environ[name] for name in KEY_VARIABLES if os.environ.get(name))
    restore_logging = _configure_logging(ctx)
    try:
        return _dispatch(args, ctx)
    finally:
        restore_logging()


def _dispatch(args: argparse.Namespace, ctx: Context) -> int:
    """Run the subcommand; turn every way it can end into an exit code and one line."""
    try:
        return asyncio.run(_main_task(COMMANDS[args.subcommand], args, ctx))
    except KeyboardInterrupt:
        ctx.note("interrupted")
        return EXIT_INTERRUPTED
    except Terminated:
        ctx.note("terminated")
        return 128 + signal.SIGTERM
    except UsageError as exc:
        ctx.error(str(exc))
        return EXIT_USAGE
    except ConfigurationError as exc:
        _debug_traceback(ctx, exc)
        ctx.error(configuration_message(exc, args))
        return EXIT_USAGE
    except JournalError as exc:
        # a journal that is not one, or holds another batch: the command line's to fix
        _debug_traceback(ctx, exc)
        ctx.error(str(exc))
        return EXIT_USAGE
    except DedalusError as exc:
        _debug_traceback(ctx, exc)
        if getattr(args, "json", False):
            # --json promises one object on stdout, an error included
            if args.subcommand == "machines":
                ctx.write_json(machine_document(None, error=exc))
            else:
                ctx.write_json(result_document(None, error=exc))
        ctx.error(str(exc))
        return EXIT_API_ERROR
    except (TypeError, ValueError) as exc:
        # the library checks arguments before sending anything: these are usage errors
        _debug_traceback(ctx, exc)
        ctx.error(command_line_words(str(exc)))
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader of our stdout went away (`| head`): stop quietly, like a shell tool
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as exc:
        _debug_traceback(ctx, exc)
        ctx.error(f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)")
        return EXIT_API_ERROR


def _debug_traceback(ctx: Context, exc: BaseException) -> None:
    if ctx.debug:
        text = "".join(traceback.format_exception(exc))
        ctx.stderr.write(ctx.redact(text))
        ctx.stderr.flush()
