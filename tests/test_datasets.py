"""The data registry: WikiText-2 as the paper's code reads it, image folders, user loaders."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from heterofl_edge.data import (
    ClassificationData,
    get_dataset,
    list_datasets,
    load_image_folder,
    load_wikitext2,
)
from heterofl_edge.data.wikitext2 import check_wikitext2_files
from heterofl_edge.errors import ConfigError, DataError
from heterofl_edge.models import get_architecture
from heterofl_edge.models.transformer import TRANSFORMER_DEFAULTS
from heterofl_edge.partition import Split
from heterofl_edge.tasks import check_compatible, task_for


def test_builtin_data_sets_are_listed():
    assert list_datasets()[:3] == ["mnist", "wikitext2", "imagefolder"]


def test_real_wikitext2_gives_the_official_vocabulary_and_rows_of_64(wikitext2_dir, wikitext2):
    # README of the data: 2,088,628 / 217,646 / 245,569 tokens, 33,278 types, plus <ukn>.
    assert wikitext2.num_classes == 33279 == TRANSFORMER_DEFAULTS["num_tokens"]
    assert wikitext2.vocabulary[:4] == ("<ukn>", "<eos>", "=", "Valkyria")
    assert wikitext2.sequence_length == 64
    assert len(wikitext2.train_tokens) == 2_088_628 // 64
    assert len(wikitext2.valid_tokens) == 217_646 // 64
    assert len(wikitext2.test_tokens) == 245_569 // 64
    eos = wikitext2.vocabulary.index("<eos>")
    assert wikitext2.train_tokens[0, 0] == eos  # the file opens with an empty line
    assert check_wikitext2_files(wikitext2_dir) == {
        f"{s}.txt": "ok" for s in ("train", "valid", "test")
    }
    check_compatible(get_architecture("transformer"), wikitext2)


def test_tokenisation_follows_the_official_code(tmp_path):
    (tmp_path / "train.txt").write_text(" = A b = \n\nc  A\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("b d\n", encoding="utf-8")
    (tmp_path / "wiki.test.tokens").write_text("e", encoding="utf-8")  # the archive's name
    data = load_wikitext2(tmp_path, sequence_length=3)
    assert data.vocabulary == ("<ukn>", "<eos>", "=", "A", "b", "c", "d", "e")
    # train: = A b = <eos> <eos> c A <eos>  -> 9 tokens, three rows of 3
    assert data.train_tokens.tolist() == [[2, 3, 4], [2, 1, 1], [5, 3, 1]]
    assert data.valid_tokens.tolist() == [[4, 6, 1]]
    assert data.test_tokens.shape == (0, 3)  # "e <eos>" is shorter than a row
    report = check_wikitext2_files(tmp_path)
    assert report["train.txt"].startswith("md5 ") and report["wiki.test.tokens"].startswith("md5 ")


def test_missing_wikitext2_says_what_to_provide(tmp_path):
    with pytest.raises(DataError) as info:
        get_dataset("wikitext2", tmp_path)
    assert "train.txt not found" in info.value.message and "data check" in info.value.hint


@pytest.fixture(scope="module")
def mnist_images(tmp_path_factory, mnist):
    """MNIST written out as 32x32 RGB images: 3 per class for training (PNG), 2 for test (JPEG)."""
    root = tmp_path_factory.mktemp("mnist-images")
    for split, images, labels, per_class, suffix in (
        ("train", mnist.train_images, mnist.train_labels, 3, "png"),
        ("test", mnist.test_images, mnist.test_labels, 2, "jpg"),
    ):
        for digit in range(10):
            folder = root / split / str(digit)
            folder.mkdir(parents=True)
            for i in torch.nonzero(labels == digit).flatten()[:per_class].tolist():
                pixels = ((images[i, 0] * 0.3081 + 0.1307) * 255).round().clamp(0, 255)
                grey = Image.fromarray(pixels.numpy().astype(np.uint8))
                grey.resize((32, 32), Image.Resampling.BILINEAR).convert("RGB").save(
                    folder / f"{i}.{suffix}"
                )
    return root


def test_an_image_folder_is_read_resized_and_standardised(mnist_images):
    data = get_dataset("imagefolder", mnist_images)
    assert isinstance(data, ClassificationData)
    assert data.train_x.shape == (30, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    assert data.classes == tuple(str(d) for d in range(10))
    assert data.train_y.tolist() == [d for d in range(10) for _ in range(3)]
    per_channel = data.train_x.transpose(0, 1).reshape(3, -1)
    assert per_channel.mean(dim=1).abs().max() < 1e-5
    assert (per_channel.std(dim=1) - 1).abs().max() < 1e-3
    check_compatible(get_architecture("resnet18"), data)
    # The conv model's input: one channel at 28x28.
    grey = get_dataset("imagefolder", mnist_images, size=28, channels=1)
    assert grey.train_x.shape == (30, 1, 28, 28)
    check_compatible(get_architecture("conv"), grey)
    with pytest.raises(ConfigError, match=r"takes inputs \(1, 28, 28\)"):
        check_compatible(get_architecture("conv"), data)


def test_an_image_folder_splits_iid_and_non_iid(mnist_images):
    data = load_image_folder(mnist_images)
    task = task_for(get_architecture("resnet18"))
    non_iid = task.split(data, num_clients=5, split=Split.non_iid, seed=0)
    assert all(1 <= len(labels) <= 2 for labels in non_iid.train.labels)
    held = np.concatenate(non_iid.train.indices)
    assert len(set(held.tolist())) == len(held)
    iid = task.split(data, num_clients=5, split=Split.iid, seed=0)
    assert [len(i) for i in iid.train.indices] == [6] * 5


def test_unreadable_images_and_layouts_are_named(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.png").write_bytes(b"not a png")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "cat" / "b.png")
    with pytest.raises(DataError, match=r"cannot read image .*a\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path / "empty")


def loader_with_options(data_dir, scale=1.0):
    """Four examples of two features."""
    x = torch.arange(8, dtype=torch.float32).reshape(4, 2) * scale
    return ClassificationData(x, torch.tensor([0, 1, 0, 1]), x, torch.tensor([1, 0, 1, 0]), 2)


def broken_loader(data_dir):
    return ClassificationData(
        torch.zeros(3, 2), torch.tensor([0, 1, 5]), torch.zeros(1, 2), torch.tensor([0]), 2
    )


def test_a_loader_reference_is_called_and_its_data_checked(monkeypatch):
    monkeypatch.setitem(sys.modules, "user_data", sys.modules[__name__])
    data = get_dataset("user_data:loader_with_options", None, scale=2.0)
    assert float(data.train_x.max()) == 14.0
    with pytest.raises(DataError, match=r"labels lie outside 0\.\.1"):
        get_dataset("user_data:broken_loader", None)
    with pytest.raises(ConfigError, match="unknown data set 'cifar10'") as info:
        get_dataset("cifar10", None)
    assert "mnist, wikitext2, imagefolder" in info.value.hint


def test_exported_arrays_round_trip_and_bad_files_are_refused(tmp_path):
    from safetensors.numpy import save_file

    from heterofl_edge.data.arrays import ARRAYS_FILE, read_training_arrays, write_training_arrays

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    y = np.array([0, 1, 2, 0, 1, 2], np.int64)
    write_training_arrays(tmp_path / "ok", x, y, 3, "test")
    got_x, got_y, classes = read_training_arrays(tmp_path / "ok")
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y) and classes == 3
    assert not list((tmp_path / "ok").glob("*.partial"))

    cases = iter(range(100))

    def refused(tensors, metadata, needle):
        folder = tmp_path / f"case-{next(cases)}"
        folder.mkdir()
        save_file(tensors, str(folder / ARRAYS_FILE), metadata=metadata)
        with pytest.raises(DataError, match=needle):
            read_training_arrays(folder)

    refused({"x": x, "y": y}, {"num_classes": "2"}, "labels must lie in")
    refused({"x": x.astype(np.float64), "y": y}, {"num_classes": "3"}, "x must be float32")
    refused({"x": x, "y": y[:5]}, {"num_classes": "3"}, "x must be float32")
    refused({"x": x}, {"num_classes": "3"}, "exactly the arrays x and y")
    refused({"x": x, "y": y}, {"num_classes": "three"}, "must give num_classes")
    refused({"x": x, "y": y}, {"num_classes": "1e400"}, "must give num_classes")
    refused({"x": x, "y": y}, {}, "must give num_classes")
    refused({"x": np.array(1.0, np.float32), "y": y}, {"num_classes": "3"}, "x must be")
    refused({"x": x[:, 0].copy(), "y": y}, {"num_classes": "3"}, "x must be")
    nan = x.copy()
    nan[2, 1] = np.nan
    refused({"x": nan, "y": y}, {"num_classes": "3"}, "NaN or Inf")
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(DataError, match="cannot write"):
        write_training_arrays(tmp_path / "a-file", x, y, 3, "test")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / ARRAYS_FILE).write_bytes(b"\x80\x04pickle")
    with pytest.raises(DataError, match="cannot read"):
        read_training_arrays(tmp_path / "junk")
    with pytest.raises(DataError, match="does not exist"):
        read_training_arrays(tmp_path / "nowhere")
