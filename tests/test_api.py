"""The HTTP API over a real server and a real PostgreSQL: jobs, pairs, constitutions, bad input, and
properties every route the app declares must have (enumerated from `create_app(...).routes`)."""

from typing import get_args

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import func, select, text, update

from app.main import create_app
from cai_dpo.core import queue
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.tables import ConstitutionVersion, GenerationJob, Prompt, TrainingJob
from tests.fixtures.api import ApiServer, ServerThread
from tests.helpers import free_port, insert_pairs

pytestmark = pytest.mark.db


YAML = {"content-type": "application/yaml"}


def count(db, model) -> int:
    with session_scope(db) as session:
        return session.scalar(select(func.count()).select_from(model))


def test_generate_queues_one_prompt_row_per_prompt(client, db):
    body = {
        "prompts": [
            "How do I pick a lock?",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        ],
        "constitution": "harmless",
        "revisions": 2,
        "sampling": {"temperature": 0.2, "max_tokens": 64, "seed": 7},
        "metadata": {"batch": "a"},
    }
    response = client.post("/generate", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["n_prompts"] == 2 and len(job["constitution_version"]) == 64
    with session_scope(db) as session:
        prompts = session.scalars(select(Prompt).order_by(Prompt.position)).all()
        assert [p.status for p in prompts] == ["queued", "queued"]
        assert prompts[0].messages == [{"role": "user", "content": "How do I pick a lock?"}]
        assert prompts[1].messages[0] == {"role": "system", "content": "Be brief."}
    state = client.get(f"/jobs/{job['job_id']}").json()
    assert state["status"] == "queued"
    assert state["counts"] == {
        "queued": 2,
        "running": 0,
        "done": 0,
        "failed": 0,
        "cancelled": 0,
        "flagged": 0,
    }
    assert (
        state["revisions"] == 2
        and state["sampling"]["temperature"] == 0.2
        and state["sampling"]["top_p"] == 0.95
    )
    assert state["metadata"] == {"batch": "a"}
    assert [j["id"] for j in client.get("/jobs").json()] == [job["job_id"]]


def test_idempotency_key_returns_the_same_job(client, db):
    body = {"prompts": ["one", "two"], "constitution": "harmless"}
    first = client.post("/generate", json=body, headers={"Idempotency-Key": "abc"})
    again = client.post("/generate", json=body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert count(db, GenerationJob) == 1 and count(db, Prompt) == 2
    other = client.post("/generate", json={**body, "prompts": ["three"]}, headers={"Idempotency-Key": "abc"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]


def test_cancel_stops_unclaimed_prompts(client, db):
    job_id = client.post("/generate", json={"prompts": ["a", "b", "c"], "constitution": "harmless"}).json()[
        "job_id"
    ]
    state = client.post(f"/jobs/{job_id}/cancel").json()
    assert state["status"] == "cancelled"
    assert state["counts"]["cancelled"] == 3 and state["counts"]["queued"] == 0


def test_failed_prompts_are_listed_with_their_error_and_can_be_retried(client, db, settings):
    job_id = client.post("/generate", json={"prompts": ["a", "b", "c"], "constitution": "harmless"}).json()[
        "job_id"
    ]
    with session_scope(db) as session:
        a, b, _ = job_queries.claim_prompts(
            session, worker_id="w", model=settings.model, n=3, lease_seconds=60, max_attempts=3
        )
        queue.fail(
            session,
            queue.PROMPTS,
            worker_id="w",
            id=b.id,
            error="prompt too long: 9000 tokens",
            retryable=False,
            max_attempts=3,
        )
        job_queries.complete_prompt(
            session,
            worker_id="w",
            prompt_id=a.id,
            pair={"job_id": job_id, "prompt": a.messages, "chosen": "good", "rejected": "bad"},
        )

    failed = client.get(f"/jobs/{job_id}/prompts", params={"status": "failed"}).json()
    assert [(p["id"], p["position"], p["attempts"]) for p in failed["items"]] == [(b.id, 1, 1)]
    assert failed["items"][0]["last_error"] == "prompt too long: 9000 tokens"
    assert failed["items"][0]["messages"] == [{"role": "user", "content": "b"}]
    everything = client.get(f"/jobs/{job_id}/prompts", params={"limit": 2}).json()
    assert [p["status"] for p in everything["items"]] == ["done", "failed"]
    assert everything["items"][0]["pair_id"] is not None and everything["items"][1]["pair_id"] is None
    rest = client.get(f"/jobs/{job_id}/prompts", params={"cursor": everything["next_cursor"]}).json()
    assert [p["status"] for p in rest["items"]] == ["running"] and rest["next_cursor"] is None

    state = client.post(f"/jobs/{job_id}/retry").json()
    assert state["counts"]["failed"] == 0 and state["counts"]["queued"] == 1
    with session_scope(db) as session:
        (again,) = job_queries.claim_prompts(
            session, worker_id="w2", model=settings.model, n=3, lease_seconds=60, max_attempts=3
        )
    assert again.id == b.id and again.attempts == 1

    bad = client.get(f"/jobs/{job_id}/prompts", params={"status": "lost"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("status:")
    assert client.get("/jobs/999999/prompts").status_code == 404
    client.post(f"/jobs/{job_id}/cancel")
    refused = client.post(f"/jobs/{job_id}/retry")
    assert refused.status_code == 409 and refused.json()["detail"].startswith("job_id:")


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"prompts": [], "constitution": "harmless"}, 422, "prompts"),
        ({"prompts": ["   "], "constitution": "harmless"}, 422, "prompts.0"),
        ({"prompts": ["ok", ""], "constitution": "harmless"}, 422, "prompts.1"),
        ({"prompts": ["x" * 20_000], "constitution": "harmless"}, 422, "prompts.0"),
        ({"prompts": ["hi"] * 10_001, "constitution": "harmless"}, 413, "prompts"),
        (
            {"prompts": [[{"role": "robot", "content": "hi"}]], "constitution": "harmless"},
            422,
            "prompts.0.0.role",
        ),
        (
            {
                "prompts": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]],
                "constitution": "harmless",
            },
            422,
            "prompts.0.1.role",
        ),
        ({"prompts": [[]], "constitution": "harmless"}, 422, "prompts.0"),
        ({"prompts": ["hi"], "constitution": "nope"}, 404, "constitution"),
        ({"prompts": ["hi"], "constitution": "../etc"}, 422, "constitution"),
        ({"prompts": "hi", "constitution": "harmless"}, 422, "prompts"),
        ({"prompts": [42], "constitution": "harmless"}, 422, "prompts.0"),
        ({"prompts": ["hi"], "constitution": "harmless", "revisions": "two"}, 422, "revisions"),
        ({"prompts": ["hi"], "constitution": "harmless", "revisions": 99}, 422, "revisions"),
        (
            {"prompts": ["hi"], "constitution": "harmless", "sampling": {"temperature": -1}},
            422,
            "sampling.temperature",
        ),
        ({"prompts": ["hi"], "constitution": "harmless", "model": "gpt-5"}, 422, "model"),
        ({"prompts": ["hi"], "constitution": "harmless", "model": "train:12"}, 404, "model"),
        ({"prompts": ["hi"], "constitution": "harmless", "colour": "red"}, 422, "colour"),
        ({"constitution": "harmless"}, 422, "prompts"),
        # PostgreSQL text cannot hold NUL; ids beyond its bigint name no row.
        ({"prompts": ["a\x00b"], "constitution": "harmless"}, 422, "prompts.0"),
        (
            {"prompts": [[{"role": "user", "content": "\x00"}]], "constitution": "harmless"},
            422,
            "prompts.0.0.content",
        ),
        ({"prompts": ["hi"], "constitution": "harmless", "metadata": {"a": ["\x00"]}}, 422, "metadata"),
        ({"prompts": ["hi"], "constitution": "harmless", "model": f"train:{2**64}"}, 422, "model"),
    ],
)
def test_bad_generate_requests_name_the_field_and_write_nothing(client, db, body, status, field):
    response = client.post("/generate", json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"{field}:"), detail
    assert count(db, GenerationJob) == 0 and count(db, Prompt) == 0


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        (f"/jobs/{2**64}", {}, "job_id"),
        (f"/jobs/{2**64}/prompts", {}, "job_id"),
        ("/jobs", {"before": 2**64}, "before"),
        (f"/pairs/{2**64}", {}, "pair_id"),
        ("/pairs", {"cursor": "9" * 30}, "cursor"),
        ("/pairs", {"job_id": 2**64}, "job_id"),
        ("/pairs", {"source": "a\x00"}, "source"),
        ("/export", {"constitution": "harmless\x00"}, "constitution"),
        (f"/train/{2**64}", {}, "train_id"),
    ],
)
def test_out_of_range_ids_and_nul_characters_in_queries_are_422(client, path, params, field):
    response = client.get(path, params=params)
    # An id in the path that names no row cannot name a resource: 404, naming the parameter.
    assert response.status_code == (404 if not params else 422), response.text
    assert response.json()["detail"].startswith(f"{field}:")


