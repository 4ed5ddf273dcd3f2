"""The browser's protocol.js against the OpenAPI document the coordinator serves.

``web/protocol.js`` declares, per message, the fields the page reads and sends
(``MESSAGES``). Every declared field must exist in the served schema of that
name with a JSON type that fits; a field the page must read (not ``?``) must be
required there; the task kinds must be the document's discriminator mapping.
So a field renamed in ``heterofl_edge/protocol.py`` or in ``protocol.js`` fails
here.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from coordinator_helpers import make_config

from coordinator.app import create_app

WEB = Path(__file__).resolve().parents[1] / "web"


def declared_messages() -> dict:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    script = (
        "import('./protocol.js').then(m => "
        "process.stdout.write(JSON.stringify({messages: m.MESSAGES, tasks: m.TASKS})))"
    )
    out = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    app = create_app(make_config(tmp_path_factory.mktemp("state")), start=False)
    try:
        yield app.test_client().get("/v1/openapi.json").json
    finally:
        app.extensions["heterofl"].close()


def json_types(schema: dict, components: dict) -> set[str]:
    """The JSON types a property's schema allows (following $ref, anyOf, enums)."""
    if "$ref" in schema:
        return json_types(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "anyOf" in schema or "oneOf" in schema:
        return set().union(
            *(json_types(s, components) for s in schema.get("anyOf", schema.get("oneOf")))
        )
    if "const" in schema or ("enum" in schema and "type" not in schema):
        return {"string"}
    kind = schema.get("type")
    if kind is None:
        return {"object", "array", "string", "number", "integer", "boolean", "null"}
    return set(kind) if isinstance(kind, list) else {kind}


def fits(declared: str, allowed: set[str]) -> bool:
    kind = declared.rstrip("?")
    if kind == "number":
        return bool({"number", "integer"} & allowed)
    if kind == "integer":
        return "integer" in allowed
    return kind in allowed


def problems_of(declared: dict, document: dict) -> list[str]:
    """Every way the page's declared messages and the document disagree, one line each."""
    components = document["components"]["schemas"]
    problems = []
    for name, message in declared["messages"].items():
        schema = components.get(name)
        if schema is None:
            problems.append(f"{name}: no such schema in /v1/openapi.json")
            continue
        properties, required = schema.get("properties", {}), set(schema.get("required", []))
        for direction in ("reads", "sends"):
            for field, kind in message.get(direction, {}).items():
                if field not in properties:
                    problems.append(f"{name}.{field}: not in the served schema")
                    continue
                allowed = json_types(properties[field], components)
                if not fits(kind, allowed):
                    problems.append(f"{name}.{field}: page says {kind}, document {sorted(allowed)}")
                must_have = direction == "reads" and not kind.endswith("?")
                if must_have and field not in required and "default" not in properties[field]:
                    problems.append(f"{name}.{field}: the page needs it, the document may omit it")
    mapping = components["TaskMessage"]["discriminator"]["mapping"]
    actions = {action: ref.rsplit("/", 1)[1] for action, ref in mapping.items()}
    if actions != declared["tasks"]:
        problems.append(f"task kinds: page {declared['tasks']}, document {actions}")
    return problems


def test_every_field_the_page_reads_or_sends_is_in_the_served_document(document):
    problems = problems_of(declared_messages(), document)
    assert not problems, "\n".join(problems)


def test_a_field_renamed_on_either_side_is_caught(document):
    declared = declared_messages()
    served = copy.deepcopy(document)
    train = served["components"]["schemas"]["TrainTask"]
    train["properties"]["weights_path"] = train["properties"].pop("weights_url")
    assert problems_of(declared, served) == ["TrainTask.weights_url: not in the served schema"]
    page = copy.deepcopy(declared)
    page["messages"]["Registered"]["reads"]["heartbeat_period"] = "number"
    assert problems_of(page, document) == ["Registered.heartbeat_period: not in the served schema"]
    page = copy.deepcopy(declared)
    page["messages"]["Health"]["reads"]["done"] = "string"
    assert problems_of(page, document) == ["Health.done: page says string, document ['boolean']"]
