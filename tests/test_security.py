"""Who may call what, over real HTTP: the key is checked before the body is read, keys have names
and scopes (from settings or a keys file re-read on change), every mutating call is audited, the
loopback mode refuses what a web page could send, and constitutions and imports have their caps.
"""

import contextlib
import logging
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from app.main import create_app
from cai_dpo.core.api_keys import InvalidKeys
from cai_dpo.core.db import session_scope
from cai_dpo.core.queries import workers as worker_queries
from cai_dpo.core.tables import DatasetImport, GenerationJob, Pair
from tests.fixtures.api import ServerThread
from tests.helpers import free_port, hh_lines

pytestmark = pytest.mark.db

KEYS = "reader:read:r-secret-0000000000,gen:read+generate:g-secret-000000000,ops:admin:a-secret-0000000000"
JSON = {"content-type": "application/json"}
YAML = {"content-type": "application/yaml"}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@contextlib.contextmanager
def server(settings, **update):
    app = create_app(settings.model_copy(update=update), migrate=False)
    with ServerThread(app, free_port()) as running, httpx.Client(base_url=running.url, timeout=30) as http:
        yield running, http


def count(db, model) -> int:
    with session_scope(db) as session:
        return session.scalar(select(func.count()).select_from(model))


def test_a_request_without_a_key_is_refused_before_its_body_is_read(settings, db):
    with server(settings, api_keys=KEYS) as (running, _):
        port = int(running.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            # Declares 50 MB, sends 10 bytes: a server that read the body first would wait.
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 50000000\r\n\r\n{"prompts"'
            )
            started = time.monotonic()
            answer = sock.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 401") and time.monotonic() - started < 5
        assert "authorization" in answer


def test_scopes_decide_what_each_key_may_do(settings, db):
    with server(settings, api_keys=KEYS) as (_, http):
        body = {"prompts": ["hi"], "constitution": "harmless"}
        assert http.post("/generate", content=b"{not json", headers=JSON).status_code == 401  # not a 400
        assert http.get("/jobs", headers=bearer("r-secret-0000000000")).status_code == 200
        refused = http.post("/generate", json=body, headers=bearer("r-secret-0000000000"))
        assert refused.status_code == 403 and "'generate' scope" in refused.json()["detail"]
        job = http.post("/generate", json=body, headers=bearer("g-secret-000000000")).json()["job_id"]
        # A generate key cancels its own jobs; another job (submitted by admin) is not its own.
        other = http.post("/generate", json=body, headers=bearer("a-secret-0000000000")).json()["job_id"]
        assert http.post(f"/jobs/{job}/cancel", headers=bearer("g-secret-000000000")).status_code == 200
        denied = http.post(f"/jobs/{other}/cancel", headers=bearer("g-secret-000000000"))
        assert denied.status_code == 403 and "belongs to key 'ops'" in denied.json()["detail"]
        put = http.put("/constitutions/x", content="a: b", headers=YAML | bearer("g-secret-000000000"))
        assert put.status_code == 403  # constitutions are admin's
        assert http.get("/audit", headers=bearer("g-secret-000000000")).status_code == 403
        for path in ("/docs", "/openapi.json", "/redoc"):  # the document follows the same rule
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers=bearer("r-secret-0000000000")).status_code == 200, path
        keys = http.get("/keys", headers=bearer("a-secret-0000000000")).json()
        assert {k["name"]: k["scopes"] for k in keys} == {
            "reader": ["read"],
            "gen": ["generate", "read"],
            "ops": ["admin"],
        }
        assert "secret" not in str(keys)


def test_every_mutating_call_is_in_the_audit_log_allowed_or_not(settings, db):
    with server(settings, api_keys=KEYS) as (_, http):
        job = http.post(
            "/generate",
            json={"prompts": ["hi"], "constitution": "harmless"},
            headers=bearer("g-secret-000000000"),
        ).json()["job_id"]
        http.post(f"/jobs/{job}/retry", headers=bearer("r-secret-0000000000"))  # 403: no generate scope
        http.post("/generate", json={})  # 401: no key
        http.get("/jobs", headers=bearer("g-secret-000000000"))  # a read is not audited
        entries = http.get("/audit", headers=bearer("a-secret-0000000000")).json()
    # Written after each response, off the event loop: in any order.
    seen = {(e["key_name"], e["method"], e["route"], e["status"]): e["ids"] for e in entries}
    assert seen == {
        ("gen", "POST", "/generate", 202): {"job_id": str(job)},
        ("reader", "POST", "/jobs/{job_id}/retry", 403): {"job_id": str(job)},
        (None, "POST", "/generate", 401): {},
    }