@pytest.mark.parametrize(
    ("raw", "status", "field"),
    [
        (rb'{"prompts": ["\ud800"], "constitution": "harmless"}', 422, "prompts.0"),
        (rb'{"prompts": ["hi"], "constitution": "harmless", "metadata": {"\udfff": 1}}', 422, "metadata"),
        (rb'{"prompts": ["hi"], "constitution": "harmless", "metadata": {"x": NaN}}', 422, "metadata"),
        (
            rb'{"prompts": ["hi"], "constitution": "harmless", "sampling": {"top_p": Infinity}}',
            422,
            "sampling.top_p",
        ),
    ],
)
def test_json_that_is_not_storable_text_or_numbers_is_refused(client, db, raw, status, field):
    """Python's JSON reader lets through lone surrogates and NaN; PostgreSQL stores neither."""
    response = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith(f"{field}:")
    assert count(db, GenerationJob) == 0


def test_json_nested_too_deep_to_parse_is_a_400_naming_the_body(client, db):
    response = client.post("/generate", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert (
        response.status_code == 400 and response.json()["detail"] == "body: malformed JSON (RecursionError)"
    )


def test_malformed_json_is_a_400_naming_the_body(client, db):
    response = client.post(
        "/generate", content=b'{"prompts": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["detail"].startswith("body: malformed JSON")
    assert count(db, GenerationJob) == 0


def test_oversized_body_is_refused_before_it_is_read(client, settings):
    response = client.post(
        "/generate",
        content=b"x" * (settings.max_body_bytes + 1),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413 and response.json()["detail"].startswith("body:")


def test_unknown_export_format_names_the_field(client):
    response = client.get("/export", params={"format": "csv"})
    assert response.status_code == 422 and response.json()["detail"].startswith("format:")


def test_pairs_paging_and_detail(client, db):
    insert_pairs(db, 5)
    first = client.get("/pairs", params={"limit": 2}).json()
    assert [p["id"] for p in first["items"]] == [1, 2] and first["next_cursor"] == "2"
    second = client.get("/pairs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [p["id"] for p in second["items"]] == [3, 4]
    last = client.get("/pairs", params={"limit": 2, "cursor": second["next_cursor"]}).json()
    assert [p["id"] for p in last["items"]] == [5] and last["next_cursor"] is None
    assert "trajectory" not in first["items"][0] or first["items"][0]["trajectory"] is None
    detail = client.get("/pairs/3").json()
    assert detail["trajectory"]["rounds"][0]["critique"] == "critique 3"
    assert client.get("/pairs/99").status_code == 404
    flagged = client.get("/pairs", params={"include_flagged": True}).json()
    assert len(flagged["items"]) == 6


def test_constitutions_list_get_put(client, settings):
    names = [c["name"] for c in client.get("/constitutions").json()]
    assert {"harmless", "helpful-honest"} <= set(names)
    harmless = client.get("/constitutions/harmless").json()
    assert len(harmless["spec"]["principles"]) >= 12 and len(harmless["spec"]["few_shot"]) >= 2
    new_text = harmless["body"].replace("revisions: 1", "revisions: 2")
    put = client.put(
        "/constitutions/harmless", content=new_text, headers={"content-type": "application/yaml"}
    )
    assert put.status_code == 200, put.text
    assert put.json()["version"] != harmless["version"]
    assert (settings.constitutions_dir / "harmless.yaml").read_text() == new_text
    assert put.json()["versions"][0]["version"] == put.json()["version"]


def test_new_constitution_by_put_and_edit_on_disk_without_restart(client, settings):
    text_v1 = "principles:\n  - id: kind\n    critique: Was it unkind?\n    revision: Rewrite it kindly.\n"
    assert client.put("/constitutions/kindness", content=text_v1, headers=YAML).status_code == 200
    job_v1 = client.post("/generate", json={"prompts": ["hi"], "constitution": "kindness"}).json()
    (settings.constitutions_dir / "kindness.yaml").write_text(text_v1.replace("unkind", "rude"))
    job_v2 = client.post("/generate", json={"prompts": ["hi"], "constitution": "kindness"}).json()
    assert job_v1["constitution_version"] != job_v2["constitution_version"]
    versions = client.get("/constitutions/kindness").json()["versions"]
    assert {v["version"] for v in versions} == {
        job_v1["constitution_version"],
        job_v2["constitution_version"],
    }


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("principles: [\n", "invalid YAML"),
        ("description: no principles\n", "principles"),
        ("principles:\n  - id: a\n    critique: c\n", "principles.0.revision"),
        ("principles:\n  - id: a\n    critique: c\n    revision: r\nrevisions: 0\n", "revisions"),
        (
            "principles:\n  - {id: a, critique: c, revision: r}\n  - {id: a, critique: c, revision: r}\n",
            "principles",
        ),
        ("- just a list\n", "(root)"),
        ('principles:\n  - {id: a, critique: "c\\0", revision: r}\n', "principles.0.critique"),
    ],
)
def test_invalid_constitution_put_is_refused_and_changes_nothing(client, settings, yaml_text, field):
    before = (settings.constitutions_dir / "harmless.yaml").read_text()
    response = client.put("/constitutions/harmless", content=yaml_text, headers=YAML)
    assert response.status_code == 422
    assert field in response.json()["detail"]
    assert (settings.constitutions_dir / "harmless.yaml").read_text() == before


def test_invalid_file_on_disk_keeps_the_last_good_version(client, settings):
    good = client.get("/constitutions/harmless").json()
    (settings.constitutions_dir / "harmless.yaml").write_text("principles: 3\n")
    response = client.get("/constitutions/harmless")
    served = response.json()
    assert served["version"] == good["version"]
    assert served["error"]["field"] == "principles"
    # The file at fault by its name: the server's folders are no client's business.
    assert served["error"]["file"] == "harmless.yaml" and str(settings.constitutions_dir) not in response.text
    job = client.post("/generate", json={"prompts": ["hi"], "constitution": "harmless"}).json()
    assert job["constitution_version"] == good["version"]


@pytest.mark.parametrize("name", ["..", "a/b", "..%2Fetc", "UPPER", "-lead", "x" * 65])
def test_constitution_names_cannot_escape_the_folder(client, settings, name):
    response = client.put(f"/constitutions/{name}", content="principles: []\n", headers=YAML)
    # httpx sends `/constitutions/..` as `/`, which reaches no route: 404, its body unread.
    assert response.status_code in (404, 422), response.text
    assert not (settings.constitutions_dir.parent / "etc.yaml").exists()
    assert sorted(p.name for p in settings.constitutions_dir.iterdir()) == [
        "harmless.yaml",
        "helpful-honest.yaml",
    ]


def test_health_and_metrics(client, db):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["database"] is True
    client.post("/generate", json={"prompts": ["a", "b"], "constitution": "harmless"})
    # Prompts waiting and no generation worker live: nobody will do them.
    health = client.get("/health").json()
    assert health["status"] == "degraded" and health["unhealthy_workers"] == 0
    assert health["problems"] == [
        {"worker": None, "kind": "generate", "problem": "work is waiting and no generate worker is live"}
    ]
    metrics = client.get("/metrics").text
    assert 'cai_prompts{state="queued"} 2' in metrics
    assert "cai_pairs_written_total 0" in metrics
    assert 'cai_http_requests_total{method="POST",route="/generate",status="202"} 1' in metrics


def test_api_keys_guard_every_endpoint_but_health(settings, db):
    keyed = settings.model_copy(update={"api_keys": "k1, k2"})
    with (
        ServerThread(create_app(keyed, migrate=False), free_port()) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        assert http.get("/health").status_code == 200
        for path in ("/jobs", "/pairs", "/constitutions", "/metrics", "/export", "/workers"):
            assert http.get(path).status_code == 401, path
        assert http.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/jobs", headers={"Authorization": "Bearer k2"}).status_code == 200
        denied = http.post("/generate", json={"prompts": ["hi"], "constitution": "harmless"})
        assert denied.status_code == 401 and "authorization" in denied.json()["detail"]
        # Every route the app declares, whatever its method and arguments.
        for route, method in api_operations(server):
            if route.path == "/health":
                continue
            response = http.request(method, route_url(route, UNKNOWN), json={})
            assert response.status_code == 401, f"{method} {route.path}: {response.status_code}"
            assert response.json()["detail"].startswith("authorization:")
    assert count(db, GenerationJob) == 0


def test_ten_thousand_prompts_are_accepted(client, db):
    response = client.post(
        "/generate", json={"prompts": [f"prompt {i}" for i in range(10_000)], "constitution": "harmless"}
    )
    assert response.status_code == 202
    assert count(db, Prompt) == 10_000
    with session_scope(db) as session:
        positions = session.execute(
            text("SELECT min(position), max(position), count(DISTINCT position) FROM prompts")
        ).one()
    assert tuple(positions) == (0, 9_999, 10_000)


# --- every route the app declares -----------------------------------------------------------------
#
# These tests enumerate the running app's routes: a route added later is tested without being
# listed here, and one these tests cannot drive (a path parameter or a body they know nothing
# about) fails with what to add.

WRITE_METHODS = {"POST", "PUT", "PATCH"}
# Path parameters naming rows that exist (filled in by the `existing` fixture) and ones that do not.
UNKNOWN = {
    "job_id": 987_654_321,
    "pair_id": 987_654_321,
    "train_id": 987_654_321,
    "name": "nobody",
    "version": "0" * 64,
    "calibration_id": 987_654_321,
}
# A valid body for each route that declares one: each field in turn is replaced by a bad value.
VALID_BODIES = {
    ("POST", "/generate"): {"prompts": ["hi"], "constitution": "harmless"},
    ("POST", "/train"): {"dataset": {"constitution": "harmless"}, "max_steps": 1},
    ("PUT", "/train/policies/{name}"): {"min_new_pairs": 5},
    ("POST", "/train/{train_id}/evaluate"): {"max_prompts": 1},
    ("POST", "/pairs/{pair_id}/review"): {"status": "approved", "chosen": "better"},
    ("POST", "/judges/calibrate"): {"max_pairs": 1},
    ("POST", "/datasets/decontaminate"): {"benchmark": {"source": "test"}},
}
# Bodies no route can read, each sent as every text type a route may take: broken JSON, bytes that
# are not UTF-8 (text in no format); then multipart bodies cut short or with no boundary.
TEXT_TYPES = ["application/json", "application/yaml", "application/x-ndjson"]
NOT_UTF8 = b'\xff\xfe{"a": 1}'
MALFORMED_BODIES = [(body, media) for body in (b'{"prompts": [', NOT_UTF8) for media in TEXT_TYPES] + [
    (b"--cut\r\nContent-Disposition: form-data; name=", "multipart/form-data; boundary=cut"),
    (b'{"prompt": "no boundary"}', "multipart/form-data; boundary=cut"),
]


def api_operations(server: ApiServer | ServerThread) -> list[tuple[APIRoute, str]]:
    """(route, method) for every operation of the running app, in the order it declares them."""
    routes = [route for route in server.app.routes if isinstance(route, APIRoute)]
    assert len(routes) >= 20, "the app should declare its routers' routes"
    return [(route, method) for route in routes for method in sorted(route.methods)]


def path_params(route: APIRoute) -> list[str]:
    return [param.name for param in route.dependant.path_params]


def route_url(route: APIRoute, values: dict) -> str:
    missing = [name for name in path_params(route) if name not in values]
    assert not missing, f"{route.path}: add a value for path parameter(s) {missing} to the tests"
    return route.path.format(**{name: values[name] for name in path_params(route)})


def detail_field(response: httpx.Response) -> str:
    """The field an error names: the start of `detail` ("field: message"), the convention of every error."""
    detail = response.json()["detail"]
    assert isinstance(detail, str) and ": " in detail, detail
    return detail.split(": ", 1)[0]


def body_model(route: APIRoute) -> type[BaseModel]:
    """The pydantic model of the route's JSON body (of an optional one too)."""
    annotation = route.body_field.field_info.annotation
    models = [
        t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, BaseModel)
    ]
    assert len(models) == 1, (route.path, annotation)
    return models[0]


def query_fields(route: APIRoute) -> list[str]:
    """The route's query parameters, a query model's fields included."""
    names = []
    for param in route.dependant.query_params:
        annotation = param.field_info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += [field.alias or name for name, field in annotation.model_fields.items()]
        else:
            names.append(param.alias)
    return names


@pytest.fixture
def existing(client, db) -> dict:
    """A row behind every path parameter: a generation job, pairs, a training job, a policy."""
    job = client.post("/generate", json={"prompts": ["hi", "there"], "constitution": "harmless"})
    insert_pairs(db, 3)
    train = client.post("/train", json={"max_steps": 1})
    policy = client.put("/train/policies/harmless", json={"min_new_pairs": 50})
    calibration = client.post("/judges/calibrate", json={"max_pairs": 1})
    assert (
        job.status_code == train.status_code == calibration.status_code == 202 and policy.status_code == 200
    )
    with session_scope(db) as session:  # a trained model, as a training worker leaves it
        session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == train.json()["train_id"])
            .values(status="succeeded", pair_ids=[1, 2], eval_pair_ids=[3], step=1, total_steps=1)
        )
    return {
        "job_id": job.json()["job_id"],
        "pair_id": 1,
        "train_id": train.json()["train_id"],
        "name": "harmless",
        "version": job.json()["constitution_version"],  # the job stored it
        "calibration_id": calibration.json()["id"],
    }


