"""``tome-export verify DIR``: check, on this machine, that an artifact computes what it was validated to compute
(:mod:`tome_export.runtime.selfcheck`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from .common import Command, Parser

EXAMPLES = """examples:
  tome-export verify tome-out/vit_b16-r16-openvino-int8
  ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI tome-export verify DIR     # the same CPU without AMX (oneDNN backends)

Checks every file against its sha256, loads the artifact with its runner, runs the views of the bundled photos
the build stored in it and compares the outputs with the PyTorch outputs the build validated against, under the
build's thresholds; shows how far they moved from the build machine's own outputs. runtime.load runs the same
check before the first use on each machine (once per artifact, runtime versions and CPU/GPU features; passes are
cached in $TOME_EXPORT_CACHE or ~/.cache/tome-export); this command runs it now, whatever the cache holds.
Exit 0: it computes what it was validated to compute here; 1: it does not (or a checksum does not match);
2: not an artifact directory, the runtime is missing, or the artifact holds no self-check (rebuild it).
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="tome-export verify", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Check that a build directory computes, on this machine, what it was validated to "
               "compute where it was built.")
    p.add_argument("artifact", type=Path, help="a directory written by tome-export")
    p.add_argument("--threads", type=int, help="CPU threads (default: the backend's)")
    p.add_argument("--json", action="store_true", help="the outcome as JSON on stdout")
    return p


def run(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    from ..errors import UserError
    from ..runtime import open_artifact, selfcheck

    artifact = open_artifact(args.artifact)  # checksums first: a modified file is refused before anything runs
    if not selfcheck.has_self_check(artifact.manifest):
        raise UserError(f"{str(args.artifact)!r} holds no self-check (built by tome-export "
                        f"{artifact.manifest.tool_version}, before artifacts carried one): its checksums verify; "
                        f"rebuild it with this version to check what it computes here")
    outcome = artifact.verify(args.threads)
    if args.json:
        print(json.dumps({"path": str(args.artifact), **outcome.to_dict()}, indent=2, default=str))
    else:
        print("\n".join(selfcheck.outcome_lines(args.artifact, outcome)))
    if not outcome.passed:
        raise selfcheck.SelfCheckError(selfcheck.refusal(args.artifact, outcome))
    return 0


COMMAND = Command("verify", run, "check that an artifact computes here what it was validated to compute")
