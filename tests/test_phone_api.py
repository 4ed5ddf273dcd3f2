"""What the phone and the live page read from the coordinator, through Flask's test client.

Demo shards as uint8 pixels whose ``normalise`` metadata reproduces the loaders'
float32 bit for bit (MNIST and image folders), their size before download, the
cap and the cache; the device list a page at a time with each device's trained
level; the last evaluation in ``/v1/health``; the favicon.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from coordinator_helpers import assert_error, make_config, register
from safetensors import safe_open
from safetensors.numpy import load
from test_coordinator import report_statistics, train_round_with_known_updates

from coordinator.demo_data import DemoData, Normalise, ShardQuery
from coordinator.errors import ErrorCode
from heterofl_edge.data.idx import normalise as mnist_normalise
from heterofl_edge.data.idx import read_split
from heterofl_edge.partition import Split, train_shards


def metadata_of(payload: bytes, tmp_path) -> dict[str, str]:
    path = tmp_path / "shard.safetensors"
    path.write_bytes(payload)
    with safe_open(str(path), "np") as handle:
        return dict(handle.metadata())


def test_a_default_demo_shard_is_one_hundredth_of_mnist_in_uint8(make_app, mnist_dir, tmp_path):
    app = make_app(demo_data_dir=mnist_dir)
    client = app.test_client()
    info = client.get("/v1/demo-data/info")
    assert info.status_code == 200, info.json
    reply = client.get("/v1/demo-data")
    assert reply.status_code == 200
    shard = load(reply.data)
    assert shard["x"].dtype == np.uint8 and shard["x"].shape == (600, 1, 28, 28)
    assert shard["y"].dtype == np.int64 and shard["y"].shape == (600,)
    assert info.json == {
        "examples": 600,
        "bytes": len(reply.data),
        "shape": [600, 1, 28, 28],
        "dtype": "uint8",
        "shard": 0,
        "clients": 100,
        "split": "iid",
        "seed": 0,
        "source": "the mnist training set",
    }
    metadata = metadata_of(reply.data, tmp_path)
    assert json.loads(metadata["normalise"]) == {"scale": 255, "mean": [0.1307], "std": [0.3081]}
    assert metadata["shard"] == "0 of 100 (iid, seed 0)"

    # The device's formula on the pixels gives the float32 bits a Python device trains on.
    images, labels = read_split(mnist_dir, "train")
    keep, shards = train_shards(labels, 100, Split.iid, 10, 0)
    chosen = keep[shards.indices[0]]
    rule = json.loads(metadata["normalise"])
    device = Normalise(rule["scale"], tuple(rule["mean"]), tuple(rule["std"])).apply(shard["x"])
    assert device.dtype == np.float32
    assert np.array_equal(device.view(np.uint32), images[chosen].view(np.uint32))
    assert np.array_equal(shard["y"], labels[chosen])
    all_pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    assert np.array_equal(
        Normalise(255, (0.1307,), (0.3081,)).apply(all_pixels).view(np.uint32),
        mnist_normalise(all_pixels).view(np.uint32),
    )


def test_image_folder_shards_are_uint8_and_standardise_like_the_loader(tmp_path, mnist_dir):
    from image_helpers import write_mnist_as_images

    from heterofl_edge.data.image_arrays import read_image_folder
    from heterofl_edge.models import get_architecture

    write_mnist_as_images(mnist_dir, tmp_path / "digits", train=60, test=5)
    demo = DemoData(tmp_path / "digits", "imagefolder", get_architecture("resnet18"))
    assert demo.pixels is not None and demo.pixels.shape == (60, 3, 32, 32)
    assert demo.normalise is not None and len(demo.normalise.mean) == 3
    loaded = read_image_folder(tmp_path / "digits", test=False)
    device = demo.normalise.apply(demo.pixels)
    assert np.array_equal(device.view(np.uint32), loaded.train_x.view(np.uint32))
    assert np.array_equal(demo.labels, loaded.train_y)


def test_a_loader_the_formula_does_not_reproduce_is_served_as_float32(mnist_dir):
    demo = DemoData(mnist_dir)
    assert demo.pixels is not None and demo.normalise is not None
    images = demo.normalise.apply(demo.pixels[:100])
    other = DemoData.__new__(DemoData)
    other.pixels = other.images = other.normalise = None
    other._use_pixels(images + np.float32(1e-3), demo.pixels[:100], demo.normalise)
    assert other.pixels is None and other.normalise is None and other.images is not None


def test_demo_data_errors_are_clear_and_leave_nothing_half_done(make_app, mnist_dir, tmp_path):
    client = make_app(demo_data_dir=mnist_dir).test_client()
    for path in ("/v1/demo-data", "/v1/demo-data/info"):
        assert_error(client.get(f"{path}?shard=100"), 400, ErrorCode.invalid_request)
        assert_error(client.get(f"{path}?shard=3&clients=3"), 400, ErrorCode.invalid_request)
        too_large = client.get(f"{path}?clients=2")  # 30,000 examples a shard
        assert_error(too_large, 400, ErrorCode.demo_shard_too_large)
        assert "clients=6" in too_large.json["hint"]
        assert_error(client.get(f"{path}?clients=0"), 400, ErrorCode.invalid_request)
    fine = client.get("/v1/demo-data/info?clients=6")
    assert fine.status_code == 200 and fine.json["examples"] == 10_000
    bare = make_app(make_config(tmp_path / "bare")).test_client()
    for path in ("/v1/demo-data", "/v1/demo-data/info"):
        assert_error(bare.get(path), 404, ErrorCode.not_found)


def test_concurrent_requests_build_a_shard_once(mnist_dir, monkeypatch):
    import coordinator.demo_data as module

    demo = DemoData(mnist_dir)
    built = []
    real_save = module.save

    def counting_save(*args, **kwargs):
        built.append(1)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(module, "save", counting_save)
    start = threading.Barrier(8)
    payloads: list[bytes] = []

    def fetch() -> None:
        start.wait()
        payloads.append(demo.shard(ShardQuery(5)))

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(payloads) == 8 and len(set(payloads)) == 1
    assert len(built) == 1
    assert demo.info(ShardQuery(5))["bytes"] == len(payloads[0]) and len(built) == 1


def test_the_cache_is_bounded_in_bytes(mnist_dir):
    demo = DemoData(mnist_dir, cache_bytes=1_000_000)  # two default shards of 475 kB fit
    for shard in range(4):
        demo.shard(ShardQuery(shard))
    assert [q.shard for q in demo._cache] == [2, 3]


def test_the_device_list_comes_a_page_at_a_time(make_app):
    app = make_app(min_devices=5)
    client = app.test_client()
    tokens = register(client, 5)
    assert len(tokens) == 5
    everyone = client.get("/v1/devices").json
    assert (everyone["total"], everyone["offset"], everyone["limit"]) == (5, 0, 100)
    page = client.get("/v1/devices?offset=1&limit=2").json
    assert [d["position"] for d in page["devices"]] == [1, 2]
    assert page["devices"] == everyone["devices"][1:3]
    assert (page["total"], page["offset"], page["limit"]) == (5, 1, 2)
    assert client.get("/v1/devices?offset=5").json["devices"] == []
    for query in ("limit=0", "limit=501", "offset=-1", "limit=x"):
        assert_error(client.get(f"/v1/devices?{query}"), 400, ErrorCode.invalid_request)


def test_trained_level_and_the_last_evaluation(make_app):
    app = make_app(start=False)
    coordinator = app.extensions["heterofl"]
    coordinator.engine.evaluate = lambda state: {"global_accuracy": 0.75, "global_loss": 0.5}
    coordinator.start()
    client = app.test_client()
    tokens = register(client)
    coordinator.settle()
    assert client.get("/v1/health").json["evaluation"] is None
    before = client.get("/v1/devices").json["devices"]
    assert [d["trained_level"] for d in before] == [None, None, None]
    train_round_with_known_updates(client, tokens)
    coordinator.settle()
    report_statistics(client, tokens)
    coordinator.settle()
    health = client.get("/v1/health").json
    assert health["evaluation"] == {"round": 1, "global_accuracy": 0.75, "global_loss": 0.5}
    devices = client.get("/v1/devices").json["devices"]
    assert [d["trained_level"] for d in devices] == ["a", "c", "e"]


def test_the_favicon_is_served(client):
    with client.get("/favicon.ico") as reply:
        assert reply.status_code == 200
        assert reply.mimetype in ("image/vnd.microsoft.icon", "image/x-icon")
        assert reply.data[:4] == b"\x00\x00\x01\x00"  # an ICO file
    with client.get("/") as reply:
        page = reply.data.decode()
    assert '<link rel="icon" href="/favicon.ico"' in page


@pytest.mark.parametrize("pixel", [0, 1, 127, 255])
def test_normalise_metadata_round_trips_float32_statistics(pixel):
    mean = np.float32(0.4914)
    std = np.float32(0.2470)
    rule = json.loads(Normalise(255, (float(mean),), (float(std),)).to_json())
    assert np.float32(rule["mean"][0]) == mean and np.float32(rule["std"][0]) == std
    x = np.array([[[[pixel]]]], np.uint8)
    expected = (np.float32(pixel) / np.float32(255) - mean) / std
    assert Normalise(255, (rule["mean"][0],), (rule["std"][0],)).apply(x)[0, 0, 0, 0] == expected