def test_openapi_documents_every_route_and_nothing_else(client, api_server):
    paths = client.get("/openapi.json").json()["paths"]
    documented = {(path, method.upper()) for path, operations in paths.items() for method in operations}
    declared = {
        (route.path, method) for route, method in api_operations(api_server) if route.include_in_schema
    }
    assert documented == declared
    for path, method in declared:
        operation = paths[path][method.lower()]
        assert operation.get("summary") and operation.get("operationId"), (method, path)
        assert any(status.startswith("2") for status in operation["responses"]), (method, path)
        for name in [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]:
            assert "{" + name + "}" in path


def test_every_get_route_answers_with_a_declared_status(client, api_server, existing):
    paths = client.get("/openapi.json").json()["paths"]
    for route, method in api_operations(api_server):
        if method != "GET" or not route.include_in_schema:
            continue
        response = client.get(route_url(route, existing))
        declared = paths[route.path]["get"]["responses"]
        assert str(response.status_code) in declared, (route.path, response.status_code, response.text[:200])
        assert response.status_code == (route.status_code or 200), (route.path, response.text[:200])
        media_types = declared[str(response.status_code)].get("content", {})
        assert response.headers["content-type"].split(";")[0] in media_types, (route.path, media_types)
        if response.headers["content-type"] == "application/json":
            response.json()


