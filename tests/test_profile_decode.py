"""benchmarks/profile_decode.py: where a step's kernels meet (the profiling itself needs a GPU)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_decode.py"
spec = importlib.util.spec_from_file_location("profile_decode", SCRIPT)
profile_decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_decode)


def test_boundaries_sum_the_gaps_between_kinds_of_kernel_in_the_order_they_ran():
    step = [  # (name, start us, end us), out of order: the order is the start times'
        ("_attention_kernel", 10.0, 15.0),
        ("_rope_kv_write_kernel", 0.0, 2.0),
        ("int4_mma_streamed_kernel<...>", 14.0, 30.0),  # a programmatic dependent: starts 1 us early
        ("int4_mma_streamed_kernel<...>", 31.5, 40.0),
        ("_gated_act_kernel", 43.0, 44.0),
    ]
    rows = {b["pair"]: b for b in profile_decode.boundaries(step)}
    assert rows["kv write → attention"] == {"pair": "kv write → attention", "count": 1, "gap_us": 8.0, "idle_us": 8.0}
    assert rows["attention → quantized linear"]["gap_us"] == pytest.approx(-1.0)
    assert rows["attention → quantized linear"]["idle_us"] == 0.0
    linear = rows["quantized linear → quantized linear"]
    assert linear["count"] == 1 and linear["gap_us"] == pytest.approx(1.5)
    assert rows["quantized linear → gated activation"]["idle_us"] == pytest.approx(3.0)
    assert profile_decode.boundaries(step)[0]["pair"] == "kv write → attention"  # most idle first
    assert profile_decode.boundaries(step[:1]) == []
