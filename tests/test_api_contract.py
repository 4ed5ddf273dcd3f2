"""schemathesis against the live app, from the document it serves (bounded examples).

Every operation is called with generated valid and invalid requests (as a
registered device, so that authenticated operations are reached too); every
reply must be a documented status with a body that fits its schema, and none
may be a server error.
"""

from __future__ import annotations

import pytest
import schemathesis
from coordinator_helpers import PROFILE, auth, register
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from coordinator.admission import AdmissionConfig

OPERATOR = "operator-token-" + "z" * 16
ENROLLMENT = "enrollment-token-" + "z" * 16


@pytest.mark.parametrize("tokens", ["open", "tokens"])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_documented(make_app, mode, tokens):
    """With and without enrollment and operator tokens (the operator's views called with it)."""
    admission = (
        AdmissionConfig()
        if tokens == "open"
        else AdmissionConfig(enrollment_token=ENROLLMENT, operator_token=OPERATOR)
    )
    app = make_app(admission=admission)
    coordinator = app.extensions["heterofl"]
    profile = {**PROFILE, "enrollment_token": ENROLLMENT} if tokens == "tokens" else PROFILE
    devices = register(app.test_client(), profile=profile)
    coordinator.settle()
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 11

    @given(case=schema.as_strategy(mode))
    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def conforms(case):
        # Tensor bodies are "any bytes" to the schema and checked semantically (intake.py),
        # so a schema-valid body may rightly get 400/422: that one check does not apply.
        security = {
            name for entry in case.operation.definition.raw.get("security", []) for name in entry
        }
        caller = OPERATOR if "operator" in security else devices[0]
        case.call_and_validate(headers=auth(caller), excluded_checks=[positive_data_acceptance])

    conforms()