def test_a_keys_file_is_read_again_when_it_changes_and_a_bad_edit_withdraws_its_keys(settings, db, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys:\n  - {name: alice, scopes: [read], key: alice-secret-000000}\n")
    with server(settings, api_keys="", api_keys_file=keys_file) as (_, http):
        assert http.get("/jobs", headers=bearer("alice-secret-000000")).status_code == 200
        assert http.get("/jobs", headers=bearer("bob-secret-0000000000")).status_code == 401
        import hashlib

        digest = hashlib.sha256(b"bob-secret-0000000000").hexdigest()
        keys_file.write_text(
            "keys:\n  - {name: alice, scopes: [read], key: alice-secret-000000}\n"
            f"  - {{name: bob, scopes: [read, generate], sha256: {digest}}}\n"
        )
        os.utime(keys_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        assert http.get("/jobs", headers=bearer("bob-secret-0000000000")).status_code == 200  # no restart
        # An edit meant to remove bob that is also invalid: no key of the file is vouched for any more
        # (keeping the last good keys kept bob working).
        keys_file.write_text(
            "keys:\n  - {name: alice, scopes: [read], key: alice-secret-000000}\n  - {name: x}\n"
        )
        os.utime(keys_file, ns=(time.time_ns(), time.time_ns() + 2_000_000))
        assert http.get("/jobs", headers=bearer("bob-secret-0000000000")).status_code == 401
        assert http.get("/jobs", headers=bearer("alice-secret-000000")).status_code == 401
        keys_file.write_text("keys:\n  - {name: alice, scopes: [read], key: alice-secret-000000}\n")
        os.utime(keys_file, ns=(time.time_ns(), time.time_ns() + 3_000_000))
        assert http.get("/jobs", headers=bearer("alice-secret-000000")).status_code == 200
        assert http.get("/jobs", headers=bearer("bob-secret-0000000000")).status_code == 401
    # Invalid at start: the service does not start.
    keys_file.write_text("keys: [{name: broken}]\n")
    with pytest.raises(InvalidKeys, match="keys.yaml"):
        create_app(settings.model_copy(update={"api_keys_file": keys_file}), migrate=False)


def test_key_names_are_unique_across_the_settings_and_the_keys_file(settings, db, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys:\n  - {name: gen, scopes: [admin], key: other-gen-secret-0000}\n")
    with pytest.raises(InvalidKeys, match="'gen' is given twice"):
        create_app(settings.model_copy(update={"api_keys": KEYS, "api_keys_file": keys_file}), migrate=False)
    with pytest.raises(InvalidKeys, match="given twice"):
        create_app(
            settings.model_copy(update={"api_keys": "a:read:secret-one-0000,a:admin:secret-two-0000"}),
            migrate=False,
        )
    # Edited in later to shadow an env key: the file's keys are refused, the env's keep working.
    keys_file.write_text("keys:\n  - {name: alice, scopes: [read], key: alice-secret-000000}\n")
    with server(settings, api_keys=KEYS, api_keys_file=keys_file) as (_, http):
        assert http.get("/jobs", headers=bearer("alice-secret-000000")).status_code == 200
        keys_file.write_text("keys:\n  - {name: gen, scopes: [admin], key: other-gen-secret-0000}\n")
        os.utime(keys_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        assert http.get("/jobs", headers=bearer("other-gen-secret-0000")).status_code == 401
        assert http.get("/jobs", headers=bearer("g-secret-000000000")).status_code == 200


def test_an_idempotency_key_replays_only_the_same_api_keys_request(settings, db):
    body = {"prompts": ["hi"], "constitution": "harmless"}
    keys = KEYS + ",gen2:read+generate:g2-secret-00000000"
    with server(settings, api_keys=keys) as (_, http):
        first = http.post(
            "/generate", json=body, headers=bearer("g-secret-000000000") | {"Idempotency-Key": "k1"}
        )
        again = http.post(
            "/generate", json=body, headers=bearer("g-secret-000000000") | {"Idempotency-Key": "k1"}
        )
        other = http.post(
            "/generate", json=body, headers=bearer("g2-secret-00000000") | {"Idempotency-Key": "k1"}
        )
        assert first.status_code == again.status_code == other.status_code == 202
        assert again.json()["job_id"] == first.json()["job_id"]
        assert other.json()["job_id"] != first.json()["job_id"]  # gen2 never sees gen's job
        # gen2's job is gen2's: gen may not cancel it.
        refused = http.post(f"/jobs/{other.json()['job_id']}/cancel", headers=bearer("g-secret-000000000"))
        assert refused.status_code == 403


def test_health_tells_anonymous_callers_no_error_text(settings, db):
    with session_scope(db) as session:
        worker_queries.record_worker_heartbeat(
            session, id="g", kind="generate", host="h", pid=1, model="m", in_flight=0, tokens_per_s=0.0,
            stats={"problem": "engine down: /secret/path/model"},
        )  # fmt: skip
    with server(settings, api_keys=KEYS) as (_, http):
        anonymous = http.get("/health").json()
        assert anonymous["status"] == "degraded" and "problems" not in anonymous
        assert "/secret/path" not in str(anonymous)
        detailed = http.get("/health", headers=bearer("r-secret-0000000000")).json()
        assert detailed["problems"][0]["problem"].startswith("engine down")


def test_loopback_mode_refuses_what_a_web_page_could_send(client):
    body = {"prompts": ["hi"], "constitution": "harmless"}
    assert client.post("/generate", json=body, headers={"Host": "evil.example"}).status_code == 400
    crossed = client.post("/generate", json=body, headers={"Origin": "https://evil.example"})
    assert crossed.status_code == 403 and crossed.json()["detail"].startswith("origin")
    # Only the service's own origin: another local web app (another port) is a site of its own.
    own = str(client.base_url).rstrip("/")
    assert client.post("/generate", json=body, headers={"Origin": own}).status_code == 202
    port = client.base_url.port
    for other in (
        f"http://127.0.0.1:{port + 1}",
        f"http://localhost:{port + 1}",
        "null",
        f"https://127.0.0.1:{port}",
    ):
        refused = client.post("/jobs/1/cancel", headers={"Origin": other, "content-type": "text/plain"})
        assert refused.status_code == 403 and refused.json()["detail"].startswith("origin"), other
    plain = client.post("/generate", content=b'{"prompts": ["x"], "constitution": "harmless"}',
                        headers={"content-type": "text/plain"})  # fmt: skip
    assert plain.status_code == 415 and plain.json()["detail"].startswith("content-type")
    upload = client.post("/datasets/import", files={"file": ("p.jsonl", "".join(hh_lines(2)))})
    assert upload.status_code == 403 and upload.json()["detail"].startswith("x-requested-by")
    allowed = client.post(
        "/datasets/import", files={"file": ("p.jsonl", "".join(hh_lines(2)))}, headers={"X-Requested-By": "t"}
    )
    assert allowed.status_code == 201, allowed.text


def test_the_prompt_count_is_checked_before_any_prompt(client, db):
    # 10,001 prompts that are all invalid: the count is what is reported, not 10,001 errors.
    response = client.post(
        "/generate", json={"prompts": [{"bad": i} for i in range(10_001)], "constitution": "x"}
    )
    assert response.status_code == 413 and response.json()["detail"].startswith("prompts: 10001 prompts")
    assert count(db, GenerationJob) == 0


# --- constitutions ---------------------------------------------------------------------------------

GOOD = "principles:\n  - id: kind\n    critique: Was it unkind?\n    revision: Rewrite it kindly.\n"


@pytest.mark.parametrize(
    ("text", "status", "start"),
    [
        ("a: [" * 40 + "]" * 40, 422, "body: nested deeper than 32"),  # no RecursionError
        ("x: &a [1]\n" + "".join(f"y{i}: [*a, *a]\n" for i in range(70)), 422, "body: more than 64 YAML"),
        ("principles: []\n", 422, "principles"),
        ("principles:\n  - id: a\n    critique: c\n", 422, "principles.0.revision"),
    ],
)
def test_bad_constitutions_are_4xx_naming_the_field(client, settings, text, status, start):
    response = client.put("/constitutions/fresh", content=text, headers=YAML)
    assert response.status_code == status, response.text
    assert response.json()["detail"].startswith(start), response.json()["detail"]
    assert not (settings.constitutions_dir / "fresh.yaml").exists()


def test_an_error_names_its_line(client):
    text = "description: ok\nprinciples:\n  - id: kind\n    critique: ''\n    revision: r\n"
    body = client.put("/constitutions/lined", content=text, headers=YAML).json()
    assert body["field"] == "principles.0.critique" and body["line"] == 4 and body["file"] == "lined.yaml"


def test_a_constitution_too_large_is_refused_before_it_is_read(client, settings):
    huge = "description: " + "x" * (settings.max_constitution_bytes + 10)
    response = client.put("/constitutions/big", content=huge, headers=YAML)
    assert response.status_code == 413


@pytest.mark.parametrize("name", ["harmless%0A", "Harmless", "-x", "a" * 65])
def test_names_must_match_whole(client, name):
    assert client.put(f"/constitutions/{name}", content=GOOD, headers=YAML).status_code in (404, 422)


def test_if_match_stops_a_lost_update_and_versions_can_be_restored(client, settings):
    first = client.put("/constitutions/edited", content=GOOD, headers=YAML).json()["version"]
    path = settings.constitutions_dir / "edited.yaml"
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    second_text = GOOD.replace("kindly", "gently")
    second = client.put(
        "/constitutions/edited", content=second_text, headers=YAML | {"If-Match": f'"{first}"'}
    ).json()["version"]
    stale = client.put("/constitutions/edited", content=GOOD + "# mine\n", headers=YAML | {"If-Match": first})
    assert stale.status_code == 409 and second in stale.json()["detail"]
    assert path.read_text() == second_text  # the other editor's save stands
    old = client.get(f"/constitutions/edited/versions/{first[:8]}").json()
    assert old["version"] == first and old["body"] == GOOD
    restored = client.post(f"/constitutions/edited/versions/{first}/restore").json()
    assert restored["version"] == first and path.read_text() == GOOD
    assert client.get("/constitutions/edited/versions/deadbeef").status_code == 404


# --- imports ---------------------------------------------------------------------------------------


def test_a_retried_import_with_its_idempotency_key_adds_nothing(client, db):
    lines = "".join(hh_lines(5))
    headers = {"content-type": "application/x-ndjson", "Idempotency-Key": "upload-1"}
    first = client.post("/datasets/import", content=lines, headers=headers)
    again = client.post("/datasets/import", content=lines, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json() and count(db, Pair) == 5 and count(db, DatasetImport) == 1
    other = client.post("/datasets/import", content="".join(hh_lines(6)), headers=headers)
    assert other.status_code == 409 and count(db, Pair) == 5


def test_import_caps_rows_and_fields(client, settings, db, api_server):
    api_server.app.state.settings = settings.model_copy(update={"max_import_rows": 3})
    headers = {"content-type": "application/x-ndjson"}
    too_many = client.post("/datasets/import", content="".join(hh_lines(4)), headers=headers)
    assert too_many.status_code == 413 and "CAI_MAX_IMPORT_ROWS" in too_many.json()["detail"]
    long_row = (
        '{"prompt": "q", "chosen": "' + "x" * (settings.max_import_field_chars + 1) + '", "rejected": "r"}\n'
    )
    too_long = client.post("/datasets/import", content=long_row, headers=headers)
    assert too_long.status_code == 422 and too_long.json()["detail"].startswith("line 1: chosen")
    assert count(db, Pair) == 0


def test_a_full_export_pool_answers_429_at_once_and_every_other_route_keeps_answering(settings, db):
    """A request that waited for an export slot held a server thread: 44 of them stalled /health
    for 27 s. Now a request finding every slot taken is refused at once, holding nothing."""
    with server(settings, api_keys=KEYS, export_concurrency=2) as (running, http):
        slots = running.app.state.export_slots
        assert slots.acquire(blocking=False) and slots.acquire(blocking=False)  # two exports in flight
        try:
            with ThreadPoolExecutor(max_workers=48) as pool:
                waiting = [
                    pool.submit(http.get, "/export", headers=bearer("r-secret-0000000000")) for _ in range(48)
                ]
                health = http.get("/health")
                jobs = http.get("/jobs", headers=bearer("r-secret-0000000000"))
                answers = [f.result() for f in waiting]
            assert health.status_code == 200 and jobs.status_code == 200
            assert {a.status_code for a in answers} == {429}
            assert all(a.headers["Retry-After"].isdigit() for a in answers)
            assert answers[0].json()["errors"][0]["field"] == "export"
        finally:
            slots.release()
            slots.release()
        assert http.get("/export", headers=bearer("r-secret-0000000000")).status_code == 200


def test_the_audit_log_keeps_a_bounded_escaped_route_for_every_refusal(settings, db):
    admin = bearer("a-secret-0000000000")
    with server(settings, api_keys=KEYS) as (_, http):
        assert http.post("/" + "a" * 60_000).status_code == 401
        assert http.put("/constitutions/x%00y", content="a: b", headers=YAML | admin).status_code == 422
        assert http.delete("/train/policies/x%00y", headers=admin).status_code in (404, 422)
        assert http.post("/generate%00", json={}, headers=admin).status_code == 404
        rows = http.get("/audit", params={"limit": 10}, headers=admin).json()
    routes = {(row["method"], row["route"]) for row in rows}
    assert all(len(row["route"]) <= 200 for row in rows)
    assert ("POST", "/" + "a" * 198 + "…") in routes  # a path that reached no route, cut short
    assert ("PUT", "/constitutions/{name}") in routes and ("DELETE", "/train/policies/{name}") in routes
    assert ("POST", "/generate\\x00") in routes  # escaped: PostgreSQL text holds no NUL
    put = next(row for row in rows if row["route"] == "/constitutions/{name}")
    assert put["ids"] == {"name": "x\\x00y"}


def test_a_client_refused_too_often_gets_429_and_writes_no_more_audit_rows(settings, db):
    with server(settings, api_keys=KEYS, refusals_per_minute=3) as (_, http):
        answers = [http.post("/generate", json={}) for _ in range(6)]
        assert [a.status_code for a in answers] == [401, 401, 401, 429, 429, 429]
        assert int(answers[-1].headers["Retry-After"]) >= 1
        # A valid key is not slowed by its own earlier refusals' budget.
        assert http.get("/jobs", headers=bearer("r-secret-0000000000")).status_code == 200
        rows = http.get("/audit", headers=bearer("a-secret-0000000000")).json()
    assert [row["status"] for row in rows if row["route"] == "/generate"] == [401, 401, 401]


def test_every_field_that_names_a_model_takes_only_what_the_server_offers(settings, db, tmp_path):
    root = tmp_path / "models-root"
    (root / "rm").mkdir(parents=True)
    (root / "rm" / "config.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (root / "escape").symlink_to(outside)  # a link inside a root that leads out of it
    generate = {"prompts": ["hi"], "constitution": "harmless", "mode": "best_of_n", "n": 2}
    hostile = [
        "/etc",
        "/root/.ssh",
        "../../../../etc/passwd",
        "/proc/self/cwd/../..",
        str(outside),
        str(root / "escape"),
        str(root / "rm" / ".." / ".." / "outside"),
        "http://169.254.169.254/latest/meta-data",
        "train:abc",
    ]
    with server(settings, model_roots=str(root)) as (_, http):
        for spec in hostile:
            sent = [
                (
                    "POST",
                    "/generate",
                    generate | {"scorer": {"kind": "reward_model", "model": spec}},
                    "scorer.model",
                ),
                ("POST", "/generate", generate | {"mode": "revise", "model": spec}, "model"),
                (
                    "POST",
                    "/train",
                    {"evaluation": {"judge": {"kind": "judge", "model": spec}}},
                    "evaluation.judge.model",
                ),
                ("POST", "/train", {"base_model": spec}, "base_model"),
                ("PUT", "/train/policies/harmless", {"min_new_pairs": 5, "base_model": spec}, "base_model"),
                (
                    "PUT",
                    "/train/policies/harmless",
                    {
                        "min_new_pairs": 5,
                        "params": {"evaluation": {"judge": {"kind": "judge", "model": spec}}},
                    },
                    "params.evaluation.judge.model",
                ),
                ("POST", "/train/1/evaluate", {"judge": {"kind": "judge", "model": spec}}, "judge.model"),
            ]
            for method, path, body, field in sent:
                answer = http.request(method, path, json=body)
                assert answer.status_code == 422, (method, path, spec, answer.text)
                assert answer.json()["errors"][0]["field"] == field, (path, spec, answer.text)
                # The same words whether the path exists or not: nothing to learn about the disk.
                assert "config.json" not in answer.text or spec == "train:abc", answer.text
        for path in ("../../etc/passwd", "a/b"):
            answer = http.put(
                "/train/policies/harmless",
                json={"min_new_pairs": 5, "params": {"evaluation": {"constitution": path}}},
            )
            assert (
                answer.status_code == 422
                and answer.json()["errors"][0]["field"] == "params.evaluation.constitution"
            )
        # A folder under a root is a model the server offers.
        ok = http.post(
            "/generate", json=generate | {"scorer": {"kind": "reward_model", "model": str(root / "rm")}}
        )
        assert ok.status_code == 202, ok.text
        (root / "empty").mkdir()
        no_config = http.post(
            "/generate", json=generate | {"scorer": {"kind": "reward_model", "model": str(root / "empty")}}
        )
        assert no_config.status_code == 422 and "config.json" in no_config.text


def test_deep_json_and_yaml_aliases_that_expand_get_a_4xx_naming_the_field(settings, db):
    deep = "[" * 900 + "]" * 900
    body = '{"prompts": ["hi"], "constitution": "harmless", "metadata": {"a": ' + deep + "}}"
    anchor = "x" * 1900
    expanding = (
        f"description: &d '{anchor}'\n"
        + "notes: ["
        + ", ".join("*d" for _ in range(60))
        + "]\n"
        + "principles:\n  - id: a\n    critique: c\n    revision: r\n"
    )
    with server(settings, max_constitution_bytes=65_536) as (_, http):
        answer = http.post("/generate", content=body, headers=JSON)
        assert answer.status_code == 422, answer.text  # was a 500 (serialisation depth)
        assert answer.json()["errors"][0]["field"].startswith("metadata") and "nested" in answer.text
        assert len(expanding) < 65_536
        answer = http.put("/constitutions/expanding", content=expanding, headers=YAML)
        assert answer.status_code == 422 and "expand" in answer.text, answer.text
        assert answer.json()["errors"][0]["field"] == "body"
        # The console's upload of a JSON file nested past the parser's stack: a 422 page.
        token = re.search(r'name="csrf_token" value="([^"]+)"', http.get("/ui/jobs").text).group(1)
        upload = http.post(
            "/ui/generate",
            data={"constitution": "harmless", "csrf_token": token},
            files={"file": ("prompts.json", ("[" * 100_000 + "]" * 100_000).encode(), "application/json")},
        )
        assert upload.status_code == 422 and "nested too deeply" in upload.text


def test_a_client_that_hangs_up_mid_body_is_an_info_line_not_a_traceback(settings, db, caplog):
    """`/datasets/import` reads its body as a stream: a client gone mid-body logged a 65-line
    traceback at ERROR."""
    caplog.set_level(logging.INFO)
    with server(settings) as (running, http):
        port = int(running.url.rsplit(":", 1)[1])
        for path, content_type in (
            ("/generate", "application/json"),
            ("/datasets/import", "application/x-ndjson"),
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                    "X-Requested-By: t\r\nContent-Length: 100000\r\n\r\n".encode()
                    + b'{"prompts": ["a'
                )
        deadline = time.monotonic() + 10
        while not any("/datasets/import: the client disconnected" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records][-5:]
            time.sleep(0.05)
        assert http.get("/health").status_code == 200
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
