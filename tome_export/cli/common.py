"""What every subcommand shares: its registration, an argument parser whose errors are one line, progress."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[Sequence[str]], int]  # argv after the subcommand's name -> exit status
    summary: str


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the usage block)
        raise UserError(f"{message} (see {self.prog} --help)")


class Progress:
    """A tqdm line that shows the current step and the elapsed time; warnings are printed above it."""

    def __init__(self, steps: int, quiet: bool) -> None:
        from tqdm import tqdm

        # Only on a terminal: in logs and pipes stderr stays clean for the one-line errors.
        quiet = quiet or not sys.stderr.isatty()
        self.bar = tqdm(total=steps, bar_format="{desc} [{elapsed}]", disable=quiet, file=sys.stderr, leave=False)

    def __call__(self, message: str) -> None:
        self.bar.set_description_str(message)
        self.bar.update(1)

    def warn(self, message: str) -> None:
        self.bar.write(f"warning: {message}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