def test_unknown_ids_in_paths_are_404_naming_the_path_parameter(client, api_server, existing):
    checked = 0
    for route, method in api_operations(api_server):
        if not path_params(route) or method == "PUT":  # a PUT creates what its path names
            continue
        response = client.request(method, route_url(route, UNKNOWN))
        assert response.status_code == 404, (method, route.path, response.status_code, response.text[:200])
        assert detail_field(response) in path_params(route), (method, route.path, response.text[:200])
        checked += 1
    assert checked >= 9


def test_every_route_with_a_body_answers_a_malformed_one_with_a_4xx_naming_the_body(
    client, api_server, existing, db
):
    paths = client.get("/openapi.json").json()["paths"]
    jobs_before = count(db, GenerationJob)
    reads_body, not_utf8_read = set(), set()
    for route, method in api_operations(api_server):
        if method not in WRITE_METHODS:
            continue
        for content, content_type in MALFORMED_BODIES:
            response = client.request(
                method, route_url(route, existing), content=content, headers={"content-type": content_type}
            )
            where = (method, route.path, content, content_type, response.status_code, response.text[:200])
            assert response.status_code < 500, where
            if response.status_code < 300:
                # Only a route that reads no body may ignore one.
                assert route.body_field is None, where
                assert "requestBody" not in paths[route.path][method.lower()], where
                continue
            field = detail_field(response)  # "field: message", whatever the route
            if response.status_code == 415:  # not a type this route takes: the header is named
                assert field == "content-type", where
                continue
            if field in path_params(route):  # a 404 or 409 about the row the path names
                continue
            reads_body.add((method, route.path))
            if route.body_field is not None:  # declared JSON bodies are refused as a whole
                assert response.status_code in (400, 422) and field == "body", where
            if content == NOT_UTF8 and not content_type.startswith("multipart/"):
                # Bytes that are not text, in any text format the route takes.
                assert response.status_code == 400 and field == "body", where
                not_utf8_read.add((method, route.path))
    # Every route that reads a body refused them, those reading it raw (YAML, JSONL) included.
    assert {
        ("POST", "/generate"),
        ("POST", "/train"),
        ("PUT", "/train/policies/{name}"),
        ("PUT", "/constitutions/{name}"),
        ("POST", "/datasets/import"),
    } <= reads_body
    assert not_utf8_read == reads_body
    assert count(db, GenerationJob) == jobs_before


