"""The vectors shared with the JS tests (web/test/) are what their generator writes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load

from heterofl_edge.data.idx import normalise

VECTORS = Path(__file__).parent / "vectors"


def _generator():
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_json_vectors_are_what_the_generator_writes():
    for path, text in _generator().json_files().items():
        assert path.read_text() == text, f"{path}: run tests/vectors/make_vectors.py --write"


def test_safetensors_files_hold_the_generators_tensors():
    make = _generator()
    for name, (tensors, metadata) in make.safetensors_cases().items():
        raw = (VECTORS / "safetensors" / f"{name}.safetensors").read_bytes()
        assert make._same(load(raw), tensors), name
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert header.get("__metadata__") == metadata


def test_normalise_vectors_pin_the_float32_bits():
    bits = json.loads((VECTORS / "normalise.json").read_text())["bits"]
    assert normalise(np.arange(256, dtype=np.uint8)).view(np.uint32).tolist() == bits


def test_the_standardise_vectors_hold_mnists_normalisation():
    cases = json.loads((VECTORS / "standardise.json").read_text())["cases"]
    mnist = next(c for c in cases if c["normalise"]["std"] == [float(np.float32(0.3081))])
    expected = normalise(np.arange(256, dtype=np.uint8)).view(np.uint32).tolist()
    assert mnist["bits"] == [expected]
