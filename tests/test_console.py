"""The console (`/ui`) and human review over HTTP, without a browser: pages, the login session, CSRF,
scopes, escaping, the review API and `review=` filters, the constitution editor's endpoints.

The browser tests are in test_console_browser.py; these are the cheap ones (`unit`, `db`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from app.access import route_access, undeclared_routes
from app.main import create_app
from app.routes import workers as worker_routes
from app.ui.auth import CSRF_COOKIE, SESSION_COOKIE, ConsoleAuth
from app.ui.router import router as console_router
from app.ui.text_diff import diff_stats, line_diff, word_diff
from cai_dpo.core.api_keys import KeyRing
from cai_dpo.core.db import session_scope
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.pair_flags import FLAGS
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.tables import ConstitutionVersion, GenerationJob, Pair, PairReview, TrainingJob
from tests.fixtures.api import ServerThread
from tests.helpers import free_port, insert_pairs

UI = Path(__file__).resolve().parents[1] / "app" / "ui"
ADMIN, READER, REVIEWER = "admin-secret-0001", "reader-secret-0001", "reviewer-secret-01"
KEYS = f"admin:read+generate+train+review+admin:{ADMIN},reader:read:{READER},reviewer:read+review:{REVIEWER}"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
NEW_CONSTITUTION_TEXT = """description: A probe's constitution.
principles:
  - id: only
    critique: Point out what is wrong with your last answer.
    revision: Rewrite your answer without it.