def test_every_body_field_refuses_a_bad_value_with_a_422_naming_it(client, api_server, existing):
    for route, method in api_operations(api_server):
        if route.body_field is None:
            continue
        key = (method, route.path)
        assert key in VALID_BODIES, f"{method} {route.path}: add a valid body for it to VALID_BODIES"
        url = route_url(route, existing)
        valid = client.request(method, url, json=VALID_BODIES[key])
        assert valid.status_code < 300, (key, valid.text[:200])
        assert client.request(method, url, json=[VALID_BODIES[key]]).status_code == 422
        for name, field in body_model(route).model_fields.items():
            name = field.alias or name
            # NUL is text PostgreSQL cannot store, and no number, list, object or known name.
            response = client.request(method, url, json={**VALID_BODIES[key], name: "\x00"})
            where = (key, name, response.status_code, response.text[:200])
            assert response.status_code == 422, where
            assert detail_field(response).split(".")[0] == name, where


def test_every_query_parameter_refuses_a_bad_value_with_a_422_naming_it(client, api_server, existing):
    checked = 0
    for route, method in api_operations(api_server):
        url = route_url(route, existing)
        for name in query_fields(route):
            for media in TEXT_TYPES:  # a write route answers 415 to a type it does not take
                response = client.request(
                    method, url, params={name: "\x00"}, content=b"{}", headers={"content-type": media}
                )
                if response.status_code != 415:
                    break
            where = (method, route.path, name, response.status_code, response.text[:200])
            assert response.status_code == 422, where
            assert detail_field(response) == name, where
            checked += 1
    assert checked >= 20


