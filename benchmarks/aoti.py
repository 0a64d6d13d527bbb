"""AOTInductor packages (targets ``aoti-cuda`` and ``aoti``) against the PyTorch path and ONNX Runtime, side by side.

One prepared command per machine; each writes its section into ``benchmarks/results/aoti.{json,md}`` (``--out``
to change it), keeping the section the other machine wrote (``--fresh`` drops it):

    PYTHONPATH=. python benchmarks/aoti.py --section gpu     # the lent H100/H200: two ViT-B/16 compiles, then timing
    PYTHONPATH=. python benchmarks/aoti.py --section cpu     # a quiet CPU machine: four builds, each package minutes
    PYTHONPATH=. python benchmarks/aoti.py --smoke --out /tmp/aoti_smoke     # both sections' code on a tiny model, CPU

Builds go to ``--workdir`` and are reused by a later run (delete it to build again).

GPU section (ViT-B/16 224 px, random weights, fp16, r=16 and r=0): two ``aoti-cuda`` packages built the same way by
the pipeline (dynamic batch 1-256, compiled and validated on this GPU against the fp32 PyTorch ToMe model on the 32
views), then, at batch 1, 8, 64 and 256, in the same process and interleaved rounds timed with CUDA events: the two
packages called with CUDA tensors (plainly and replayed as a CUDA graph), eager PyTorch under CUDA graphs with ToMe
r=16 (the fused path) and without ToMe (timm's model). Every callable takes the fp32 images and casts them to fp16
itself, as the package does. Then the cold start of each package in a fresh process: ``import torch``, CUDA
initialisation, ``tome_export.runtime.load(DIR)`` (its checksums included) and the first batch, each timed.

CPU section (ViT-B/16, fp32, r=16 and r=0, dynamic batch): ``aoti`` packages against the ``onnxruntime`` target,
both run through ``tome_export.runtime.load`` on every core, batch 1 and 8, interleaved rounds, wall clock.

The GPU machine needs torch with CUDA, Triton, timm and PyYAML (recipes), plus onnx and onnxruntime (the build
records their versions); carry wheels that are missing (``pip download --no-deps timm pyyaml -d .whl``, then there
``pip install --no-deps --target .whl/site .whl/*.whl`` and ``PYTHONPATH=.:.whl/site``). Targets checked in the
report: the package at least as fast as the PyTorch path under CUDA graphs at every batch size, its r=16/r=0 ratio
at least that path's, a cold load under 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from tome_export.bench.timing import cuda_clock_ms, cuda_graph, machine, measure_interleaved, versions  # noqa: E402
from tome_export.models import create_model, patch  # noqa: E402
from tome_export.pipeline import BuildRequest, build  # noqa: E402
from tome_export.recipe import recipe_for  # noqa: E402
from tome_export.runtime import load  # noqa: E402
from tome_export.runtime.aoti import load_package  # noqa: E402

GPU_BATCHES, CPU_BATCHES = (1, 8, 64, 256), (1, 8)
COLD_LOAD_TARGET_S = 5.0
COLD_LOAD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
torch.zeros(1, device=sys.argv[2]).sum().item()
t2 = time.perf_counter()
from tome_export import runtime
from tome_export.images import sample_photos
runner = runtime.load(sys.argv[1])
t3 = time.perf_counter()
x = runner.preprocess_batch(sample_photos(1))
t4 = time.perf_counter()
runner(x)
t5 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "device_init_s": t2 - t1, "runtime_load_s": t3 - t2,
                  "first_batch_s": t5 - t4}))
"""


