"""The ``tome-export`` command: one module per subcommand in this package, each defining ``COMMAND``.

``tome-export [options]`` builds (:mod:`.export`); ``tome-export NAME ...`` runs the subcommand NAME. Modules
added here (or declared in the ``tome_export.commands`` entry-point group) are found by name.
Bad input -> one line on stderr and exit 2; a failed validation -> one line and exit 1.
"""

from __future__ import annotations

import importlib
import pkgutil
import signal
import sys
import warnings
from importlib import metadata
from typing import Dict, List, Optional

from ..errors import EXIT_CHECK_FAILED, EXIT_USER_ERROR, UserError, ValidationError, os_error_message
from .common import Command

DEFAULT = "export"
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
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        known = commands()
        if argv and argv[0] in known and argv[0] != DEFAULT:
            return known[argv[0]].run(argv[1:])
        return known[DEFAULT].run(argv)
    except UserError as exc:
        print(f"tome-export: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ValidationError as exc:
        print(f"tome-export: validation failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except OSError as exc:  # the disk, permissions, name lengths: the user's to fix, never a traceback
        print(f"tome-export: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tome-export: interrupted; nothing was written", file=sys.stderr)
        return 130


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: nothing half-written stays


def run() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
