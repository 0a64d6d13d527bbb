"""What every subcommand shares: its registration, an argument parser whose errors are one line, progress."""

from __future__ import annotations

import argparse
import sys
import threading
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
    """The current step (``[n/N] what``) and the elapsed time: a tqdm line on a terminal, redrawn every second so
    it never looks frozen; in logs and pipes one line per finished step with its duration (a CI log shows where a
    long build spent its time, and a build stopped by bad input still prints just its one error line); warnings
    are printed above it. :meth:`sub` names a part of the current step (a target's own phases) without counting
    a step."""

    def __init__(self, steps: int, quiet: bool) -> None:
        self.lines = not quiet and not sys.stderr.isatty()
        self.total, self.count = steps, 0
        self.step = self.main = ""
        self.started = time.monotonic()
        self.bar = None
        self._stop = threading.Event()
        if not quiet and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, bar_format="{desc} [{elapsed}]", file=sys.stderr, leave=False)
            threading.Thread(target=self._redraw, daemon=True).start()

    def _redraw(self) -> None:
        while not self._stop.wait(1.0):
            bar = self.bar
            if bar is not None:
                bar.refresh()

    def __call__(self, message: str) -> None:
        self.count = min(self.count + 1, self.total)
        self.main = f"[{self.count}/{self.total}] {message}"
        if self.bar is not None:
            self.bar.update(1)
        self._begin(self.main)

    def sub(self, message: str) -> None:
        """A part of the current step."""
        self._begin(f"{self.main}: {message}" if self.main else message)

    def _begin(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)
        self._finished()
        self.step, self.started = text, time.monotonic()

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
        self._stop.set()
        if self.bar is not None:
            bar, self.bar = self.bar, None
            bar.close()
