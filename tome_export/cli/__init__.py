"""The ``tome-export`` command: one module per subcommand in this package, each defining ``COMMAND``.

``tome-export [options]`` builds (:mod:`.export`); ``tome-export NAME ...`` runs the subcommand NAME. Modules
added here (or declared in the ``tome_export.commands`` entry-point group) are found by name.
Bad input -> one line on stderr and exit 2; a failed validation -> one line and exit 1; a bug -> its traceback
and exit 3.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import traceback
import warnings
from importlib import metadata
from typing import Dict, Iterator, List, Optional

from .._version import __version__
from ..errors import (BUILD_STACK, EXIT_CHECK_FAILED, EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, UserError,
                      ValidationError, build_stack_missing, os_error_message)
from .common import Command

DEFAULT = "export"
INTERNAL_ERROR = EXIT_INTERNAL_ERROR
ENTRY_POINTS = "tome_export.commands"


def commands() -> Dict[str, Command]:
    """Every subcommand by name (the default build command included)."""
    found: Dict[str, Command] = {}
    for module in pkgutil.iter_modules(__path__):
        command = getattr(importlib.import_module(f"{__name__}.{module.name}"), "COMMAND", None)
        if isinstance(command, Command):
            found[command.name] = command
    for entry in metadata.entry_points(group=ENTRY_POINTS):
        command = entry.load()
        found[command.name] = command
    return found


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; the exit status: 0 done, 1 validation failed, 2 bad input, 3 internal error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        with _one_line_warnings():
            return _dispatch(argv)
    except UserError as exc:
        print(f"tome-export: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValidationError as exc:
        print(f"tome-export: validation failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt as exc:  # its message, when it has one, says what was complete before it
        print(f"tome-export: interrupted; {str(exc) or 'nothing was written'}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``| head``): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # (after its subclass BrokenPipeError) disk, permissions, names: the user's to fix
        print(f"tome-export: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in BUILD_STACK:
            return _internal_error(exc)
        print(f"tome-export: error: {build_stack_missing(exc.name or '', 'this command')}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug: the traceback is for the report
        return _internal_error(exc)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """tome-export's own warnings as one ``tome-export: warning:`` line each (others keep Python's format)."""
    from ..manifest_schema import NewerManifestWarning

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        if issubclass(category, NewerManifestWarning):
            print(f"tome-export: warning: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _dispatch(argv: List[str]) -> int:
    if argv[:1] in (["--version"], ["-V"]):
        print(f"tome-export {__version__}")
        return 0
    known = commands()
    if argv and argv[0] in known and argv[0] != DEFAULT:
        return known[argv[0]].run(argv[1:])
    return known[DEFAULT].run(argv)


def _internal_error(exc: BaseException) -> int:
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"tome-export: internal error ({type(exc).__name__}: {exc}); this is a bug in tome-export {__version__}: "
          f"please report it with the traceback above", file=sys.stderr)
    return INTERNAL_ERROR


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: nothing half-written stays


def run() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