"""


# --- pure parts -----------------------------------------------------------------------------------


@pytest.mark.unit
def test_word_diff_marks_words_and_joins_back_to_both_texts():
    old, new = "I can't help you hack wifi.", "I can't help with that, but ask your neighbour."
    segments = word_diff(old, new)
    assert "".join(t for op, t in segments if op != "insert") == old
    assert "".join(t for op, t in segments if op != "delete") == new
    assert ("equal", "I can't help ") in segments
    # Changes a space or a short word apart read as one: not "you|with hack|that, wifi|but ...".
    assert ("delete", "you hack wifi") in segments and (
        "insert",
        "with that, but ask your neighbour",
    ) in segments
    assert diff_stats(segments) == {"delete": 3, "insert": 6}
    assert word_diff("a " * 30_000, "b") is None  # too long: shown without a diff
    assert line_diff("a\nb\nc\n", "a\nB\nc\n") == [
        ("hunk", "@@ -1,3 +1,3 @@"),
        ("equal", "a"),
        ("delete", "b"),
        ("insert", "B"),
        ("equal", "c"),
    ]


@pytest.mark.unit
def test_sessions_are_signed_bound_to_the_key_and_expire():
    ring = KeyRing(KEYS, None)
    auth = ConsoleAuth("s" * 32, ring)
    admin = ring.find(ADMIN)
    cookie = auth.new_session(admin, now=1000.0)
    assert auth.session_key(cookie, now=1000.0) == admin
    assert ADMIN not in cookie and admin.digest not in cookie  # no secret in the cookie
    assert auth.session_key(cookie, now=1000.0 + 13 * 3600) is None  # expired after 12 h
    payload, signature = cookie.split(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    assert auth.session_key(f"{forged}.{signature}", now=1000.0) is None
    assert ConsoleAuth("t" * 32, ring).session_key(cookie, now=1000.0) is None  # another secret
    # The same name with another secret (a rotated key) ends the session.
    rotated = ConsoleAuth("s" * 32, KeyRing(f"admin:read:{'x' * 20}", None))
    assert rotated.session_key(cookie, now=1000.0) is None
    assert auth.csrf_ok("cookie", cookie, auth.csrf_token("cookie", cookie))
    assert not auth.csrf_ok("cookie", cookie, auth.csrf_token("other", cookie))
    assert not auth.csrf_ok(None, cookie, "x")
    # The token is bound to the session: one minted without it (or for another) is refused.
    assert not auth.csrf_ok("cookie", cookie, auth.csrf_token("cookie"))
    other = auth.new_session(admin, now=1000.0)
    assert not auth.csrf_ok("cookie", cookie, auth.csrf_token("cookie", other))


def scope_of(app, method: str, path: str) -> str | None:
    """The scope the Guard asks of this request: that of the route it reaches."""
    request = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b""}
    return route_access(app.routes, request).scope


@pytest.mark.unit
def test_the_console_takes_the_scopes_of_the_api_routes_it_stands_for():
    app = create_app(migrate=False)
    assert scope_of(app, "GET", "/ui/pairs/3") == "read"
    assert scope_of(app, "POST", "/ui/generate") == scope_of(app, "POST", "/generate") == "generate"
    assert scope_of(app, "POST", "/ui/jobs/3/retry") == "generate"
    assert scope_of(app, "POST", "/ui/pairs/3/review") == scope_of(app, "POST", "/pairs/3/review")
    assert scope_of(app, "POST", "/pairs/3/review") == "review"
    assert scope_of(app, "POST", "/ui/train") == scope_of(app, "POST", "/train/4/cancel") == "train"
    assert scope_of(app, "POST", "/ui/constitutions/harmless") == "admin"  # a save, as PUT
    assert scope_of(app, "POST", "/ui/constitutions/harmless/check") == "read"
    assert scope_of(app, "POST", "/ui/constitutions/harmless/try") == "generate"
    # The save route of constitutions named like the editor's own actions is still a save: the
    # scope comes from the route the request reaches, never from the shape of its path.
    assert scope_of(app, "POST", "/ui/constitutions/check") == "admin"
    assert scope_of(app, "POST", "/ui/constitutions/try") == "admin"
    for public in ("/ui/login", "/ui/logout", "/ui/static/console.js", "/health"):
        assert scope_of(app, "POST" if "log" in public else "GET", public) is None
    assert scope_of(app, "GET", "/audit") == scope_of(app, "GET", "/keys") == "admin"
    assert scope_of(app, "GET", "/openapi.json") == scope_of(app, "GET", "/no-such-route") == "read"


@pytest.mark.unit
def test_a_route_that_declares_no_access_stops_the_app_from_starting():
    assert undeclared_routes(create_app(migrate=False).routes) == []
    worker_routes.router.add_api_route("/undeclared", lambda: None, methods=["POST"])
    try:
        with pytest.raises(RuntimeError, match="POST /workers/undeclared"):
            create_app(migrate=False)
    finally:
        worker_routes.router.routes.pop()


@pytest.mark.unit
def test_every_console_post_checks_the_csrf_token():
    posts = [r for r in console_router.routes if "POST" in getattr(r, "methods", ())]
    assert len(posts) >= 10
    for route in posts:
        calls = {dep.call.__name__ for dep in route.dependant.dependencies}
        assert "console_form" in calls, route.path


@pytest.mark.unit
def test_assets_are_vendored_with_licenses_and_nothing_comes_from_elsewhere():
    vendor = UI / "static" / "vendor"
    readme = (vendor / "README.md").read_text()
    for line in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M):
        digest, name = line
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
        assert (vendor / name).parent.joinpath("LICENSE").is_file()
    for template in (UI / "templates").glob("*.html"):
        text = template.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), template.name
        assert "<script>" not in text and " on" + "click=" not in text, template.name  # CSP: no inline code


# --- the review API -------------------------------------------------------------------------------


def export_rows(client: httpx.Client, **params) -> list[dict]:
    text = client.get("/export", params={"style": "standard", **params}).text
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.db
def test_reviews_are_versions_and_exports_take_the_latest_edit(client, db):
    insert_pairs(db, 4, flagged_extra=False)
    approved = client.post("/pairs/1/review", json={"status": "approved"})
    assert approved.status_code == 201, approved.text
    assert approved.json()["review"] == "approved" and approved.json()["reviews"][0]["reviewer"] == "local"
    client.post("/pairs/2/review", json={"status": "rejected"})
    edit = client.post("/pairs/3/review", json={"status": "approved", "chosen": "a better answer"})
    assert edit.json()["chosen"] == "chosen 3" and edit.json()["reviewed_chosen"] == "a better answer"
    # A later approve keeps the edit in force; a reject without text is a new version too.
    again = client.post("/pairs/3/review", json={"status": "approved"}).json()
    assert [(r["version"], r["edited"]) for r in again["reviews"]] == [(1, True), (2, False)]
    assert again["reviews"][-1]["chosen"] == "a better answer"

    rows = {row["prompt"]: row for row in export_rows(client, review="approved")}
    assert sorted(rows) == ["prompt 1", "prompt 3"]
    assert rows["prompt 3"]["chosen"] == "a better answer" and rows["prompt 1"]["chosen"] == "chosen 1"
    assert [r["prompt"] for r in export_rows(client, review="unreviewed")] == ["prompt 4"]
    assert [r["prompt"] for r in export_rows(client, review="rejected")] == ["prompt 2"]
    assert len(export_rows(client)) == 4  # review=any, the default
    with_meta = export_rows(client, review="approved", metadata=True)
    assert {r["review"] for r in with_meta} == {"approved"}
    listed = client.get("/pairs", params={"review": "approved"}).json()["items"]
    assert [(p["id"], p["review"]) for p in listed] == [(1, "approved"), (3, "approved")]

    with session_scope(db) as session:  # the generated text is never overwritten
        assert session.get(Pair, 3).chosen == "chosen 3"
        assert (
            session.scalar(select(PairReview.version).where(PairReview.latest, PairReview.pair_id == 3)) == 2
        )
    with session_scope(db) as session:  # a training dataset reads the edit, and writes nothing
        ids = pair_queries.pair_ids(session, PairFilter(review="approved"))
        assert [p.chosen for p in pair_queries.pairs_by_ids(session, ids)] == ["chosen 1", "a better answer"]
    with session_scope(db) as session:
        assert session.get(Pair, 3).chosen == "chosen 3"

    undone = client.post("/pairs/3/review", json={"status": "approved", "chosen": "chosen 3"}).json()
    assert undone["reviewed_chosen"] is None and undone["reviews"][-1]["edited"]  # back to the generated


@pytest.mark.db
def test_bad_reviews_are_refused_naming_the_field(client, db):
    insert_pairs(db, 1, flagged_extra=False)
    assert (
        client.post("/pairs/99/review", json={"status": "approved"}).json()["detail"].startswith("pair_id:")
    )
    for body, field in [
        ({"status": "maybe"}, "status"),
        ({"status": "rejected", "chosen": "x"}, "chosen"),
        ({"status": "approved", "chosen": "  "}, "chosen"),
        ({"status": "approved", "chosen": "nul\x00"}, "chosen"),
        ({"status": "approved", "extra": 1}, "extra"),
    ]:
        response = client.post("/pairs/1/review", json=body)
        assert response.status_code == 422 and response.json()["detail"].startswith(f"{field}:"), (
            response.text
        )
    assert client.post("/pairs/1/review").json()["detail"].startswith("body:")
    assert client.get("/export", params={"review": "maybe"}).json()["detail"].startswith("review:")


@pytest.mark.db
def test_a_training_dataset_takes_the_review_filter(client, db):
    insert_pairs(db, 3, flagged_extra=False)
    assert client.post("/train", json={"dataset": {"review": "approved"}, "max_steps": 1}).status_code == 409
    client.post("/pairs/2/review", json={"status": "approved"})
    started = client.post("/train", json={"dataset": {"review": "approved"}, "max_steps": 1})
    assert started.status_code == 202
    assert client.get(f"/train/{started.json()['train_id']}").json()["dataset"] == {"review": "approved"}


# --- the console over HTTP ------------------------------------------------------------------------


def csrf(page: httpx.Response | str) -> str:
    text = page if isinstance(page, str) else page.text
    found = TOKEN.search(text)
    assert found, text[:500]
    return found.group(1)


@pytest.fixture
def keyed(settings, db):
    """The app with three keys (admin, read-only, read+review), over HTTP."""
    with ServerThread(
        create_app(settings.model_copy(update={"api_keys": KEYS}), migrate=False), free_port()
    ) as s:
        yield s


def logged_in(server: ServerThread, key: str) -> httpx.Client:
    http = httpx.Client(base_url=server.url, timeout=30)
    login = http.get("/ui/login")
    response = http.post("/ui/login", data={"key": key, "next": "/ui/pairs", "csrf_token": csrf(login)})
    assert response.status_code == 303 and response.headers["location"] == "/ui/pairs", response.text
    return http


@pytest.mark.db
def test_every_page_renders_and_model_text_is_escaped(client, db, settings):
    insert_pairs(db, 2, flagged_extra=False)
    with session_scope(db) as session:
        session.execute(
            update(Pair).where(Pair.id == 2).values(chosen="<script>alert('x')</script> & <b>bold</b>")
        )
    train_id = client.post("/train", json={"max_steps": 2}).json()["train_id"]
    job_id = client.post(
        "/generate", json={"prompts": ["<img src=x onerror=alert(1)>"], "constitution": "harmless"}
    )
    job_id = job_id.json()["job_id"]
    assert client.get("/ui", follow_redirects=True).url.path == "/ui/jobs"
    for path in (
        "/ui/jobs",
        f"/ui/jobs/{job_id}",
        "/ui/pairs",
        "/ui/pairs?review=unreviewed&include_flagged=on",
        "/ui/pairs/2",
        "/ui/constitutions",
        "/ui/constitutions/harmless",
        "/ui/constitutions/brand-new",
        "/ui/train",
        f"/ui/train/{train_id}",
        "/ui/workers",
    ):
        response = client.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "<script>alert" not in response.text and "<img src=x" not in response.text, path
    page = client.get("/ui/pairs/2").text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert client.get(f"/ui/train/{train_id}/metrics.json").json() == []
    assert client.get("/ui/pairs/999").status_code == 404
    assert client.get("/ui/pairs?min_margin=abc").text.count("min_margin:") == 1
    static = client.get("/ui/static/vendor/htmx-2.0.11/htmx.min.js")
    assert static.status_code == 200 and "javascript" in static.headers["content-type"]


@pytest.mark.db
def test_a_runs_charts_draw_the_metrics_its_objective_logs(client, db):
    insert_pairs(db, 4)
    expected = {
        "dpo": {"accuracy": ["rewards/accuracies"], "logps": ["logps/chosen", "logps/rejected"]},
        "sft": {"logps": ["logps/chosen"]},
        "reward_model": {"accuracy": ["accuracy"], "margins": ["margin"]},
    }
    for objective, charts in expected.items():
        train_id = client.post("/train", json={"objective": objective}).json()["train_id"]
        page = client.get(f"/ui/train/{train_id}").text
        drawn = dict(re.findall(r'data-chart="(\w+)" data-series=\'(\[[^\']*\])\'', page))
        for chart, series in charts.items():
            assert json.loads(drawn[chart]) == series, (objective, chart)
        assert ("accuracy" in drawn) == (objective != "sft"), objective  # SFT logs no rewards


@pytest.mark.db
def test_pairs_pages_back_and_forth_with_the_filter(client, db):
    insert_pairs(db, 120, flagged_extra=False)
    first = client.get("/ui/pairs", params={"source": "test"}).text
    ids = [int(i) for i in re.findall(r'data-pair="(\d+)"', first)]
    assert ids == list(range(1, 51)) and 'rel="prev"' not in first
    after = re.search(r'href="(/ui/pairs\?[^"]*after=50[^"]*)" rel="next"', first).group(1)
    second = client.get(after.replace("&amp;", "&")).text
    assert [int(i) for i in re.findall(r'data-pair="(\d+)"', second)] == list(range(51, 101))
    before = re.search(r'href="(/ui/pairs\?[^"]*before=51[^"]*)" rel="prev"', second).group(1)
    assert [
        int(i) for i in re.findall(r'data-pair="(\d+)"', client.get(before.replace("&amp;", "&")).text)
    ] == ids
    detail = client.get("/ui/pairs/51", params={"source": "test"}).text
    assert 'href="/ui/pairs/50?source=test" data-key="k"' in detail
    assert 'href="/ui/pairs/52?source=test" data-key="j"' in detail


@pytest.mark.db
def test_pairs_pages_say_what_each_flag_means(client, db):
    insert_pairs(db, 1)  # and pair 2, flagged `unchanged`
    page = client.get("/ui/pairs", params={"include_flagged": "on"}).text
    assert '<span class="flag" title="The revision is the first answer again' in page
    legend = page[page.index("What the flags mean") :]
    assert all(f'<span class="flag">{flag}</span>' in legend for flag in FLAGS)
    assert 'title="The revision is the first answer again' in client.get("/ui/pairs/2").text


@pytest.mark.db
def test_login_session_csrf_and_scopes(keyed, db):
    insert_pairs(db, 1, flagged_extra=False)
    with httpx.Client(base_url=keyed.url) as anonymous:
        redirect = anonymous.get("/ui/pairs/1?review=any")
        assert redirect.status_code == 303
        assert redirect.headers["location"] == "/ui/login?next=%2Fui%2Fpairs%2F1%3Freview%3Dany"
        assert anonymous.get("/ui/static/console.css").status_code == 200  # assets need no key
        polled = anonymous.get(
            "/ui/jobs", headers={"HX-Request": "true", "HX-Current-URL": "http://x/ui/jobs"}
        )
        assert polled.status_code == 401 and polled.headers["hx-redirect"] == "/ui/login?next=%2Fui%2Fjobs"
        page = anonymous.get("/ui/login")
        wrong = anonymous.post("/ui/login", data={"key": "nope", "csrf_token": csrf(page)})
        assert wrong.status_code == 401 and "not a valid API key" in wrong.text
        no_token = anonymous.post("/ui/login", data={"key": ADMIN})
        assert no_token.status_code == 403 and "csrf_token" in no_token.text
    # Bearer keys work on the console too.
    assert httpx.get(f"{keyed.url}/ui/jobs", headers={"Authorization": f"Bearer {READER}"}).status_code == 200

    reader = logged_in(keyed, READER)
    cookie = next(c for c in reader.cookies.jar if c.name == SESSION_COOKIE)
    assert cookie.path == "/ui" and cookie.has_nonstandard_attr("HttpOnly")
    assert cookie.get_nonstandard_attr("SameSite") in ("Strict", "strict")
    assert reader.get("/ui/pairs/1").status_code == 200
    assert reader.get("/pairs/1").status_code == 401  # the session is the console's only
    read_only = reader.get("/ui/pairs/1").text
    assert 'data-key="a" class="good" disabled title="your key lacks the review scope"' in read_only
    token = csrf(read_only)
    refused = reader.post("/ui/pairs/1/review", data={"status": "approved", "csrf_token": token})
    assert refused.status_code == 403 and "lacks the &#x27;review&#x27; scope" in refused.text

    reviewer = logged_in(keyed, REVIEWER)
    token = csrf(reviewer.get("/ui/pairs/1"))
    for missing in ({}, {"csrf_token": "forged"}):
        response = reviewer.post("/ui/pairs/1/review", data={"status": "approved", **missing})
        assert response.status_code == 403 and "csrf_token" in response.text
    bad_header = reviewer.post(
        "/ui/pairs/1/review", data={"status": "approved"}, headers={"X-CSRF-Token": "x"}
    )
    assert bad_header.status_code == 403
    done = reviewer.post("/ui/pairs/1/review", data={"status": "approved", "csrf_token": token})
    assert done.status_code == 303
    by_header = reviewer.post(
        "/ui/pairs/1/review",
        data={"status": "approved", "chosen": "edited"},
        headers={"X-CSRF-Token": token, "HX-Request": "true"},
    )
    assert by_header.status_code == 200 and "edited by reviewer" in by_header.text
    no_generate = reviewer.post(
        "/ui/generate", data={"prompts": "hi", "constitution": "harmless", "csrf_token": token}
    )
    assert no_generate.status_code == 403
    with session_scope(db) as session:
        reviews = session.scalars(select(PairReview).order_by(PairReview.version)).all()
        assert [(r.reviewer, r.status, r.chosen_text) for r in reviews] == [
            ("reviewer", "approved", None),
            ("reviewer", "approved", "edited"),
        ]
    audit = httpx.get(f"{keyed.url}/audit", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    reviews = [(e["key_name"], e["route"], e["status"]) for e in audit if "review" in e["route"]]
    assert ("reviewer", "/ui/pairs/{pair_id}/review", 303) in reviews
    assert ("reader", "/ui/pairs/{pair_id}/review", 403) in reviews  # refused before routing: its template
    logout = reviewer.post("/ui/logout", data={"csrf_token": token})
    assert logout.status_code == 303 and reviewer.get("/ui/jobs").status_code == 303
    # A CSRF token belongs to its browser's cookie: another browser's is refused.
    other = logged_in(keyed, ADMIN)
    assert (
        other.post("/ui/pairs/1/review", data={"status": "rejected", "csrf_token": token}).status_code == 403
    )
    assert CSRF_COOKIE in {c.name for c in other.cookies.jar}


@pytest.mark.db
def test_submit_form_creates_a_job_and_names_bad_fields(client, db):
    token = csrf(client.get("/ui/jobs"))
    upload = "\n".join(json.dumps(p) for p in ["from a file", {"prompt": "an object"}])
    response = client.post(
        "/ui/generate",
        data={
            "csrf_token": token,
            "prompts": "pasted one\n\npasted two",
            "constitution": "harmless",
            "revisions": "2",
            "mode": "revise",
            "temperature": "0.5",
            "max_tokens": "40",
            "max_generated_tokens": "5000",
            "idempotency_key": "form-1",
        },
        files={"file": ("prompts.jsonl", upload.encode(), "application/x-ndjson")},
    )
    assert response.status_code == 303, response.text
    job_id = int(response.headers["location"].rsplit("/", 1)[1])
    job = client.get(f"/jobs/{job_id}").json()
    assert job["n_prompts"] == 4 and job["revisions"] == 2
    assert job["sampling"]["temperature"] == 0.5 and job["sampling"]["max_tokens"] == 40
    assert job["usage"]["max_generated_tokens"] == 5000  # the form's budget field
    bad = client.post(
        "/ui/generate",
        data={"csrf_token": token, "prompts": "x", "constitution": "harmless", "temperature": "9"},
        headers={"HX-Request": "true"},
    )
    assert bad.status_code == 422 and "sampling.temperature:" in bad.text
    assert bad.headers["hx-retarget"] == "#submit-result"
    best_of_n = client.post(
        "/ui/generate",
        data={"csrf_token": token, "prompts": "x", "constitution": "harmless", "mode": "best_of_n", "n": "3"},
    )
    assert best_of_n.status_code == 422 and "scorer" in best_of_n.text
    with session_scope(db) as session:
        assert session.scalar(select(GenerationJob.id).order_by(GenerationJob.id.desc())) == job_id


@pytest.mark.db
def test_constitution_editor_checks_saves_with_if_match_and_tries(client, db, settings):
    page = client.get("/ui/constitutions/harmless").text
    token, if_match = csrf_and_if_match(page)
    original = (settings.constitutions_dir / "harmless.yaml").read_text()
    broken = original.replace("principles:", "principles: 3\nx:", 1)
    check = client.post("/ui/constitutions/harmless/check", data={"body": broken, "csrf_token": token})
    line = original[: original.index("principles:")].count("\n") + 1
    assert f'data-line="{line}"' in check.text and f"Line {line}" in check.text
    refused = client.post(
        "/ui/constitutions/harmless", data={"body": broken, "if_match": if_match, "csrf_token": token}
    )
    assert refused.status_code == 422 and f"Line {line}" in refused.text
    edited = original.replace("revisions: 1", "revisions: 2", 1)
    saved = client.post(
        "/ui/constitutions/harmless", data={"body": edited, "if_match": if_match, "csrf_token": token}
    )
    assert saved.status_code == 200 and "Saved" in saved.text
    assert (settings.constitutions_dir / "harmless.yaml").read_text() == edited
    stale = client.post(
        "/ui/constitutions/harmless", data={"body": original, "if_match": if_match, "csrf_token": token}
    )
    assert stale.status_code == 409 and "reload" in stale.text
    new_version = hashlib.sha256(edited.encode()).hexdigest()
    old_version = hashlib.sha256(original.encode()).hexdigest()
    diff = client.get("/ui/constitutions/harmless/diff", params={"a": old_version, "b": new_version}).text
    assert (
        '<span class="d-delete">-revisions: 1</span>' in diff
        and '<span class="d-insert">+revisions: 2</span>' in diff
    )

    draft = edited.replace("revisions: 2", "revisions: 3", 1)
    tried = client.post(
        "/ui/constitutions/harmless/try",
        data={"body": draft, "prompt": "How do I pick a lock?", "max_tokens": "32", "csrf_token": token},
    )
    assert tried.status_code == 200 and 'hx-trigger="every 1s"' in tried.text
    assert (settings.constitutions_dir / "harmless.yaml").read_text() == edited  # the file is untouched
    with session_scope(db) as session:
        job = session.scalars(select(GenerationJob).order_by(GenerationJob.id.desc())).first()
        version = session.get(ConstitutionVersion, job.constitution_version_id)
        assert (version.name, version.body, job.revisions) == ("try:harmless", draft, 3)
        assert job.constitution_name == "try:harmless" and job.job_metadata == {"console_try": "harmless"}
    history = client.get("/constitutions/harmless").json()["versions"]
    assert hashlib.sha256(draft.encode()).hexdigest() not in {v["version"] for v in history}
    no_prompt = client.post("/ui/constitutions/harmless/try", data={"body": draft, "csrf_token": token})
    assert no_prompt.status_code == 422 and "prompt:" in no_prompt.text


def csrf_and_if_match(page: str) -> tuple[str, str]:
    return TOKEN.search(page).group(1), re.search(r'id="if-match" value="([0-9a-f]*)"', page).group(1)


@pytest.mark.db
def test_training_form_starts_a_run_and_cancel_stops_it(client, db):
    insert_pairs(db, 3, flagged_extra=False)
    token = csrf(client.get("/ui/train"))
    started = client.post(
        "/ui/train",
        data={
            "csrf_token": token,
            "constitution": "harmless",
            "review": "any",
            "max_steps": "2",
            "lora_r": "4",
        },
    )
    assert started.status_code == 303, started.text
    train_id = int(started.headers["location"].rsplit("/", 1)[1])
    run = client.get(f"/train/{train_id}").json()
    assert run["dataset"] == {"constitution": "harmless"} and run["params"]["lora"]["r"] == 4
    assert run["params"]["evaluate"] is False  # the box was not ticked
    bad = client.post("/ui/train", data={"csrf_token": token, "beta": "-1"})
    assert bad.status_code == 422 and "beta:" in bad.text
    # The objective select: a reward model, SFT then DPO; DPO's β beside a reward model is refused.
    for objective, params in (
        ("reward_model", {"objective": "reward_model"}),
        ("sft,dpo", {"stages": ["sft", "dpo"]}),
    ):
        form = {"csrf_token": token, "objective": objective, "loss_type": "sigmoid"}  # the select's default
        started = client.post("/ui/train", data=form)
        assert started.status_code == 303, started.text
        other_id = int(started.headers["location"].rsplit("/", 1)[1])
        assert params.items() <= client.get(f"/train/{other_id}").json()["params"].items()
        client.post(f"/ui/train/{other_id}/cancel", data={"csrf_token": token})
    bad = client.post("/ui/train", data={"csrf_token": token, "objective": "reward_model", "beta": "0.2"})
    assert bad.status_code == 422 and "beta is a DPO setting" in bad.text
    cancelled = client.post(f"/ui/train/{train_id}/cancel", data={"csrf_token": token})
    assert cancelled.status_code == 303
    with session_scope(db) as session:
        assert session.get(TrainingJob, train_id).status == "cancelled"


@pytest.mark.db
def test_constitutions_named_like_the_editors_actions_are_saved_only_with_admin(keyed, db, settings):
    """The probe's finding: `POST /ui/constitutions/check` is the *save* route of a constitution
    named `check`; a read key got `200 Saved` from it when scopes came from the path's shape."""
    yaml_text = NEW_CONSTITUTION_TEXT
    reader = logged_in(keyed, READER)
    token = csrf(reader.get("/ui/jobs"))
    for name in ("check", "try"):
        refused = reader.post(f"/ui/constitutions/{name}", data={"body": yaml_text, "csrf_token": token})
        assert refused.status_code == 403 and "lacks the &#x27;admin&#x27; scope" in refused.text, name
        assert not (settings.constitutions_dir / f"{name}.yaml").exists()
    reviewer = logged_in(keyed, REVIEWER)
    token = csrf(reviewer.get("/ui/jobs"))
    assert (
        reviewer.post("/ui/constitutions/try", data={"body": yaml_text, "csrf_token": token}).status_code
        == 403
    )
    # The editor's own check still answers a read key, and an admin still saves `check`.
    checked = reader.post(
        "/ui/constitutions/harmless/check",
        data={"body": yaml_text, "csrf_token": csrf(reader.get("/ui/jobs"))},
    )
    assert checked.status_code == 200
    admin = logged_in(keyed, ADMIN)
    saved = admin.post(
        "/ui/constitutions/check", data={"body": yaml_text, "csrf_token": csrf(admin.get("/ui/jobs"))}
    )
    assert saved.status_code == 200 and (settings.constitutions_dir / "check.yaml").exists()


