"""What every subcommand shares: its registration, an argument parser whose errors are one line, progress."""

from __future__ import annotations

import argparse
import sys
import time
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
    """The current step and the elapsed time: a tqdm line on a terminal; in logs and pipes one line per finished
    step with its duration (a CI log shows where a long build spent its time, and a build stopped by bad input
    still prints just its one error line); warnings are printed above it."""

    def __init__(self, steps: int, quiet: bool) -> None:
        self.lines = not quiet and not sys.stderr.isatty()
        self.step = ""
        self.started = time.monotonic()
        self.bar = None
        if not quiet and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, bar_format="{desc} [{elapsed}]", file=sys.stderr, leave=False)

    def __call__(self, message: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(message)
            self.bar.update(1)
        self._finished()
        self.step, self.started = message, time.monotonic()

    def _finished(self) -> None:
        if self.lines and self.step:
            print(f"tome-export: {self.step}: done in {time.monotonic() - self.started:.1f} s", file=sys.stderr,
                  flush=True)

    def warn(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(f"warning: {message}", file=sys.stderr)
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def done(self) -> None:
        """The last step finished (a failed build says why instead)."""
        self._finished()
        self.step = ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
