"""The OpenAPI document (`/openapi.json`) as the contract: what each route takes and may answer.

Routes declare the errors of their own making with `errors(404, 409, ...)`; every error body is
`ErrorBody`, the shape `errors.py` and the Guard write. `install` finishes the document FastAPI
builds, in one place:

- FastAPI's default 422 schema (`HTTPValidationError`) becomes `ErrorBody` on every route;
- the Guard's answers are declared on every route from the route's own `Access` (`app/access.py`):
  400 (a `Host` that is not a loopback name, or a malformed body), 401 (no valid key, where the
  route needs one), 403, and on mutating routes 413 and 415 (body cap, content type);
- optional query and header parameters lose the JSON `null` that FastAPI writes for `X | None`
  (no query string or header can carry one), and so do request bodies a route declares required;
- the limits this server's settings impose are stated (prompts per request, prompt length,
  messages per prompt, revisions), so the document describes the server that serves it;
- with API keys configured, the bearer scheme and which routes need it.

Rules the server checks that JSON Schema cannot state (a message list ends with a user turn, a
model or dataset exists, fields that must agree with each other) are in the descriptions.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from app.access import NDJSON, YAML, Access
from app.schemas import ErrorBody
from app.security import MUTATING, UPLOAD_HEADER
from cai_dpo.core.constitutions import NAME_PATTERN, ConstitutionSpec
from cai_dpo.core.model_refs import FOLDER_PART, MAX_FOLDER_DEPTH, TRAIN_ID, TRAINED_PREFIX, model_roots
from cai_dpo.core.requests import NONBLANK
from cai_dpo.core.settings import BUNDLED_MODEL, Settings

SCHEMAS = "#/components/schemas/"

WHEN = {
    400: "A malformed body (JSON, UTF-8 text, multipart), or (no API keys configured) a `Host` that "
    "is not one of this service's loopback names.",
    401: "No valid API key: send `Authorization: Bearer <key>` (only when API keys are configured).",
    403: "The key lacks the route's scope, the job belongs to another key, a cross-site request "
    "(no keys configured), or a multipart upload without `X-Requested-By`.",
    404: "Nothing has this id or name: the message names the parameter or field.",
    409: "The request conflicts with the resource's state: the message says how.",
    413: "The body is over the route's size cap, or holds more prompts or rows than the server takes.",
    415: "The body's `Content-Type` is not one this route takes.",
    422: "A field is invalid: `errors` names each field at fault and what is wrong.",
    429: "Too many exports at once, or this client was refused (401, 403) too often in the last minute: "
    "retry after `Retry-After` seconds.",
}

# A constitution's or policy's name, as `core.constitutions.check_name` enforces it.
NAME = {"pattern": NAME_PATTERN, "description": "Lower-case letters, digits, '-' and '_'; at most 64."}
# A constitution version: its content hash, or a prefix of 8 or more characters.
VERSION = {"pattern": r"^[0-9a-f]{8,64}$", "description": "A content hash, or its first 8+ characters."}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that answers these error statuses (each an `ErrorBody`)."""
    return {code: _error(code) for code in codes}


def _error(code: int) -> dict[str, Any]:
    schema = {"$ref": f"{SCHEMAS}ErrorBody"}
    return {"description": WHEN[code], "content": {"application/json": {"schema": schema}}}


# --- request bodies that are not JSON --------------------------------------------------------------


def yaml_request(schema_name: str) -> dict[str, Any]:
    """`openapi_extra=` of a route that reads a YAML body itself."""
    schema = {"$ref": f"{SCHEMAS}{schema_name}"}
    return {"requestBody": {"required": True, "content": {media: {"schema": schema} for media in YAML}}}


class ImportMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(pattern="^(system|user|assistant)$")
    content: str = Field(pattern=r"^[^\u0000]*$")


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(pattern="^assistant$")
    content: str = Field(pattern=NONBLANK)


class StandardRow(BaseModel):
    """TRL's standard format. A prompt that is our own multi-turn export (`\\n\\nHuman: ...
    \\n\\nAssistant:`) is read back as its turns."""

    prompt: str = Field(pattern=NONBLANK)
    chosen: str = Field(pattern=NONBLANK)
    rejected: str = Field(pattern=NONBLANK)


class ConversationalRow(BaseModel):
    """TRL's conversational format: the prompt's last message is a user turn with text."""

    prompt: list[ImportMessage] = Field(min_length=1)
    chosen: list[AssistantMessage] = Field(min_length=1, max_length=1)
    rejected: list[AssistantMessage] = Field(min_length=1, max_length=1)


class TranscriptRow(BaseModel):
    """HH-RLHF: two transcripts (`\\n\\nHuman: ...\\n\\nAssistant: ...`) with the same turns but the
    last, which is the Assistant's."""

    chosen: str = Field(pattern=r"^\n\nHuman: [^\u0000]*\n\nAssistant: [^\u0000]*$")
    rejected: str = Field(pattern=r"^\n\nHuman: [^\u0000]*\n\nAssistant: [^\u0000]*$")


ROWS = {
    "type": "array",
    "minItems": 1,
    "description": "One JSON object per line (JSON Lines), in any of three formats; other columns are "
    "ignored. All or nothing: a file with one bad row imports no row.",
    "items": {
        "anyOf": [
            {"$ref": f"{SCHEMAS}{row.__name__}"} for row in (StandardRow, ConversationalRow, TranscriptRow)
        ]
    },
}

