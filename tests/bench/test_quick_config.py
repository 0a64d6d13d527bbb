"""The benchmark the docs name first finishes in minutes: a small matrix (two builds, eight cells) that the page
shows before the long ones."""

from tome_export.bench.config import cells, load_config
from tome_testing import REPO_ROOT


def test_the_first_benchmark_is_small_and_named_first():
    config = load_config(REPO_ROOT / "benchmarks" / "quick_cpu.yaml")
    assert len(cells(config)) == 8 and config.dynamic_batch  # one artifact per r serves both batch sizes
    assert [m.model for m in config.models] == ["vit_t16"] and len(config.r) == 2 and config.precisions == ("fp32",)
    page = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    assert page.index("benchmarks/quick_cpu.yaml") < page.index("benchmarks/vit_b16_cpu.yaml")
