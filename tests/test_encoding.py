"""Transport encodings (heterofl_edge/encoding.py): bounds, unbiased rounding, refusals, plans."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from heterofl_edge.batching import SplitMix64
from heterofl_edge.cli.spec_options import spec_settings
from heterofl_edge.encoding import (
    Encoding,
    EncodingError,
    EncodingPlan,
    LevelEncodings,
    TransferLog,
    UpdateEncoder,
    apply_update,
    decode_payload,
    encode_payload,
    encode_tensors,
    make_update,
    parse_scales,
    rows_of,
)
from heterofl_edge.errors import ConfigError
from heterofl_edge.slicing import Submodel
from heterofl_edge.spec import FederationSpec

VECTORS = json.loads((Path(__file__).parent / "vectors" / "encoding.json").read_text())


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.1, (16, 4, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 1, 16).astype(np.float32),
        "linear.weight": (rng.normal(0, 1, (10, 32)) * np.logspace(-6, 2, 32)).astype(np.float32),
        "scalar": np.array(3.5, np.float32),
        "zeros": np.zeros((3, 5), np.float32),
    }


# -- decode(encode(x)) within each encoding's bound ---------------------------------------------
def test_fp32_is_exact_and_says_nothing_about_its_encoding():
    x = tensors()
    decoded = decode_payload(encode_payload(x, Encoding.fp32, metadata={"round": "1"}))
    assert decoded.encoding is Encoding.fp32 and decoded.metadata == {"round": "1"}
    assert all(np.array_equal(decoded.arrays[n], x[n]) for n in x)


@pytest.mark.parametrize(
    ("encoding", "relative"), [(Encoding.fp16, 2**-11), (Encoding.bf16, 2**-8)]
)
def test_half_precisions_round_to_nearest_within_half_an_ulp(encoding, relative):
    x = tensors()
    x.pop("linear.weight")  # fp16 flushes 1e-6 to subnormals: checked with its own bound below
    decoded = decode_payload(encode_payload(x, encoding)).arrays
    for name, values in x.items():
        assert np.all(np.abs(decoded[name] - values) <= np.abs(values) * relative), name
    tiny = {"t": np.array([1e-7, -3e-6, 6e-8], np.float32)}
    error = np.abs(decode_payload(encode_payload(tiny, Encoding.fp16)).arrays["t"] - tiny["t"])
    assert np.all(error <= 2**-25)  # half of fp16's smallest subnormal step


def test_int8_decodes_within_one_step_of_its_row_and_takes_a_quarter_of_the_bytes():
    x = tensors()
    x["big"] = np.random.default_rng(1).normal(0, 1, (256, 512)).astype(np.float32)
    encoded, scales = encode_tensors(x, Encoding.int8, seed=5)
    decoded = decode_payload(encode_payload(x, Encoding.int8, seed=5)).arrays
    for name, values in x.items():
        rows = rows_of(values.shape)
        assert scales[name].shape == (rows,) and (scales[name] > 0).all()
        peak = np.abs(values.reshape(rows, -1)).max(axis=1) if values.size else np.zeros(rows)
        nonzero = peak > 0
        assert np.allclose(scales[name][nonzero], peak[nonzero] / 127, rtol=2**-23)
        step = (
            scales[name].reshape((rows,) + (1,) * (values.ndim - 1))
            if values.ndim
            else scales[name][0]
        )
        assert np.all(np.abs(decoded[name] - values) < step * (1 + 2**-20)), name
        assert np.abs(encoded[name][1]).max(initial=0) <= 127
    assert np.array_equal(decoded["zeros"], x["zeros"])
    big = {"big": x["big"]}
    ratio = len(encode_payload(big, Encoding.int8)) / len(encode_payload(big, Encoding.fp32))
    # One byte a value, and per row of 512 one float32 scale in base64 (5.3 bytes): 0.2526.
    assert 0.25 < ratio < 0.2530


def test_int8_stochastic_rounding_is_unbiased_over_many_seeds():
    x = np.linspace(-0.3, 0.6, 300, dtype=np.float32)
    x[0] = 1.0  # the peak: a step of 1/127, and every other value between two steps
    draws = 3000
    total = np.zeros(x.shape)
    for seed in range(draws):
        total += decode_payload(encode_payload({"x": x}, Encoding.int8, seed)).arrays["x"]
    step = np.float32(1.0) / np.float32(127)
    error = total / draws - x
    # One draw's error is within one step (variance <= step**2 / 4): 5 standard errors.
    assert np.abs(error).max() < 5 * step / (2 * np.sqrt(draws))
    assert abs(error.mean()) < 5 * step / (2 * np.sqrt(draws * x.size))
    nearest = np.round(x / step) * step  # round-to-nearest would be biased by up to step / 2
    assert np.abs(nearest - x).max() > 10 * np.abs(error).max()


def test_int8_is_reproducible_from_its_seed_and_differs_between_seeds():
    x = tensors()
    same = [encode_tensors(x, Encoding.int8, 9)[0]["conv.weight"][1] for _ in range(2)]
    other = encode_tensors(x, Encoding.int8, 10)[0]["conv.weight"][1]
    assert np.array_equal(same[0], same[1]) and not np.array_equal(same[0], other)


def test_lossy_encodings_refuse_values_they_cannot_carry():
    with pytest.raises(EncodingError) as nan:
        encode_tensors({"x": np.array([1.0, np.nan], np.float32)}, Encoding.int8)
    assert nan.value.code == "not_finite"
    with pytest.raises(EncodingError, match="fp16's range"):
        encode_tensors({"x": np.array([70000.0], np.float32)}, Encoding.fp16)
    with pytest.raises(EncodingError, match="bf16's range"):
        encode_tensors({"x": np.array([3.4028235e38], np.float32)}, Encoding.bf16)
    fp32, _ = encode_tensors({"x": np.array([np.inf], np.float32)}, Encoding.fp32)
    assert np.isinf(fp32["x"][1]).all()  # fp32 is sent as it is; the coordinator refuses it


# -- the specification the browser shares ------------------------------------------------------
def test_the_uniforms_are_splitmix64_draws_and_the_vectors_are_numpys():
    for case in VECTORS["uniforms"]:
        rng = SplitMix64(case["seed"])
        assert case["values"] == [(rng.next64() >> 11) * 2.0**-53 for _ in case["values"]]
    half = np.array(VECTORS["fp16"]["float32"], np.uint32).view(np.float32)
    assert half.astype(np.float16).view(np.uint16).tolist() == VECTORS["fp16"]["half"]


def test_bf16_rounds_to_nearest_even_as_ml_dtypes_does():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.array(VECTORS["bf16"]["float32"], np.uint32).view(np.float32)
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16).tolist()
    assert VECTORS["bf16"]["bf16"] == expected
    mine, _ = encode_tensors({"x": values}, Encoding.bf16)
    assert mine["x"][1].tolist() == expected


# -- payloads that must be refused ---------------------------------------------------------------
def scales_of(values: list[float]) -> str:
    return base64.b64encode(np.array(values, "<f4").tobytes()).decode()


@pytest.mark.parametrize(
    "entry",
    [
        scales_of([np.nan, 1.0]),
        scales_of([0.0, 1.0]),
        scales_of([1.0, -0.5]),
        scales_of([1.0, np.inf]),
        scales_of([1.0]),  # one scale for two rows
        scales_of([1.0, 1.0, 1.0]),
        "not base64!",
        7,
    ],
)
def test_scales_that_are_not_one_finite_positive_float_per_row_are_refused(entry):
    with pytest.raises(EncodingError) as refused:
        parse_scales({"scales": json.dumps({"w": entry})}, {"w": (2, 3)})
    assert refused.value.code == "bad_scales"


def test_an_int8_payload_without_its_scales_or_of_another_dtype_is_refused():
    x = {"w": np.ones((2, 3), np.float32)}
    body = encode_payload(x, Encoding.int8)
    header = json.loads(body[8 : 8 + int.from_bytes(body[:8], "little")])
    metadata = header["__metadata__"]
    for missing in ({"encoding": metadata["encoding"]}, {**metadata, "scales": "{}"}):
        with pytest.raises(EncodingError) as refused:
            parse_scales(missing, {"w": (2, 3)})
        assert refused.value.code == "bad_scales"
    relabelled = encode_payload(x, Encoding.fp32, metadata=metadata)  # says int8, holds float32
    with pytest.raises(EncodingError) as wrong:
        decode_payload(relabelled)
    assert wrong.value.code == "bad_dtype"


# -- updates and error feedback ------------------------------------------------------------------
def test_an_update_added_back_gives_the_trained_weights_within_the_encodings_bound():
    received = tensors(1)
    trained = {
        n: (v + np.float32(0.01) * np.sign(v)).astype(np.float32) for n, v in received.items()
    }
    update = make_update(trained, received)
    for encoding in (Encoding.fp16, Encoding.bf16, Encoding.int8):
        body = UpdateEncoder().encode(trained, received, encoding, 3, "a", False, {})
        weights = apply_update(received, decode_payload(body).arrays)
        for name in trained:
            bound = np.abs(update[name]).max() * (2**-7 if encoding is Encoding.int8 else 2**-8)
            assert np.abs(weights[name] - trained[name]).max() <= bound + 1e-6, (encoding, name)
    fp32 = UpdateEncoder().encode(trained, received, Encoding.fp32, 0, "a", True, {"k": "v"})
    decoded = decode_payload(fp32)
    assert decoded.metadata == {"k": "v"}  # fp32: the trained weights themselves
    assert all(np.array_equal(decoded.arrays[n], trained[n]) for n in trained)


def test_error_feedback_keeps_the_sum_of_what_was_sent_within_one_step_of_the_truth():
    rng = np.random.default_rng(2)
    weights = {"w": rng.normal(0, 1, (8, 64)).astype(np.float32)}
    with_feedback, without = UpdateEncoder(), UpdateEncoder()
    true_sum = np.zeros((8, 64))
    sent = {True: np.zeros((8, 64)), False: np.zeros((8, 64))}
    for session in range(40):
        # A biased update (a constant drift) that int8 rounds coarsely: 1/127 of each row's peak.
        step = np.full((8, 64), 1e-3, np.float32)
        step[:, 0] = 0.127  # the peak: one step is 1e-3, the drift is exactly one step
        step[:, 1:] = 3e-4
        trained = {"w": (weights["w"] + step).astype(np.float32)}
        true_sum += make_update(trained, weights)["w"]
        for feedback, encoder in ((True, with_feedback), (False, without)):
            body = encoder.encode(trained, weights, Encoding.int8, session, "e", feedback, {})
            sent[feedback] += decode_payload(body).arrays["w"]
    one_step = 0.127 / 127 * 1.001
    # The residual is what was not sent yet: sent + residual == truth, and it stays under a step.
    assert np.allclose(sent[True] + with_feedback.residual["w"], true_sum, atol=1e-5)
    assert np.abs(with_feedback.residual["w"]).max() <= one_step
    assert np.abs(sent[True] - true_sum).max() <= one_step + 1e-5
    assert without.residual == {}  # nothing is kept without error feedback


def test_the_residual_is_dropped_when_the_level_changes_or_an_upload_is_lost():
    received = {"w": np.zeros((2, 4), np.float32)}
    trained = {"w": np.array([[1.0, 0.3, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]], np.float32)}
    encoder = UpdateEncoder()
    encoder.encode(trained, received, Encoding.int8, 1, "e", True, {})
    assert encoder.level == "e" and np.abs(encoder.residual["w"]).max() > 0
    first = decode_payload(encoder.encode(trained, received, Encoding.int8, 2, "d", True, {}))
    fresh = decode_payload(
        UpdateEncoder().encode(trained, received, Encoding.int8, 2, "d", True, {})
    )
    assert np.array_equal(first.arrays["w"], fresh.arrays["w"])  # level d starts afresh
    encoder.forget()
    assert encoder.level is None and encoder.residual == {}


# -- which encoding where -------------------------------------------------------------------------
def test_level_encodings_read_as_a_flag_and_say_what_each_level_gets():
    plan = LevelEncodings.parse("FP32, d=int8,e=int8")
    assert str(plan) == "fp32,d=int8,e=int8"
    assert [plan.for_rate(r) for r in (1.0, 0.25, 0.125, 0.0625)] == [
        Encoding.fp32,
        Encoding.fp32,
        Encoding.int8,
        Encoding.int8,
    ]
    assert LevelEncodings.parse("bf16,0.0625=fp16").for_rate(0.0625) is Encoding.fp16
    for bad, problem in [
        ("", "must start with the default"),
        ("e=int8", "must start with the default"),
        ("fp8", "unknown encoding 'fp8'"),
        ("fp32,d", "is not LEVEL=ENCODING"),
        ("fp32,d=int8,d=fp16", "level d is given twice"),
        ("fp32,z=int8", "unknown level 'z'"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            LevelEncodings.parse(bad)


def test_a_device_never_gets_an_encoding_it_did_not_declare():
    plan = EncodingPlan(LevelEncodings.parse("fp16"), LevelEncodings.parse("fp32,e=int8"))
    assert plan.choose(0.0625, ["fp16", "int8"]) == (Encoding.fp16, Encoding.int8, None)
    down, up, note = plan.choose(0.0625, None)  # an older device: fp32 only
    assert (down, up) == (Encoding.fp32, Encoding.fp32)
    assert note is not None and "download fp16 and upload int8 at level e" in note
    assert plan.choose(1.0, ["fp16"]) == (Encoding.fp16, Encoding.fp32, None)


def test_the_spec_takes_encodings_as_flags_or_toml_and_refuses_what_cannot_run(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        '[federation]\nmode = "a-e"\nupload-encoding = "FP32,e=int8"\nerror_feedback = true\n'
    )
    spec = FederationSpec(**spec_settings(config, download_encoding="bf16"))
    assert (spec.download_encoding, spec.upload_encoding, spec.error_feedback) == (
        "bf16",
        "fp32,e=int8",
        True,
    )
    assert spec.encodings.upload.for_rate(0.0625) is Encoding.int8
    assert spec.to_json()["upload_encoding"] == "fp32,e=int8"
    with pytest.raises(ConfigError, match=r"names levels \['d'\] that are not in the mode"):
        FederationSpec(mode="a-e", upload_encoding="fp32,d=int8")
    with pytest.raises(ConfigError, match="rolling sub-models"):
        FederationSpec(error_feedback=True, submodel=Submodel.rolling)
    with pytest.raises(ConfigError, match="must be true or false"):
        FederationSpec(**spec_settings(None, error_feedback="yes"))


def test_the_transfer_log_counts_bytes_by_round_direction_encoding_and_device():
    log = TransferLog()
    log.add(1, "down", "train", "fp16", 100, "x")
    log.add(1, "down", "train", "fp16", 100, "y")
    log.add(1, "up", "train", "int8", 30, "x")
    log.add(1, "down", "statistics", "fp32", 400, "x")
    entry = log.round(1)
    assert entry["down"] == {
        "train": {"fp16": {"bytes": 200, "payloads": 2}},
        "statistics": {"fp32": {"bytes": 400, "payloads": 1}},
    }
    assert entry["devices"] == {"x": {"down": 500, "up": 30}, "y": {"down": 100, "up": 0}}
    again = TransferLog()
    again.load(log.to_json())
    assert again.to_json() == log.to_json()
