"""Every ``tome-export`` command shown in the README, in docs/ and in the ``--help`` examples parses with today's
flags, so an example cannot go stale when a flag is renamed (running them is the other tests' job: they need
builds); every link between those pages leads to a file that exists."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from tome_export.cli import DEFAULT, commands
from tome_testing import REPO_ROOT as ROOT


DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands():
    text = "\n".join(page.read_text() for page in DOC_PAGES)
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line.split(" #")[0]):
                part = part.strip()
                if part.startswith("tome-export"):
                    yield part


def help_commands():
    for name in commands():
        module = importlib.import_module(f"tome_export.cli.{name}")
        epilog = getattr(module, "EXAMPLES", None) or getattr(module, "BENCH_EXAMPLES", "")
        for line in epilog.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("tome-export"):
                yield line


def parse(command: str):
    argv = shlex.split(command)[1:]
    known = commands()
    name = argv[0] if argv and argv[0] in known and argv[0] != DEFAULT else DEFAULT
    rest = argv[1:] if name != DEFAULT else argv
    module = importlib.import_module(f"tome_export.cli.{name}")
    return module.parser().parse_args(rest)


EXAMPLES = sorted(set(readme_commands())) + sorted(set(help_commands()) - set(readme_commands()))


def test_examples_are_found():
    assert len(list(readme_commands())) >= 8 and len(list(help_commands())) >= 10


@pytest.mark.parametrize("command", EXAMPLES)
def test_example_parses(command):
    if "--help" in command or "--version" in command:
        pytest.skip("prints and exits")
    parse(command)


STABLE = ("model", "target", "input", "r ", "tokens", "runtime", "inputs", "outputs", "ToMe blocks", "r (metadata)")


def test_readme_inspect_sample_is_what_inspect_prints(traced_artifact):
    """The README's ``inspect`` sample is the report of the same build (digits_vit, r=16, --trace-source): the same
    lines in the same order; lines without measured numbers, sizes or versions identical."""
    from tome_export.inspection import format_report, inspect_path

    directory, _ = traced_artifact
    text = (ROOT / "docs" / "usage.md").read_text()
    sample = re.search(r"```\n\$ tome-export inspect (\S+)\n(.*?)```", text, flags=re.S)
    assert sample, "docs/usage.md has no inspect sample"
    shown = sample.group(2).replace(sample.group(1), "DIR").splitlines()
    printed = format_report(inspect_path(directory)).replace(str(directory), "DIR").splitlines()
    labels = [line[:12] for line in printed]
    assert [line[:12] for line in shown] == labels
    for want, got in zip(shown, printed):
        if want.strip().startswith(STABLE):
            assert want == got


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.name)
def test_links_between_pages_lead_to_files(page):
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
            missing.append(target)
    assert missing == []


def test_readme_is_a_map():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert text.index("## How the code is laid out") < text.index("## Documentation")
    linked = set(re.findall(r"\(docs/([\w-]+\.md)", text))
    assert linked >= {"usage.md", "merge-semantics.md", "models.md", "targets.md", "serving.md", "tuning.md",
                      "benchmarks.md", "development.md"}
