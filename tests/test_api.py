"""The HTTP API over a real server and a real PostgreSQL: jobs, pairs, constitutions, bad input."""

import json

import pytest
from sqlalchemy import func, select, text

from cai_dpo.core import queue
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.tables import GenerationJob, Pair, Prompt


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
        ({"prompts": ["hi"], "constitution": "harmless", "model": "train:12"}, 422, "model"),
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
    assert response.status_code == 422, response.text
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


def insert_pairs(db, n: int, *, flagged_extra: bool = True) -> None:
    """Pairs written directly (the generation tests write them through the worker)."""
    with session_scope(db) as session:
        rows = [
            {
                "source": "test",
                "constitution_name": "harmless",
                "prompt": [{"role": "user", "content": f"prompt {i}"}],
                "chosen": f"chosen {i}",
                "rejected": f"rejected {i}",
                "trajectory": {
                    "principles": ["harm"],
                    "rounds": [{"principle": "harm", "critique": f"critique {i}", "revision": f"chosen {i}"}],
                },
                "flags": [],
            }
            for i in range(1, n + 1)
        ]
        if flagged_extra:
            rows.append({**rows[0], "chosen": "same", "rejected": "same", "flags": ["unchanged"]})
        session.execute(Pair.__table__.insert(), rows)


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
    assert client.put("/constitutions/kindness", content=text_v1).status_code == 200
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
    response = client.put("/constitutions/harmless", content=yaml_text)
    assert response.status_code == 422
    assert field in response.json()["detail"]
    assert (settings.constitutions_dir / "harmless.yaml").read_text() == before


def test_invalid_file_on_disk_keeps_the_last_good_version(client, settings):
    good = client.get("/constitutions/harmless").json()
    (settings.constitutions_dir / "harmless.yaml").write_text("principles: 3\n")
    served = client.get("/constitutions/harmless").json()
    assert served["version"] == good["version"]
    assert served["error"]["field"] == "principles"
    assert str(settings.constitutions_dir / "harmless.yaml") in served["error"]["path"]
    job = client.post("/generate", json={"prompts": ["hi"], "constitution": "harmless"}).json()
    assert job["constitution_version"] == good["version"]


@pytest.mark.parametrize("name", ["..", "a/b", "..%2Fetc", "UPPER", "-lead", "x" * 65])
def test_constitution_names_cannot_escape_the_folder(client, settings, name):
    response = client.put(f"/constitutions/{name}", content="principles: []\n")
    assert response.status_code in (404, 422)
    assert not (settings.constitutions_dir.parent / "etc.yaml").exists()
    assert sorted(p.name for p in settings.constitutions_dir.iterdir()) == [
        "harmless.yaml",
        "helpful-honest.yaml",
    ]


def test_health_and_metrics(client, db):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["database"] is True
    client.post("/generate", json={"prompts": ["a", "b"], "constitution": "harmless"})
    metrics = client.get("/metrics").text
    assert 'cai_prompts{state="queued"} 2' in metrics
    assert "cai_pairs_written_total 0" in metrics
    assert 'cai_http_requests_total{method="POST",route="/generate",status="202"} 1' in metrics


def test_api_keys_guard_every_endpoint_but_health(settings, db):
    import httpx

    from cai_dpo.api.app import create_app
    from tests.fixtures.api import ServerThread, free_port

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


def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/generate",
        "/jobs/{job_id}",
        "/jobs/{job_id}/prompts",
        "/jobs/{job_id}/retry",
        "/pairs",
        "/export",
        "/constitutions/{name}",
        "/health",
        "/metrics",
    ):
        assert path in paths
    json.dumps(paths)


def test_what_validation_misses_is_still_a_4xx(client, db):
    """The safety nets behind validation: a DataError or invalid Unicode is the client's 4xx, not a 500."""
    import asyncio

    import psycopg
    from starlette.requests import Request

    from cai_dpo.api.app import _invalid_unicode, _unstorable_value

    with db.connect() as conn, pytest.raises(Exception) as raised:
        conn.exec_driver_sql(r"""SELECT '["\u0000"]'::jsonb""")
    assert isinstance(raised.value.orig, psycopg.DataError)
    request = Request(
        {"type": "http", "method": "POST", "path": "/generate", "headers": [], "query_string": b""}
    )
    response = asyncio.run(_unstorable_value(request, raised.value))
    body = json.loads(response.body)
    assert response.status_code == 422 and body["detail"].startswith("body: a value cannot be stored: ")
    assert body["detail"].endswith("unsupported Unicode escape sequence")

    try:
        "\ud800".encode()
    except UnicodeEncodeError as exc:
        response = asyncio.run(_invalid_unicode(request, exc))
    assert response.status_code == 400
    assert json.loads(response.body)["detail"] == "body: not valid Unicode text: surrogates not allowed"