@pytest.mark.db
def test_csrf_tokens_are_bound_to_the_session_and_posts_from_other_origins_are_refused(keyed, db, settings):
    admin = logged_in(keyed, ADMIN)
    own_token = csrf(admin.get("/ui/jobs"))
    form = {"body": NEW_CONSTITUTION_TEXT}
    # A CSRF cookie and token minted anonymously (the login page) are worth nothing beside the
    # admin's session: the token is an HMAC of both cookies.
    with httpx.Client(base_url=keyed.url) as anonymous:
        planted_token = csrf(anonymous.get("/ui/login"))
        planted_cookie = anonymous.cookies.get(CSRF_COOKIE)
    session_cookie = admin.cookies.get(SESSION_COOKIE)
    with httpx.Client(base_url=keyed.url) as attacker:
        attacker.cookies.set(SESSION_COOKIE, session_cookie, path="/ui")
        attacker.cookies.set(CSRF_COOKIE, planted_cookie, path="/ui")
        for carried in (
            {"data": form | {"csrf_token": planted_token}},
            {"data": form, "headers": {"X-CSRF-Token": planted_token}},
        ):
            response = attacker.post("/ui/constitutions/planted", **carried)
            assert response.status_code == 403 and "csrf_token" in response.text
    # With the right token, a post from another origin is still refused, in key mode too.
    crossed = admin.post(
        "/ui/constitutions/planted",
        data=form | {"csrf_token": own_token},
        headers={"Origin": "https://evil.example"},
    )
    assert crossed.status_code == 403 and "origin" in crossed.text
    assert not (settings.constitutions_dir / "planted.yaml").exists()
    own = admin.post(
        "/ui/constitutions/planted", data=form | {"csrf_token": own_token}, headers={"Origin": keyed.url}
    )
    assert own.status_code == 200 and (settings.constitutions_dir / "planted.yaml").exists()


@pytest.mark.db
def test_signing_out_ends_the_session_on_the_server(keyed, db):
    admin = logged_in(keyed, ADMIN)
    copied = admin.cookies.get(SESSION_COOKIE)
    assert admin.post("/ui/logout", data={"csrf_token": csrf(admin.get("/ui/jobs"))}).status_code == 303
    with httpx.Client(base_url=keyed.url) as replay:
        replay.cookies.set(SESSION_COOKIE, copied, path="/ui")
        answer = replay.get("/ui/jobs")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login")
    # Signing in again opens a new session that works.
    again = logged_in(keyed, ADMIN)
    assert again.get("/ui/jobs").status_code == 200
