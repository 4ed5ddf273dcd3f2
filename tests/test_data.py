import gzip
import shutil
import struct

import pytest
import torch

from heterofl_edge.data import load_mnist, read_idx
from heterofl_edge.errors import DataError

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_mnist_has_the_documented_class_counts(mnist):
    assert mnist.train_images.shape == (60000, 1, 28, 28)
    assert mnist.train_labels.bincount().tolist() == TRAIN_COUNTS
    assert mnist.test_labels.bincount().tolist() == TEST_COUNTS
    assert (
        abs(float(mnist.train_images.mean())) < 0.01
        and abs(float(mnist.train_images.std()) - 1) < 0.01
    )


def test_missing_directory_says_how_to_provide_the_files(tmp_path):
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "nowhere")
    assert "does not exist" in info.value.message
    assert "HETEROFL_DATA_DIR" in info.value.hint and "data check" in info.value.hint
    with pytest.raises(DataError, match="no MNIST directory"):
        load_mnist(None)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)


def write_idx(path, data: bytes, magic=(0, 0, 8, 3), dims=(2, 28, 28)):
    header = bytes(magic) + struct.pack(f">{len(dims)}I", *dims)
    with gzip.open(path, "wb") as handle:
        handle.write(header + data)


@pytest.mark.parametrize(
    ("magic", "payload", "message"),
    [
        ((0, 0, 9, 3), bytes(2 * 784), "bad magic"),
        ((0, 0, 8, 3), bytes(784), "header promises"),
    ],
)
def test_corrupt_idx_files_are_refused(tmp_path, magic, payload, message):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(path, payload, magic)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_damaged_gzip_is_refused(tmp_path, mnist_dir):
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        shutil.copy(mnist_dir / name, tmp_path / name)
    raw = (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="t10k-labels"):
        load_mnist(tmp_path)


def test_unpacked_files_are_read_too(tmp_path):
    images = bytes(range(256)) * 4 + bytes(2 * 784 - 1024)
    for stem, dims, magic, data in (
        ("train-images-idx3-ubyte", (2, 28, 28), (0, 0, 8, 3), images),
        ("train-labels-idx1-ubyte", (2,), (0, 0, 8, 1), bytes([3, 7])),
        ("t10k-images-idx3-ubyte", (2, 28, 28), (0, 0, 8, 3), images),
        ("t10k-labels-idx1-ubyte", (2,), (0, 0, 8, 1), bytes([1, 2])),
    ):
        header = bytes(magic) + struct.pack(f">{len(dims)}I", *dims)
        (tmp_path / stem).write_bytes(header + data)
    data = load_mnist(tmp_path)
    assert data.train_labels.tolist() == [3, 7]
    assert data.test_images.dtype == torch.float32