IMPORT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **{media: {"schema": ROWS} for media in NDJSON},
            "application/vnd.apache.parquet": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "A Parquet file with the columns of the JSONL rows (prompt, chosen, "
                    "rejected; or input, preferred_output, non_preferred_output); other columns ignored.",
                }
            },
            "application/x-tar": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "A Hugging Face dataset folder as a tar (GET /export?format=hf): the rows "
                    "of every data/*.parquet file.",
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "contentMediaType": "application/x-ndjson",
                            "description": "The pairs as JSON Lines (see the application/x-ndjson body).",
                        }
                    },
                },
                "encoding": {"file": {"contentType": "application/x-ndjson"}},
            },
        },
    },
    "parameters": [
        {
            "name": UPLOAD_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "Any value; required with multipart/form-data (a cross-site form cannot send it).",
        }
    ],
}

# Models the document names that no route's signature brings in.
EXTRA_MODELS: tuple[type[BaseModel], ...] = (
    ErrorBody,
    ConstitutionSpec,
    StandardRow,
    ConversationalRow,
    TranscriptRow,
)


# --- finishing the document ------------------------------------------------------------------------


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the finished document at `/openapi.json` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            finish(FastAPI.openapi(app), settings, app.state.access)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def finish(
    document: dict[str, Any], settings: Settings, access: dict[tuple[str, str], Access]
) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in EXTRA_MODELS:
        schema = model.model_json_schema(ref_template=SCHEMAS + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    keyed = bool(settings.api_keys or settings.api_keys_file)
    if keyed:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status, response in responses.items():
                media = response.get("content", {}).get("application/json", {})
                if media.get("schema", {}).get("$ref") == f"{SCHEMAS}HTTPValidationError":
                    responses[status] = _error(422)
            scope = access[(method.upper(), path)].scope
            # 429: a client refused (401, 403) too often in a minute (`CAI_REFUSALS_PER_MINUTE`).
            guard = [400, 403] + ([401, 429] if scope is not None else [])
            if method.upper() in MUTATING:
                guard += [413, 415]
            for code in guard:
                responses.setdefault(str(code), _error(code))
            operation["responses"] = dict(sorted(responses.items()))
            for parameter in operation.get("parameters", []):
                if parameter.get("in") in ("query", "header"):
                    parameter["schema"] = _without_null(parameter["schema"])
            body = operation.get("requestBody", {})
            if body.get("required"):  # a route that reads `X | None` itself but refuses None
                for media in body.get("content", {}).values():
                    media["schema"] = _without_null(media.get("schema", {}))
            if keyed:
                operation["security"] = [{"bearer": []}] if scope is not None else []
    _state_limits(schemas, settings)
    return document


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, null]` -> X, `anyOf: [X, Y, null]` -> `anyOf: [X, Y]` (keeping the parameter's
    title and description)."""
    if "anyOf" not in schema:
        return schema
    branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
    rest = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    return branches[0] | rest if len(branches) == 1 else {"anyOf": branches} | rest


def _ecma_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in r"\^$.|?*+()[]{}/" else c for c in text)


def model_ref_pattern(settings: Settings) -> str:
    """What `ModelRef` takes on this server, as a pattern: the bundled and default models,
    `train:<id>`, or a folder below a model root (names without a leading dot, so no `..`)."""
    names = sorted({BUNDLED_MODEL, settings.model})
    part = FOLDER_PART.pattern  # the validator's own rules: the document cannot drift from them
    roots = [_ecma_escape(root.rstrip("/")) for root in model_roots(settings)]
    folders = [f"{root}/{part}(/{part}){{0,{MAX_FOLDER_DEPTH - 1}}}" for root in roots]
    trained = TRAINED_PREFIX + TRAIN_ID.pattern
    return "^(" + "|".join([*map(_ecma_escape, names), trained, *folders]) + ")$"


def _state_model_refs(node: Any, pattern: str) -> None:
    """Every field typed `ModelRef` (marked `x-model-ref`) gets this server's pattern."""
    if isinstance(node, dict):
        if node.pop("x-model-ref", False):
            node["pattern"] = pattern
        for child in node.values():
            _state_model_refs(child, pattern)
    elif isinstance(node, list):
        for child in node:
            _state_model_refs(child, pattern)


def _state_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """The settings' limits and model names, where the request models leave them open."""
    _state_model_refs(schemas, model_ref_pattern(settings))
    request = schemas.get("GenerateRequest", {}).get("properties", {})
    if "prompts" in request:
        prompts = request["prompts"]
        prompts["maxItems"] = settings.max_prompts_per_request
        for branch in prompts["items"].get("anyOf", []):
            if branch.get("type") == "string":
                branch["maxLength"] = settings.max_prompt_chars
            elif branch.get("type") == "array":
                branch["minItems"], branch["maxItems"] = 1, settings.max_messages_per_prompt
    for branch in request.get("revisions", {}).get("anyOf", []):
        if branch.get("type") == "integer":
            branch["maximum"] = settings.max_revisions
    if "content" in schemas.get("ChatMessage", {}).get("properties", {}):
        schemas["ChatMessage"]["properties"]["content"]["maxLength"] = settings.max_prompt_chars
