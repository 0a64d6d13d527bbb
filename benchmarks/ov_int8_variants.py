"""OpenVINO int8 recipe variants, validated as a build validates them, under this process's CPU (and
``ONEDNN_MAX_CPU_ISA``): does a variant of the quantization keep the logits closer to PyTorch ToMe?

Exports the model once per (r, batch), quantizes it with NNCF as the ``openvino-int8`` recipe does (transformer
preset, performance, fast bias correction, ToMe layers in the ignored scope, 32 augmented bundled photos) and with
the variants asked for, and compares each IR's logits with PyTorch's on the build's 32 validation views. Reports
min cosine, max |diff|, top-1 agreement and the merge-decision margin excusals exactly as the build's gate counts
them (:func:`tome_export.quality.validate.validate_against_torch`, without raising).

    python benchmarks/ov_int8_variants.py                                # vit_t16, r 0 and 8, batch 1
    python benchmarks/ov_int8_variants.py --model vit_b16 --r 16 --batch 1 --batch 8 --out int8-variants
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python benchmarks/ov_int8_variants.py --out int8-variants-vnni

Variants (--variants): recipe (as shipped), overflow_fix (NNCF OverflowFix.ENABLE: 7-bit weights in every layer,
for CPUs without VNNI), unprotected (no ignored scope: the ToMe layers quantized too), mixed (preset MIXED:
asymmetric activations). Writes OUT.json (and prints a table); numbers depend on the CPU: record ``lscpu``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

VARIANTS = ("recipe", "overflow_fix", "unprotected", "mixed")


def quantize(converted: Any, batches: List[Any], protected: List[str], variant: str) -> Any:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    kwargs: Dict[str, Any] = {}
    if protected and variant != "unprotected":
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(protected))
    if variant == "overflow_fix":
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE)
    preset = nncf.QuantizationPreset.MIXED if variant == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    return nncf.quantize(converted.clone(), nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                         preset=preset, subset_size=sum(len(b) for b in batches), fast_bias_correction=True, **kwargs)


def figures(model: Any, ir: Any, batches: List[Any]) -> Dict[str, Any]:
    """The build gate's figures for the IR's logits (thresholds set impossibly strict so nothing is excused)."""
    import numpy as np
    import openvino as ov

    from tome_export.quality.decisions import matching_margins
    from tome_export.quality.validate import TIE_MARGIN, compare_logits, input_ids, torch_outputs

    compiled = ov.Core().compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    reference, _ = torch_outputs(model, batches)
    candidate = np.concatenate([compiled(x)[0] for x in batches])
    ids = input_ids(batches)
    metrics = compare_logits(reference, candidate, ids)
    margins = matching_margins(model, batches)
    cos = (reference * candidate).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))
    tied = margins < TIE_MARGIN
    metrics["min_cosine_without_near_ties"] = float(cos[~tied].min()) if (~tied).any() else None
    metrics["near_tie_rows"] = int(tied.sum())
    return {k: metrics[k] for k in ("min_cosine", "min_cosine_without_near_ties", "near_tie_rows", "max_abs_diff",
                                    "top1_agreement", "images")}


def run_case(name: str, r: int, batch: int, variants: List[str], work: Path) -> List[Dict[str, Any]]:
    import openvino as ov

    from tome_export.graph_names import KEEP_FP32
    from tome_export.pipeline import BuildRequest, export, prepare, prepare_model
    from tome_export.quality.calibration import calibrate
    from tome_export.quality.validate import validation_batches

    prepared = prepare(BuildRequest(model=name, r=r, target="openvino", precision="int8", weights="random",
                                    batch=batch, output=work / f"unused-{r}-{batch}", force=True))
    built = prepare_model(prepared)
    onnx_path = export(prepared, built, work / f"r{r}-b{batch}" / "model.onnx")
    converted = ov.convert_model(str(onnx_path))
    protected = [op.get_friendly_name() for op in converted.get_ordered_ops()
                 if op.get_friendly_name().startswith(KEEP_FP32["tome"])]
    calib, _ = calibrate(prepared.plan.settings.calibration, built.preprocessing, batch)  # the recipe's photos
    checks = validation_batches(built.preprocessing, batch, False)
    rows = []
    for variant in variants:
        ir = quantize(converted, calib, protected, variant)
        rows.append({"model": name, "r": r, "batch": batch, "variant": variant, **figures(built.model, ir, checks)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_t16")
    p.add_argument("--r", type=int, action="append", help="repeat (default 0 and 8)")
    p.add_argument("--batch", type=int, action="append", help="static batch, repeat (default 1)")
    p.add_argument("--variants", default="recipe,overflow_fix", help=f"comma-separated from {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=Path("ov-int8-variants"))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    from tome_export.runtime.machine import cpu_description

    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ov-int8-variants-") as tmp:
        for r in args.r or [0, 8]:
            for batch in args.batch or [1]:
                rows += run_case(args.model, r, batch, variants, Path(tmp))
    Path(f"{args.out}.json").write_text(json.dumps({"cpu": cpu_description(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
