"""Operating a fleet: Prometheus metrics, the live page's files, JSON logs."""

from __future__ import annotations

import json

from coordinator_helpers import auth, constant_update, register, upload
from prometheus_client.parser import text_string_to_metric_families


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(reply.data.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_accepted_and_refused_uploads(client, coordinator):
    tokens = register(client)
    coordinator.settle()
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 200
    assert upload(client, tokens[0], 1, constant_update(1.0, 1)).status_code == 409
    assert upload(client, tokens[1], 1, constant_update(1.0, 1)).status_code == 422
    samples = scrape(client)
    uploads = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "heterofl_uploads_total"
    }
    assert uploads[(("code", "accepted"), ("kind", "update"))] == 1
    assert uploads[(("code", "duplicate_upload"), ("kind", "update"))] == 1
    assert uploads[(("code", "bad_shape"), ("kind", "update"))] == 1
    devices = [value for (name, _), value in samples.items() if name == "heterofl_devices"]
    assert sum(devices) == 3
    latency = [
        dict(labels)
        for (name, labels), _ in samples.items()
        if name == "heterofl_request_seconds_count"
    ]
    assert {"endpoint": "rounds.update", "method": "POST"} in latency
    assert samples[("heterofl_bytes_total", (("direction", "in"),))] > 0


def test_the_live_page_and_its_files_are_served_by_the_coordinator(client):
    with client.get("/") as page:
        assert page.status_code == 200 and b'src="/static/dashboard/dashboard.js"' in page.data
    with client.get("/static/dashboard/dashboard.js") as script:
        assert script.status_code == 200 and b"/v1/rounds" in script.data
    with client.get("/static/dashboard/dashboard.css") as style:
        assert style.status_code == 200 and style.mimetype == "text/css"
    for missing in ("/static/dashboard/../app.py", "/static/nowhere/x.js"):
        reply = client.get(missing)
        assert reply.status_code == 404 and json.loads(reply.data)["code"] == "not_found"


def test_request_ids_are_echoed_and_logged(client, coordinator, caplog):
    import logging

    tokens = register(client)
    caplog.set_level(logging.INFO, logger="heterofl_edge.coordinator.access")
    reply = client.get("/v1/task", headers={**auth(tokens[0]), "X-Request-ID": "probe-42"})
    assert reply.headers["X-Request-ID"] == "probe-42"
    records = [r for r in caplog.records if r.name == "heterofl_edge.coordinator.access"]
    assert records and records[-1].status == 200 and records[-1].path == "/v1/task"
    hostile = client.get("/v1/health", headers={"X-Request-ID": "x" * 500 + ";drop"})
    assert len(hostile.headers["X-Request-ID"]) == 16  # replaced, not echoed
