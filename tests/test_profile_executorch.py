"""bench/profile_executorch.py: how perf samples become a per-operator profile."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

LIB = "/venv/lib/python3.11/site-packages/executorch/extension/pybindings/_portable_lib.so"


@pytest.fixture(scope="module")
def profile() -> ModuleType:
    bench = Path(__file__).parents[1] / "bench"
    spec = importlib.util.spec_from_file_location(
        "profile_executorch", bench / "profile_executorch.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench))  # as when the script runs: it imports bench_export
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


# Two functions with unwind entries (0x1000-0x1100, 0x2000-0x2080); 0x3000 has none.
FRAMES_DUMP = """
00000018 0000000000000024 0000001c FDE cie=00000000 pc=0000000000001000..0000000000001100
00000040 0000000000000020 00000044 FDE cie=00000000 pc=0000000000002000..0000000000002080
"""

PERF_SCRIPT = f"""python  4242 100.000100000:    3344 cpu-clock:ppp:
\t          152ad9 __memcpy_avx_unaligned_erms+0x59 (/usr/lib/x86_64-linux-gnu/libc.so.6)
\t            1010 [unknown] ({LIB})
\t         7feefbc pthreadpool_parallelize_1d+0xac (/venv/torch/lib/libtorch_cpu.so)
\t          1904e8 [unknown] ({LIB})
\t          14e9ae xnn_invoke_runtime+0x6e ({LIB})
\t          9c6bdb executorch::runtime::Method::execute+0xfb ({LIB})

python  4242 100.000200000:    3344 cpu-clock:ppp:
\t          670367 torch::executor::native::opt_sum_dim_out+0x247 ({LIB})
\t           aeda0 [unknown] ({LIB})
\t          9c6327 executorch::runtime::Method::execute_instruction+0x1b7 ({LIB})
\t          9c6bdb executorch::runtime::Method::execute+0xfb ({LIB})

python  4242 100.000300000:    3344 cpu-clock:ppp:
\t            3010 [unknown] ({LIB})

python  4242 100.000400000:    3344 cpu-clock:ppp:
\t          1a7331 cfunction_vectorcall_FASTCALL_KEYWORDS+0x51 (/usr/lib/libpython3.11.so.1.0)

python  4243 100.000500000:    3344 cpu-clock:ppp:
\t            2010 [unknown] ({LIB})
\t         7feefbc pthreadpool_parallelize_1d+0xac (/venv/torch/lib/libtorch_cpu.so)
\t          14e9ae xnn_invoke_runtime+0x6e ({LIB})
"""


def test_samples_are_read_with_their_thread_time_and_frames(profile: ModuleType) -> None:
    samples = profile.read_samples(PERF_SCRIPT)
    assert [(tid, nanos) for tid, nanos, _ in samples] == [
        (4242, 100_000_100_000),
        (4242, 100_000_200_000),
        (4242, 100_000_300_000),
        (4242, 100_000_400_000),
        (4243, 100_000_500_000),
    ]
    leaf = samples[0][2][0]
    assert leaf == (0x152AD9, "__memcpy_avx_unaligned_erms", "libc.so.6")


def test_each_sample_lands_in_the_bucket_of_what_ran(profile: ModuleType) -> None:
    ranges = profile.FunctionRanges(FRAMES_DUMP)
    buckets = [profile.bucket(frames, ranges) for _, _, frames in profile.read_samples(PERF_SCRIPT)]
    assert buckets == [
        # the threadpool's callee names the operator, not the memcpy it called
        ("xnnpack", "1000"),
        ("portable", "opt_sum_dim"),
        # no unwind entry, no stack: the code's gap in the unwind tables
        ("xnnpack", "after 2080"),
        ("outside", ""),
        ("xnnpack", "2000"),
    ]


def test_functions_take_the_name_of_the_probe_where_they_weigh_most(profile: ModuleType) -> None:
    names = profile.name_functions(
        {
            "slice": Counter({"copy": 40, "mul": 57, "stray": 3}),
            "elementwise arithmetic": Counter({"mul": 100}),
            "concatenate": Counter({"copy": 42, "concat": 58}),
            "matrix multiply#wide": Counter({"gemm": 100}),
            "matrix multiply#narrow": Counter({"gemm": 95, "gemv": 5}),
        }
    )
    assert names == {
        # 57% of the slice probe, 100% of the arithmetic one
        "mul": "elementwise arithmetic",
        # a function two operators share within 10% carries both names
        "copy": "concatenate/slice",
        "concat": "concatenate",
        # probes of one operator ("#" and what follows told them apart) give one name
        "gemm": "matrix multiply",
        "gemv": "matrix multiply",
        # "stray" (3% of one probe, under MIN_PROBE_SHARE) stays unnamed
    }


def test_a_row_reports_the_shares_of_its_own_thread_and_time_window(profile: ModuleType) -> None:
    spec = {
        "pid": 4242,
        "segments": [
            {"probe": "slice", "start": 100_000_050_000, "end": 100_000_150_000},
            {
                "row": "conv:c:64",
                "start": 100_000_150_001,
                "end": 100_000_600_000,
                "executorch_ms": 90.0,
                "eager_ms": 45.0,
            },
        ],
    }
    report, probes = profile.attribute(spec, PERF_SCRIPT, profile.FunctionRanges(FRAMES_DUMP))
    assert probes == {"slice": {"1000": 1.0}}  # the probe's one sample
    row = report["conv:c:64"]
    assert row["over_eager"] == 2.0
    assert row["samples"] == 3  # the other thread's sample is not the step's
    assert row["shares"] == {
        "portable opt_sum_dim": 0.333,
        "XNNPACK unidentified": 0.333,
        "outside the program": 0.333,
    }
    assert row["unidentified_functions"] == {"after 2080": 0.333}
