"""The OpenAPI document's own promises, checked without a server (Schemathesis checks the rest
against a live one: tests/test_openapi_contract.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import ErrorBody
from cai_dpo.core.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.unit

ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


def document(**settings) -> dict:
    base = {
        "database_url": "postgresql://nobody@127.0.0.1:1/none",
        "constitutions_dir": PROJECT_ROOT / "constitutions",
    }
    return create_app(Settings(**base | settings), migrate=False).openapi()


def operations(doc: dict):
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            yield path, method.upper(), operation


def test_every_error_is_an_error_body_and_fastapis_default_is_gone():
    doc = document()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "ValidationError" not in doc["components"]["schemas"]
    for path, method, operation in operations(doc):
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")) and path != "/health":
                assert response["content"] == {"application/json": {"schema": ERROR_BODY}}, (
                    method,
                    path,
                    status,
                )


def test_the_guards_answers_are_declared_on_every_route():
    for path, method, operation in operations(document()):
        declared = set(operation["responses"])
        assert {"400", "403"} <= declared, (method, path)
        assert ("401" in declared) == (path != "/health"), (method, path)
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            assert {"413", "415"} <= declared, (method, path)


def test_parameters_carry_no_json_null_and_bodies_their_media_types():
    doc = document()
    for path, method, operation in operations(doc):
        for parameter in operation.get("parameters", []):
            if parameter["in"] in ("query", "header"):
                assert "null" not in str(parameter["schema"]), (method, path, parameter["name"])
    bodies = {(m, p): set(op.get("requestBody", {}).get("content", {})) for p, m, op in operations(doc)}
    assert bodies["PUT", "/constitutions/{name}"] == {"application/yaml", "application/x-yaml", "text/yaml"}
    assert "application/x-ndjson" in bodies["POST", "/datasets/import"]
    assert "multipart/form-data" in bodies["POST", "/datasets/import"]
    export = doc["paths"]["/export"]["get"]["responses"]["200"]["content"]
    assert set(export) == {"application/x-ndjson", "application/vnd.apache.parquet", "application/x-tar"}


def test_the_settings_limits_are_stated():
    doc = document(max_prompts_per_request=7, max_revisions=3)
    request = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    assert request["prompts"]["maxItems"] == 7
    assert {"type": "integer", "minimum": 1, "maximum": 3} in request["revisions"]["anyOf"]


def test_with_keys_the_bearer_scheme_is_declared_and_health_stays_public():
    doc = document(api_keys="admin:admin:0123456789abcdef0123")
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, method, operation in operations(doc):
        assert operation["security"] == ([] if path == "/health" else [{"bearer": []}]), (method, path)
    assert "securitySchemes" not in document().get("components", {})


def test_http_errors_have_the_error_body_and_allow_lists_every_method():
    app = create_app(
        Settings(
            database_url="postgresql://nobody@127.0.0.1:1/none",
            constitutions_dir=PROJECT_ROOT / "constitutions",
        ),
        migrate=False,
    )
    client = TestClient(app, base_url="http://127.0.0.1")
    options = client.options("/constitutions/harmless")
    assert options.status_code == 405 and set(options.headers["allow"].split(", ")) == {"GET", "PUT"}
    missing = client.get("/no/such/route")
    assert missing.status_code == 404
    for response in (options, missing):
        body = ErrorBody.model_validate(response.json())
        assert body.detail == f"{body.errors[0].field}: {body.errors[0].message}"