class Plan:
    """What one run measures: model, schedules, precision, batches, which target and device."""

    def __init__(self, opts: argparse.Namespace, section: str) -> None:
        smoke, gpu = opts.smoke, section == "gpu"
        self.section, self.smoke = section, smoke
        self.model, self.kwargs = ("vit_t16", {"depth": 2, "img_size": 64}) if smoke else ("vit_b16", {})
        self.r = (4, 0) if smoke else (16, 0)
        self.device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        self.target = "aoti-cuda" if self.device == "cuda" else "aoti"
        self.precision = "fp16" if self.device == "cuda" else "fp32"
        self.batches = ((1, 2) if smoke else GPU_BATCHES) if gpu else ((1, 2) if smoke else CPU_BATCHES)
        self.rounds, self.per_round = (2, 2) if smoke else (opts.rounds, opts.per_round)
        self.images = 4 if smoke else 32
        self.cold_runs = 1 if smoke else opts.cold_runs

    @property
    def label(self) -> str:
        smoke = "smoke: " if self.smoke else ""
        return f"{self.model} {self.precision} ({smoke}{self.section} section on {self.device})"


def build_artifact(plan: Plan, target: str, precision: str, r: int, root: Path) -> Path:
    """A pipeline build (dynamic batch) with the built-in recipe, its validation images set by the plan."""
    out = root / f"{plan.model}-r{r}-{target}-{precision}"
    if (out / "manifest.json").is_file():  # an earlier run's build (a run cut short is resumed without rebuilding)
        print(f"  reusing {out}", flush=True)
        return out
    data = recipe_for(target, precision).to_dict()
    data.pop("file")
    data["validation"] = {**data.get("validation", {}), "images": plan.images}
    recipe = root / f"{target}-{precision}-r{r}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    started = time.perf_counter()
    build(BuildRequest(model=plan.model, r=r, target=target, precision=precision, weights="random", output=out,
                       dynamic_batch=True, batch=max(plan.batches[:2]), recipe=recipe, force=True,
                       model_kwargs=plan.kwargs), log=lambda m: print(f"  {target} r={r}: {m}", flush=True))
    print(f"  built {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def artifact_facts(directory: Path) -> Dict[str, Any]:
    m = json.loads((directory / "manifest.json").read_text())
    v, section = m["validation"], m.get("aoti") or {}
    return {"directory": str(directory), "build_seconds": m.get("build_seconds"),
            "compile_seconds": (section.get("package") or {}).get("compile_seconds"),
            "bytes": sum(e["bytes"] for e in m["artifacts"].values()), "lowering": section.get("lowering"),
            "validation": {k: v.get(k) for k in ("backend", "max_abs_diff", "min_cosine", "top1_agreement",
                                                 "top1_interval_95", "images", "passed", "near_tie_images")}}


def eager_models(plan: Plan) -> Dict[str, torch.nn.Module]:
    """The same seeded weights as the builds: patched with ToMe (the fused path on a GPU), and timm's own model."""
    dtype = torch.float16 if plan.precision == "fp16" else torch.float32
    models = {}
    for r in plan.r:
        model, _ = create_model(plan.model, weights="random", seed=0, **plan.kwargs)
        name = f"PyTorch r={r}" if r else "PyTorch no ToMe"
        models[name] = (patch(model, r) if r else model).to(device=plan.device, dtype=dtype).eval()
    return models


def callables(plan: Plan, runs: Dict[int, Callable[[Any], Any]], models: Dict[str, torch.nn.Module],
              x: torch.Tensor) -> Dict[str, Callable[[], Any]]:
    """Every variant as a no-argument call on the fp32 batch ``x`` (already on the device)."""
    dtype = torch.float16 if plan.precision == "fp16" else torch.float32
    calls: Dict[str, Callable[[], Any]] = {}
    for r, run in runs.items():
        calls[f"package r={r}"] = lambda run=run: run(x)
        calls[f"package r={r}, CUDA graph"] = lambda run=run: run(x)
    for name, model in models.items():
        def forward(model=model) -> Any:
            with torch.no_grad():
                return model(x.to(dtype))
        calls[f"{name}, CUDA graph"] = forward
    return calls


def graphed(calls: Dict[str, Callable[[], Any]], skipped: List[str], where: str) -> Dict[str, Callable[[], Any]]:
    """The calls named '..., CUDA graph' captured and replayed (on the CPU: the call itself); failures recorded."""
    out = {}
    for name, fn in calls.items():
        try:
            out[name] = cuda_graph(fn) if name.endswith("CUDA graph") else fn
            out[name]()
        except Exception as exc:  # one variant failing must not lose the others' measurements
            skipped.append(f"{where}, {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return out


def gpu_rows(plan: Plan, packages: Dict[int, Path], skipped: List[str],
             progress: Callable[[List[Dict[str, Any]]], None]) -> List[Dict[str, Any]]:
    runs = {r: load_package(torch, str(directory / "model.pt2"), plan.device) for r, directory in packages.items()}
    models = eager_models(plan)
    rows: List[Dict[str, Any]] = []
    for batch in plan.batches:
        x = torch.randn(batch, 3, *[plan.kwargs.get("img_size", 224)] * 2, device=plan.device)
        calls = graphed(callables(plan, runs, models, x), skipped, f"batch {batch}")
        if plan.device == "cpu":  # no CUDA graph on the CPU: the plain package call is the same thing
            calls = {k: v for k, v in calls.items() if not k.startswith("package") or not k.endswith("CUDA graph")}
        clock = cuda_clock_ms if plan.device == "cuda" else None
        timed = measure_interleaved(calls, rounds=plan.rounds, per_round=plan.per_round, pause_s=0.05,
                                    clocks={n: clock for n in calls} if clock else None)
        rows += [{"batch": batch, "variant": name, **t.summary(batch)} for name, t in timed.items()]
        for row in rows[-len(timed):]:
            print(f"  bs{batch:<4} {row['variant']:<34} {row['median_ms']:9.3f} ms", flush=True)
        del calls
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        progress(ratios(rows, plan.r))
    return ratios(rows, plan.r)


def baseline_of(name: str, r: int) -> str:
    """The no-ToMe variant a variant is compared with: the r=0 package, or timm's model for PyTorch."""
    return name.replace(f"PyTorch r={r}", "PyTorch no ToMe") if name.startswith("PyTorch") else \
        name.replace(f"r={r}", "r=0")


def ratios(rows: List[Dict[str, Any]], r: Tuple[int, int]) -> List[Dict[str, Any]]:
    """Each row's ToMe speed-up over the same family's no-ToMe row at the same batch."""
    by = {(row["batch"], row["variant"]): row["median_ms"] for row in rows}
    for row in rows:
        base = baseline_of(row["variant"], r[0])
        known = base != row["variant"] and (row["batch"], base) in by
        row["speedup_vs_no_tome"] = round(by[(row["batch"], base)] / row["median_ms"], 3) if known else None
    return rows


def cold_loads(plan: Plan, packages: Dict[int, Path], repeats: int) -> Dict[str, Any]:
    """Fresh-process start of each package, ``repeats`` times: median of each phase and of the total."""
    out = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for r, directory in packages.items():
        runs = []
        for _ in range(repeats):
            done = subprocess.run([sys.executable, "-c", COLD_LOAD, str(directory), plan.device], capture_output=True,
                                  text=True, env=env, timeout=600)
            if done.returncode != 0:
                out[f"r={r}"] = {"error": done.stderr.strip().splitlines()[-1][:300]}
                break
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if runs:
            phases = {k: round(statistics.median(run[k] for run in runs), 3) for k in runs[0]}
            out[f"r={r}"] = {**phases, "load_and_first_batch_s": round(phases["runtime_load_s"] +
                                                                      phases["first_batch_s"], 3), "runs": len(runs)}
    return out


def gpu_section(plan: Plan, root: Path, save_now: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """Builds, timings, cold starts; what is measured so far is saved after each step (a run cut short by the
    device's time limit keeps it)."""
    skipped: List[str] = []
    packages = {r: build_artifact(plan, plan.target, plan.precision, r, root) for r in plan.r}
    section: Dict[str, Any] = {"plan": plan.label, "artifacts": {f"r={r}": artifact_facts(d)
                                                                 for r, d in packages.items()},
                               "rows": [], "skipped": skipped}
    save_now(section)

    def progress(rows: List[Dict[str, Any]]) -> None:
        save_now({**section, "rows": rows, "verdicts": gpu_verdicts(plan, rows)})

    rows = gpu_rows(plan, packages, skipped, progress)
    section.update(rows=rows, verdicts=gpu_verdicts(plan, rows))
    save_now(section)
    section["cold_load"] = cold_loads(plan, packages, plan.cold_runs)
    return section


def cpu_section(plan: Plan, root: Path, save_now: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    threads = os.cpu_count() or 1
    built = {(t, r): build_artifact(plan, t, "fp32", r, root) for t in ("aoti", "onnxruntime") for r in plan.r}
    rows = []
    for batch in plan.batches:
        runners = {f"{t} r={r}": load(d, threads=threads) for (t, r), d in built.items()}
        x = next(iter(runners.values())).preprocess_batch(_photos(batch))
        timed = measure_interleaved({n: (lambda rn=rn: rn(x)) for n, rn in runners.items()}, rounds=plan.rounds,
                                    per_round=plan.per_round)
        rows += [{"batch": batch, "threads": threads, "variant": n, **t.summary(batch)} for n, t in timed.items()]
        for runner in runners.values():
            runner.close()
        for row in rows[-len(timed):]:
            print(f"  bs{batch:<3} {row['variant']:<20} {row['median_ms']:9.3f} ms", flush=True)
    return {"plan": f"{plan.model} fp32, aoti vs onnxruntime ({'smoke' if plan.smoke else 'cpu section'})",
            "artifacts": {f"{t} r={r}": artifact_facts(d) for (t, r), d in built.items()},
            "rows": ratios(rows, plan.r), "machine": machine()}


def _photos(count: int) -> List[Any]:
    from tome_export.images import sample_photos

    photos = sample_photos(8)
    return [photos[i % len(photos)] for i in range(count)]


def gpu_verdicts(plan: Plan, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, per batch: the package against the PyTorch path under CUDA graphs, and their ratios."""
    r = plan.r[0]
    by = {(row["batch"], row["variant"]): row for row in rows}
    verdicts = []
    for batch in plan.batches:
        package, eager = by.get((batch, f"package r={r}")), by.get((batch, f"PyTorch r={r}, CUDA graph"))
        if package is None or eager is None:
            continue
        ours, theirs = package["speedup_vs_no_tome"], eager["speedup_vs_no_tome"]
        verdicts.append({"batch": batch, "package_over_pytorch_graph": round(eager["median_ms"] / package["median_ms"], 3),
                         "package_ratio": ours, "pytorch_graph_ratio": theirs,
                         "as_fast": package["median_ms"] <= eager["median_ms"],
                         "ratio_at_least": (ours or 0) >= (theirs or 0)})
    return verdicts


def environment() -> Dict[str, Any]:
    env: Dict[str, Any] = {"python": platform.python_version(), "host": platform.node(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           **versions(("torch", "triton", "timm", "onnxruntime")), "machine": machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return env


def _table(rows: Sequence[Dict[str, Any]], keys: Sequence[str]) -> List[str]:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(k) is None else str(row.get(k)) for k in keys) + " |")
    return lines


def _environment_line(env: Dict[str, Any]) -> str:
    return (f"{env['time']}, {env.get('gpu') or env['machine'].get('cpu_model')}, torch {env.get('torch')}, triton "
            f"{env.get('triton')}, timm {env.get('timm')}, onnxruntime {env.get('onnxruntime')}; CPU flags "
            f"{', '.join(env['machine'].get('cpu_flags', []))}")


def markdown(results: Dict[str, Any]) -> str:
    lines = ["# AOTInductor packages against the PyTorch path and ONNX Runtime", "",
             "Written by `benchmarks/aoti.py`; each section by its own run (command and machine below).", "",
             "Not measured: " + ("; ".join(results["not_measured"]) or "nothing"), ""]
    for name, section in results["sections"].items():
        lines += [f"## {name}: {section['plan']}", "", f"{_environment_line(section['environment'])}. Command: "
                  f"`{section['command']}`.", "", "Artifacts (pipeline builds, validated on the photos):", ""]
        facts = [{"artifact": k, "build s": a["build_seconds"], "compile s": a["compile_seconds"],
                  "MB": round(a["bytes"] / 1e6, 1), "lowering": a["lowering"],
                  "min cosine": round(a["validation"]["min_cosine"], 6), "top-1": a["validation"]["top1_agreement"],
                  "95% interval": a["validation"]["top1_interval_95"], "images": a["validation"]["images"]}
                 for k, a in section["artifacts"].items()]
        lines += _table(facts, list(facts[0])) + [""]
        lines += _table(section["rows"], ["batch", "variant", "median_ms", "p90_ms", "throughput_ips",
                                          "speedup_vs_no_tome", "runs"]) + [""]
        if section.get("verdicts"):
            lines += ["Targets (the ToMe package, plain calls, vs PyTorch ToMe under CUDA graphs):", ""]
            lines += _table(section["verdicts"], list(section["verdicts"][0])) + [""]
        if section.get("cold_load"):
            lines += [f"Cold start in a fresh process (median; target: runtime.load + first batch under "
                      f"{COLD_LOAD_TARGET_S:g} s):", ""]
            cold = [{"package": k, **v} for k, v in section["cold_load"].items()]
            lines += _table(cold, sorted({k for row in cold for k in row}, key=lambda k: k != "package")) + [""]
        lines += [f"- skipped: {s}" for s in section.get("skipped", [])]
    return "\n".join(lines) + "\n"


def not_measured(sections: Dict[str, Any]) -> List[str]:
    """What the results lack: a section never run, GPU figures from a run without a GPU, smoke runs."""
    missing = [f"the {name} section (not run yet)" for name in ("gpu", "cpu") if name not in sections]
    for name, section in sections.items():
        if section.get("smoke"):
            missing.append(f"{name}: a smoke run on a 2-block 64 px ViT-Tiny; its timings say nothing about speed")
        if name == "gpu" and not section["environment"].get("gpu"):
            missing.append("every GPU figure: the gpu section ran without a CUDA GPU (smoke only)")
    return missing


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", choices=("gpu", "cpu", "all"), default="all")
    p.add_argument("--smoke", action="store_true", help="tiny model, two rounds: checks the script, measures nothing")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "aoti",
                   help="results path without suffix (.json and .md are written)")
    p.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "aoti", help="where builds go")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--cold-runs", type=int, default=3, help="fresh processes per package for the cold start")
    p.add_argument("--fresh", action="store_true", help="drop the sections an earlier run left in --out")
    opts = p.parse_args(argv)
    opts.sections = ("gpu", "cpu") if opts.section == "all" else (opts.section,)
    if "gpu" in opts.sections and not torch.cuda.is_available() and not opts.smoke:
        print("benchmarks/aoti.py: the GPU section needs a CUDA GPU (none here): run --section cpu, or --smoke to "
              "check the script", file=sys.stderr)
        return 2
    sections: Dict[str, Any] = {}
    for name in opts.sections:
        plan = Plan(opts, name)
        print(f"{name} section: {plan.label}", flush=True)
        run = gpu_section if name == "gpu" else cpu_section

        def save_now(partial: Dict[str, Any], name: str = name) -> None:
            save(opts, {**sections, name: partial})

        sections[name] = run(plan, opts.workdir / ("smoke" if opts.smoke else name), save_now)
        save(opts, sections)
    print(f"wrote {opts.out.with_suffix('.json')} and .md")
    return 0


def save(opts: argparse.Namespace, sections: Dict[str, Any]) -> None:
    """The results file with this run's sections, keeping the sections of an earlier run this one did not run
    (the GPU and the CPU section are measured on different machines)."""
    path = opts.out.with_suffix(".json")
    earlier = json.loads(path.read_text()).get("sections", {}) if path.is_file() and not opts.fresh else {}
    kept = {name: section for name, section in earlier.items() if "environment" in section}  # this file's format
    stamp = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "environment": environment(),
             "smoke": opts.smoke}
    merged = {**kept, **{name: {**section, **stamp} for name, section in sections.items()}}
    results = {"sections": dict(sorted(merged.items())), "not_measured": not_measured(merged)}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    opts.out.with_suffix(".md").write_text(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
