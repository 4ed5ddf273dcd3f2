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


@pytest.fixture
def clock():
    from coordinator_helpers import FakeClock

    return FakeClock()


@pytest.fixture
def make_app(tmp_path, clock):
    """Build coordinator apps on a fake clock (closed at the end of the test)."""
    from coordinator_helpers import make_config

    from coordinator.app import create_app

    apps = []

    def factory(config=None, start=True, **overrides):
        app = create_app(config or make_config(tmp_path / "state", **overrides), clock, start)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["heterofl"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def coordinator(app):
    return app.extensions["heterofl"]


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory, worker_id):
    """Export each level once per test run; copy it into a coordinator's state folder.

    ``provide(state_dir, levels, global_rate, formats)`` puts the exported
    programs where ``coordinator serve`` looks first, so that several tests
    do not export the same level again (unverified: tests/test_exporter.py
    verifies). Parallel workers (xdist) share one cache folder, each export
    under a file lock. ``HETEROFL_ARTIFACT_CACHE``
    keeps the cache in a folder of your choice across runs (delete it after changing the
    exporter).
    """
    import shutil

    from filelock import FileLock

    from exporter.config import ExportConfig, Format
    from exporter.pipeline import export_level, level_folder_name
    from heterofl_edge.levels import parse_rate

    base = tmp_path_factory.getbasetemp()
    configured = os.environ.get("HETEROFL_ARTIFACT_CACHE")  # kept across runs, e.g. repeat runs
    root = Path(configured) if configured else (base.parent if worker_id != "master" else base)
    root = root / "artifact-cache"
    root.mkdir(parents=True, exist_ok=True)

    def provide(state_dir, levels, global_rate=1.0, formats=("onnx",), model="conv"):
        for level in levels:
            rate = parse_rate(level)
            key = root / f"{model}-{level}-{global_rate:g}-{'+'.join(formats)}"
            folder = level_folder_name(model, rate)
            with FileLock(str(key) + ".lock"):
                if not (key / folder / "manifest.json").exists():
                    export_level(
                        ExportConfig(
                            model=model,
                            rate=rate,
                            global_rate=global_rate,
                            formats=tuple(Format(f) for f in formats),
                            # Verification against eager PyTorch is the exporter tests' job
                            # (tests/test_exporter.py); here it would only double the cost.
                            verify=False,
                        ),
                        key,
                    )
            shutil.copytree(key / folder, state_dir / "artifacts" / folder, dirs_exist_ok=True)

    return provide


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
