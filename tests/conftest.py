import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files: $HETEROFL_DATA_DIR, else ../shared/datasets/mnist beside the repo.

    Missing data skips the test on a developer's machine but fails under CI.
    """
    configured = os.environ.get("HETEROFL_DATA_DIR")
    path = Path(configured) if configured else REPO.parent / "shared" / "datasets" / "mnist"
    if not (path / "train-images-idx3-ubyte.gz").exists():
        message = f"MNIST not found at {path}: set HETEROFL_DATA_DIR"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from heterofl_edge.data import load_mnist

    return load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def wikitext2_dir() -> Path:
    """WikiText-2: $HETEROFL_WIKITEXT2_DIR, else ../shared/datasets/wikitext2 beside the repo."""
    configured = os.environ.get("HETEROFL_WIKITEXT2_DIR")
    path = Path(configured) if configured else REPO.parent / "shared" / "datasets" / "wikitext2"
    if not (path / "train.txt").exists():
        message = f"WikiText-2 not found at {path}: set HETEROFL_WIKITEXT2_DIR"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def wikitext2(wikitext2_dir):
    from heterofl_edge.data import load_wikitext2

    return load_wikitext2(wikitext2_dir)
