"""Run the committed ``tome-export tune`` examples and keep their reports (not the built models) under
``benchmarks/results/<name>/``: ``tune.md``, ``tune-pareto.png``, ``tune.json`` (the manifest's ``tune`` section)
and ``run.md`` (the command, its wall-clock time, the exit status, the load average before and after).

    python benchmarks/tune_examples.py digits        # the embedded digits model, a real 1-point accuracy budget
    python benchmarks/tune_examples.py vit_b16       # ViT-B/16 (random weights), OpenVINO, batch 8, agreement

The built artifacts go to a scratch directory (``--work``, default a temporary one); the candidates' cache is
tome-export's default, so a second run reuses the builds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLES = {
    "digits": ("tune_digits_openvino",
               ["--model", "digits_vit", "--target", "openvino", "--max-accuracy-drop", "1.0", "--data", "digits"]),
    "vit_b16": ("tune_vit_b16_openvino",
                ["--model", "vit_b16", "--weights", "random", "--target", "openvino", "--batch", "8",
                 "--min-agreement", "0.95", "--time-budget", "12"]),
}


def run_example(name: str, work: Path, extra: list) -> int:
    folder, args = EXAMPLES[name]
    out = work / folder
    command = ["tome-export", "tune", *args, *extra, "--output", str(out), "--force"]
    load_before = os.getloadavg()
    started = time.time()
    done = subprocess.run(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seconds = time.time() - started
    load_after = os.getloadavg()
    sys.stderr.write(done.stderr)
    sys.stdout.write(done.stdout)
    dest = RESULTS / folder
    dest.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        for file in ("tune.md", "tune-pareto.png"):
            shutil.copy2(out / file, dest / file)
        section = json.loads((out / "manifest.json").read_text())["tune"]
        (dest / "tune.json").write_text(json.dumps(section, indent=1) + "\n")
    lines = [f"# `{folder}`", "", "```", " ".join(command[:-3] + ["--output", "out/"]), "```", "",
             f"- Wall-clock time of the whole command: {seconds / 60:.1f} min ({seconds:.0f} s), exit status "
             f"{done.returncode}",
             f"- Load average (1/5/15 min) before {' / '.join(f'{v:.2f}' for v in load_before)}, after "
             f"{' / '.join(f'{v:.2f}' for v in load_after)}",
             "- Throughputs are comparable only with each other, inside one interleaved measurement"
             + ("; other jobs were running when it started (1-min load above 1 on 2 vCPUs)." if load_before[0] > 1.0
                else "."),
             "", "Progress lines as printed:", "", "```", *done.stderr.strip().splitlines(), "```", ""]
    (dest / "run.md").write_text("\n".join(lines))
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("examples", nargs="+", choices=sorted(EXAMPLES))
    parser.add_argument("--work", type=Path, help="where the winning artifacts are written (default: a temp dir)")
    args, extra = parser.parse_known_args()  # flags it does not know go to tome-export tune
    work = args.work or Path(tempfile.mkdtemp(prefix="tune-examples-"))
    return max(run_example(name, work, extra) for name in args.examples)


if __name__ == "__main__":
    sys.exit(main())