# --- the safety nets behind validation, reached over HTTP ----------------------------------------


def _refused_by_the_database(session, **_):
    """What create_generation_job would meet if a value validation let through reached PostgreSQL."""
    session.execute(text(r"""SELECT '["\u0000"]'::jsonb"""))


def _refused_by_psycopg(session, **_):
    """The same through psycopg's own cursor (the prompts' COPY writes with one)."""
    session.connection().connection.driver_connection.execute(r"""SELECT '["\u0000"]'::jsonb""")


@pytest.mark.parametrize(
    "refuse", [_refused_by_the_database, _refused_by_psycopg], ids=["sqlalchemy", "psycopg"]
)
def test_a_value_the_database_refuses_is_a_422_naming_the_body(client, db, monkeypatch, refuse):
    """A DataError that validation missed is the client's 422, not a 500, and nothing is written."""
    monkeypatch.setattr(job_queries, "create_generation_job", refuse)
    response = client.post("/generate", json={"prompts": ["hi"], "constitution": "harmless"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("body: a value cannot be stored")
    assert "Unicode escape" not in response.text  # the database's own words go to the log only
    assert count(db, GenerationJob) == 0  # rolled back
    # The constitution's version row is committed on its own first (jobs.generate says why): one
    # row per content hash, whatever happens to the jobs that use it.
    assert count(db, ConstitutionVersion) == 1


def test_text_that_cannot_be_encoded_is_a_400_naming_the_body(client, db, monkeypatch):
    """A lone surrogate that reached the database driver: the client's 400, not a 500."""

    def encode_a_surrogate(session, **_):
        session.connection().connection.driver_connection.execute("SELECT %s", ["\ud800"])

    monkeypatch.setattr(job_queries, "create_generation_job", encode_a_surrogate)
    response = client.post("/generate", json={"prompts": ["hi"], "constitution": "harmless"})
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == "body: not valid Unicode text: surrogates not allowed"
    assert count(db, GenerationJob) == 0 and count(db, ConstitutionVersion) == 1  # as above
