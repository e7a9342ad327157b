"""The console's pages and forms: server-rendered (Jinja2, autoescaped), live through htmx polling.

Every page reads through the same queries as the API, and every form acts through the API's own
route functions (`routes/jobs.py`, `routes/pairs.py`, ...), so validation, ownership checks and the
audit log are the API's; "try it" alone, which the API has no route for, makes its one-prompt job
with the query functions `POST /generate` uses. The Guard (`app/security.py`) has authenticated
the caller (an API key or the console's session cookie) and checked the scope before a route here
runs; `console_form` checks the CSRF token of every post whose token came in the form rather than
the header.

A form posted by htmx gets the page back (htmx swaps the part it names) or an `HX-Redirect`; a
plain form post gets a 303 redirect. Errors are shown where they happened: a 4xx fragment names
the field, as the API's errors do.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from app.access import CONSOLE_FORMS, PUBLIC, access, declare
from app.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.errors import field_name
from app.routes import jobs as job_routes
from app.routes import training as training_routes
from app.routes import workers as worker_routes
from app.ui.auth import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SESSION_COOKIE,
    SESSION_SECONDS,
    ConsoleAuth,
    is_console,
)
from app.ui.text_diff import diff_stats, line_diff, word_diff
from cai_dpo.core import services
from cai_dpo.core.constitutions import (
    ConstitutionError,
    ConstitutionStore,
    check_name,
    content_hash,
)
from cai_dpo.core.errors import FieldError
from cai_dpo.core.pair_filter import DbId, PairFilter
from cai_dpo.core.queries import constitutions as constitution_queries
from cai_dpo.core.queries import jobs as job_queries
from cai_dpo.core.queries import pairs as pair_queries
from cai_dpo.core.queries import reviews as review_queries
from cai_dpo.core.queries import sessions as session_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.requests import GenerateRequest, ReviewIn, TrainRequest
from cai_dpo.core.settings import Settings

HERE = Path(__file__).parent
PAGE_SIZE = 50
OPEN_JOB_STATES = {"queued", "running", "cancelling"}
OPEN_TRAIN_STATES = {"queued", "running"}
# A new constitution starts from this.
NEW_CONSTITUTION = """description: What this constitution asks of the answers.
revisions: 1
principle_sampling: random
principles:
  - id: first
    critique: Point out what is wrong with your last answer.
    revision: Rewrite your answer without it. Reply with only the rewritten answer itself.
"""
SECURITY_HEADERS = {
    # Scripts only from the app: a model's text that slipped past escaping could still run nothing.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)
# Its scripts and styles are public: the login page needs them before any key is given.
router.mount("/static", declare(StaticFiles(directory=HERE / "static"), PUBLIC), name="static")
templates = Jinja2Templates(directory=HERE / "templates")


class ConsoleError(Exception):
    """A refusal a console page shows as a page: the field at fault and why, with a status."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message


# --- rendering ------------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "–"


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _excerpt(text: str | None, n: int = 140) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _prompt_text(messages: list[dict[str, Any]]) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


templates.env.filters |= {"duration": _duration, "when": _when, "number": _number, "excerpt": _excerpt}
templates.env.globals |= {"prompt_text": _prompt_text}


def _set_cookie(response: Response, request: Request, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def page(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """A page (or the fragment of one htmx asked for) with the CSRF token its forms carry."""
    auth: ConsoleAuth = request.app.state.console_auth
    cookie = request.cookies.get(CSRF_COOKIE)
    fresh = cookie is None
    if fresh:
        cookie = auth.new_csrf_cookie()
    caller = getattr(request.state, "caller", None)
    context |= {
        "caller": caller,
        # Buttons the key may not use are shown disabled (the Guard refuses them anyway).
        "can": lambda scope: caller is None or caller.allows(scope),
        "csrf": auth.csrf_token(cookie, request.cookies.get(SESSION_COOKIE)),
        "csrf_field": CSRF_FIELD,
        "auth_enabled": request.app.state.keys.enabled,
        "path": request.url.path,
    }
    response = templates.TemplateResponse(request, template, context, status_code=status)
    if fresh:
        _set_cookie(response, request, CSRF_COOKIE, cookie, None)
    response.headers.update(SECURITY_HEADERS)
    return response


def fragment(html: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def is_htmx(request: Request) -> bool:
    return "hx-request" in request.headers


def go(request: Request, url: str) -> Response:
    """After a form: htmx is told where to go; a plain form post is redirected."""
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": url})
    return RedirectResponse(url, status_code=303)


def refused(exc: Exception) -> tuple[int, list[str]]:
    """The status and "field: message" lines of an error a form met."""
    if isinstance(exc, ValidationError):
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            field = field_name(error["loc"])
            if ": " in message and error.get("type") == "value_error":
                inner, message = message.split(": ", 1)
                field = inner if field == "body" else f"{field}.{inner}"
            lines.append(f"{field}: {message}")
        return 422, lines
    if isinstance(exc, FieldError):
        return exc.status_code, [f"{exc.field}: {exc.message}"]
    if isinstance(exc, ConstitutionError):
        where = f" (line {exc.line})" if exc.line else ""
        return 422, [f"{exc.field or 'body'}: {exc.message}{where}"]
    if isinstance(exc, HTTPException):
        return exc.status_code, [str(exc.detail)]
    if isinstance(exc, ConsoleError):
        return exc.status, [f"{exc.field}: {exc.message}"]
    raise exc


ACTION_ERRORS = (ValidationError, FieldError, ConstitutionError, HTTPException, ConsoleError)


def act(session: Session, action: Callable[[], Any]) -> Any:
    """Run a service function in a savepoint: a refusal leaves nothing of it behind."""
    with session.begin_nested():
        return action()


def errors_fragment(element_id: str, exc: Exception) -> HTMLResponse:
    """The errors in place of the element `element_id`, wherever the form meant to swap."""
    status, lines = refused(exc)
    html = templates.get_template("_errors.html").render(element_id=element_id, lines=lines)
    response = fragment(html, status)
    target = f"#{element_id}"
    response.headers.update({"HX-Retarget": target, "HX-Reselect": target, "HX-Reswap": "outerHTML"})
    return response


# --- the form of every post -----------------------------------------------------------------------


async def console_form(request: Request) -> FormData:
    """The posted form, once its CSRF token is known good (from the header, checked by the Guard,
    or from the form's field, checked here)."""
    settings: Settings = request.app.state.settings
    try:
        form = await request.form(max_files=4, max_fields=200, max_part_size=settings.max_body_bytes)
    except MultiPartException as exc:
        raise ConsoleError(400, "body", f"unreadable form: {exc.message}") from None
    except UnicodeDecodeError as exc:
        raise ConsoleError(400, "body", f"not UTF-8 text: {exc.reason}") from None
    if not getattr(request.state, "csrf_checked", False):
        auth: ConsoleAuth = request.app.state.console_auth
        token = form.get(CSRF_FIELD)
        cookies = request.cookies
        if not auth.csrf_ok(
            cookies.get(CSRF_COOKIE), cookies.get(SESSION_COOKIE), token if isinstance(token, str) else None
        ):
            raise ConsoleError(403, "csrf_token", "missing or stale; reload the page")
    return form


FormDep = Annotated[FormData, Depends(console_form)]


def text_field(form: FormData, name: str) -> str:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise ConsoleError(422, name, "expected text, got a file")
    return value or ""


def int_field(form: FormData, name: str, default: int, low: int, high: int) -> int:
    raw = text_field(form, name).strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ConsoleError(422, name, f"{raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConsoleError(422, name, f"{value}; between {low} and {high}")
    return value


def given(form: FormData, *names: str) -> dict[str, str]:
    """The named fields the user filled in (blank ones are left to the defaults)."""
    return {name: value for name in names if (value := text_field(form, name).strip())}


# --- pages ----------------------------------------------------------------------------------------


@router.get("/")
@access("read")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


def _safe_next(target: str | None) -> str:
    if (
        target
        and (target == "/ui" or target.startswith("/ui/"))
        and "//" not in target
        and "\\" not in target
    ):
        return target
    return "/ui/jobs"


@router.get("/login")
@access(None)
def login_page(request: Request, next: str | None = None):
    if not request.app.state.keys.enabled:
        return RedirectResponse(_safe_next(next), status_code=303)
    return page(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login")
@access(None, accepts=CONSOLE_FORMS)
def login(request: Request, form: FormDep):
    key = request.app.state.keys.find(text_field(form, "key").strip()) if text_field(form, "key") else None
    target = _safe_next(text_field(form, "next"))
    if key is None:
        return page(request, "login.html", status=401, next=target, error="key: not a valid API key")
    auth: ConsoleAuth = request.app.state.console_auth
    response = RedirectResponse(target, status_code=303)
    _set_cookie(response, request, SESSION_COOKIE, auth.new_session(key), SESSION_SECONDS)
    _set_cookie(response, request, CSRF_COOKIE, auth.new_csrf_cookie(), None)  # a new one per login
    return response


@router.post("/logout")
@access(None, accepts=CONSOLE_FORMS)
def logout(request: Request, form: FormDep, session: SessionDep):
    auth: ConsoleAuth = request.app.state.console_auth
    signed_in = auth.session(request.cookies.get(SESSION_COOKIE))
    if signed_in is not None:  # the cookie may have been copied: it must not outlive the sign-out
        session_queries.revoke(session, signed_in.nonce, signed_in.expires)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response


# --- jobs -----------------------------------------------------------------------------------------


@router.get("/jobs")
@access("read")
def jobs_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    before: DbId | None = None,
):
    jobs = job_routes.list_jobs(session, limit=PAGE_SIZE, before=before)
    return page(
        request,
        "jobs.html",
        jobs=jobs,
        live=any(job.status in OPEN_JOB_STATES for job in jobs),
        older=jobs[-1].id if len(jobs) == PAGE_SIZE else None,
        before=before,
        constitutions=store.names(),
        settings=settings,
        idempotency_key=uuid.uuid4().hex,
    )


def read_prompt_file(upload: UploadFile, data: bytes) -> list[Any]:
    """Prompts of an uploaded .txt (one a line) or .jsonl/.json (strings, message lists, or objects
    with `prompt` or `messages`), as the CLI reads them."""
    name = upload.filename or "upload"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConsoleError(400, "file", f"{name} is not UTF-8 text ({exc.reason})") from None
    if name.endswith(".txt"):
        return [line for line in text.splitlines() if line.strip()]
    try:
        if name.endswith(".json"):
            items = json.loads(text)
            numbered = list(enumerate(items if isinstance(items, list) else [items], 1))
        else:
            numbered = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as exc:
        raise ConsoleError(422, "file", f"{name}: line {exc.lineno}: malformed JSON ({exc.msg})") from None
    except RecursionError:  # brackets nested deeper than the parser's stack
        raise ConsoleError(422, "file", f"{name}: JSON nested too deeply") from None
    prompts = []
    for n, item in numbered:
        if isinstance(item, dict):
            item = item.get("prompt", item.get("messages"))
        if not isinstance(item, str | list):
            raise ConsoleError(
                422,
                "file",
                f"{name}: line {n}: expected a string, a message list, or an object with 'prompt'",
            )
        prompts.append(item)
    return prompts


def generate_body(form: FormData, prompts: list[Any]) -> dict[str, Any]:
    """The `POST /generate` body the submit form stands for."""
    body: dict[str, Any] = {"prompts": prompts, **given(form, "constitution", "revisions", "model")}
    mode = text_field(form, "mode") or "revise"
    body["mode"] = mode
    scorer = {"kind": text_field(form, "scorer_kind") or "judge", **given(form, "scorer_model")}
    if "scorer_model" in scorer:
        scorer["model"] = scorer.pop("scorer_model")
    if mode == "revise":
        if text_field(form, "verify"):
            body["verify"] = {"scorer": scorer}
    else:
        body |= given(form, "n")
        body["scorer"] = scorer
    sampling = given(form, "temperature", "top_p", "max_tokens", "seed")
    if sampling:
        body["sampling"] = sampling
    return body


@router.post("/generate")
@access("generate", accepts=CONSOLE_FORMS)
def submit_job(request: Request, form: FormDep, session: SessionDep):
    prompts: list[Any] = [line for line in text_field(form, "prompts").splitlines() if line.strip()]
    key = text_field(form, "idempotency_key") or None
    try:
        upload = form.get("file")
        if isinstance(upload, UploadFile) and upload.filename:
            prompts += read_prompt_file(upload, upload.file.read())
        if not prompts:
            raise ConsoleError(422, "prompts", "paste prompts or choose a file")
        body = GenerateRequest.model_validate(generate_body(form, prompts), strict=False)  # a form's text
        submitted = act(
            session,
            lambda: services.submit_generation_job(
                session,
                body=body,
                caller=request.state.caller,
                settings=request.app.state.settings,
                store=request.app.state.constitutions,
                engine=request.app.state.engine,
                idempotency_key=key,
            ),
        )
    except ACTION_ERRORS as exc:
        return errors_fragment("submit-result", exc)
    request.state.audit_ids = {"job_id": str(submitted.job.id)}
    return go(request, f"/ui/jobs/{submitted.job.id}")


@router.get("/jobs/{job_id}")
@access("read")
def job_page(
    request: Request, job_id: DbId, session: SessionDep, settings: SettingsDep, cursor: int | None = None
):
    job = _job_or_404(session, job_id)
    failed = job_queries.list_job_prompts(session, job_id, status="failed", after_id=cursor, limit=PAGE_SIZE)
    return page(
        request,
        "job.html",
        job=job,
        live=job.status in OPEN_JOB_STATES,
        failed=failed,
        next_cursor=failed[-1][0].id if len(failed) == PAGE_SIZE else None,
    )


def _job_or_404(session: Session, job_id: int):
    try:
        return job_routes.get_job(job_id, session)
    except HTTPException:
        raise ConsoleError(404, "job_id", f"no job {job_id}") from None


@router.post("/jobs/{job_id}/retry")
@access("generate", accepts=CONSOLE_FORMS)
def retry_job(request: Request, job_id: DbId, form: FormDep, session: SessionDep, caller: CallerDep):
    return _job_action(
        request, session, job_id, lambda: services.retry_generation_job(session, job_id, caller)
    )


@router.post("/jobs/{job_id}/cancel")
@access("generate", accepts=CONSOLE_FORMS)
def cancel_job(request: Request, job_id: DbId, form: FormDep, session: SessionDep, caller: CallerDep):
    return _job_action(
        request, session, job_id, lambda: services.cancel_generation_job(session, job_id, caller)
    )


def _job_action(request: Request, session: Session, job_id: int, action: Callable[[], Any]) -> Response:
    try:
        act(session, action)
    except ACTION_ERRORS as exc:
        return errors_fragment("job-action", exc)
    return go(request, f"/ui/jobs/{job_id}")


# --- pairs ----------------------------------------------------------------------------------------

FILTER_FIELDS = tuple(PairFilter.model_fields)


def pair_filter_from(query: dict[str, str]) -> tuple[PairFilter, list[str], dict[str, str]]:
    """The filter the query names (blank fields left out), its errors, and the fields as given."""
    values = {name: query[name].strip() for name in FILTER_FIELDS if query.get(name, "").strip()}
    if values.get("include_flagged") == "on":
        values["include_flagged"] = "true"
    try:
        return PairFilter.model_validate(values, strict=False), [], values
    except ValidationError as exc:
        return PairFilter(), refused(exc)[1], values


@router.get("/pairs")
@access("read")
def pairs_page(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    after: DbId | None = None,
    before: DbId | None = None,
):
    f, errors, values = pair_filter_from(dict(request.query_params))
    rows = (
        []
        if errors
        else pair_queries.list_pairs(session, f, after_id=after, before_id=before, limit=PAGE_SIZE)
    )
    reviews = review_queries.latest_reviews(session, [pair.id for pair, _ in rows])
    query = urlencode(values)
    first_id, last_id = (rows[0][0].id, rows[-1][0].id) if rows else (None, None)
    has_older = first_id is not None and pair_queries.previous_id(session, f, first_id) is not None
    has_newer = last_id is not None and pair_queries.next_id(session, f, last_id) is not None
    return page(
        request,
        "pairs.html",
        rows=rows,
        reviews=reviews,
        errors=errors,
        values=values,
        query=query,
        prev_url=f"/ui/pairs?{urlencode(values | {'before': first_id})}" if has_older else None,
        next_url=f"/ui/pairs?{urlencode(values | {'after': last_id})}" if has_newer else None,
        constitutions=store.names(),
    )


def _principles(session: Session, version_id: int | None) -> dict[str, dict[str, str]]:
    """Principle id -> its critique and revision requests, in the version the pair was made with."""
    version = constitution_queries.get_constitution_version(session, version_id) if version_id else None
    return {p["id"]: p for p in (version.spec.get("principles", []) if version else [])}


def pair_context(session: Session, pair_id: int, f: PairFilter) -> dict[str, Any]:
    found = pair_queries.get_pair(session, pair_id)
    if found is None:
        raise ConsoleError(404, "pair_id", f"no pair {pair_id}")
    pair, version = found
    history = review_queries.history(session, pair_id)
    latest = history[-1] if history else None
    chosen = latest["chosen"] if latest and latest["chosen"] is not None else pair.chosen
    segments = word_diff(pair.rejected, chosen)
    before, after = pair_queries.previous_id(session, f, pair_id), pair_queries.next_id(session, f, pair_id)
    return {
        "pair": pair,
        "version": version,
        "history": list(reversed(history)),
        "latest": latest,
        "chosen": chosen,
        "diff": segments,
        "diff_stats": diff_stats(segments) if segments is not None else None,
        "principles": _principles(session, pair.constitution_version_id),
        "trajectory": pair.trajectory or {},
        "before_id": before,
        "after_id": after,
    }


@router.get("/pairs/{pair_id}")
@access("read")
def pair_page(request: Request, pair_id: DbId, session: SessionDep):
    f, _, values = pair_filter_from(dict(request.query_params))
    context = pair_context(session, pair_id, f)
    return page(request, "pair.html", query=urlencode(values), filter_values=values, **context)


@router.post("/pairs/{pair_id}/review")
@access("review", accepts=CONSOLE_FORMS)
def review_pair(request: Request, pair_id: DbId, form: FormDep, session: SessionDep, caller: CallerDep):
    f, _, values = pair_filter_from({k: v for k, v in form.items() if isinstance(v, str)})
    try:
        body = ReviewIn.model_validate(
            given(form, "status") | {"chosen": form.get("chosen") or None}, strict=False
        )
        review = act(
            session, lambda: services.review_pair(session, pair_id=pair_id, body=body, reviewer=caller)
        )
    except ACTION_ERRORS as exc:
        return errors_fragment("review-result", exc)
    request.state.audit_ids = {"review_version": str(review.version)}
    query = urlencode(values)
    if not is_htmx(request):
        return RedirectResponse(f"/ui/pairs/{pair_id}?{query}", status_code=303)
    return page(request, "pair.html", query=query, filter_values=values, **pair_context(session, pair_id, f))


# --- constitutions --------------------------------------------------------------------------------


@router.get("/constitutions")
@access("read")
def constitutions_page(request: Request, store: StoreDep, new: str | None = None):
    if new:  # the "new constitution" form: open the editor on that name
        try:
            return RedirectResponse(f"/ui/constitutions/{check_name(new.strip())}", status_code=303)
        except ConstitutionError as exc:
            raise ConsoleError(422, "new", exc.message) from None
    rows = []
    for name in store.names():
        try:
            constitution = store.get(name)
            rows.append(
                {"name": name, "version": constitution.version, "spec": constitution.spec, "error": None}
            )
        except ValueError:
            rows.append({"name": name, "version": None, "spec": None, "error": None})
        rows[-1]["error"] = store.error(name)
    return page(request, "constitutions.html", rows=rows)


def valid_name(name: str) -> str:
    """A constitution name from the path, or the console's 404 naming it."""
    try:
        return check_name(name)
    except ConstitutionError as exc:
        raise ConsoleError(404, "name", exc.message) from None


def _file_text(store: ConstitutionStore, name: str) -> str | None:
    try:
        return store.path_for(name).read_text()
    except FileNotFoundError:
        return None


@router.get("/constitutions/{name}")
@access("read")
def constitution_page(
    request: Request, name: str, session: SessionDep, store: StoreDep, version: str | None = None
):
    valid_name(name)
    on_disk = _file_text(store, name)
    text = on_disk if on_disk is not None else NEW_CONSTITUTION
    loaded = None
    if version:
        row = constitution_queries.find_version(session, name, version)
        if row is None:
            raise ConsoleError(404, "version", f"no version {version!r} of {name!r}")
        text, loaded = row.body, row.content_hash
    return page(
        request,
        "constitution.html",
        name=name,
        text=text,
        exists=on_disk is not None,
        if_match=content_hash(on_disk) if on_disk is not None else "",
        loaded=loaded,
        check=check_text(store, name, text),
        versions=_versions(session, store, name, on_disk),
        settings=request.app.state.settings,
    )


def _versions(
    session: Session, store: ConstitutionStore, name: str, on_disk: str | None
) -> list[dict[str, Any]]:
    """The versions used so far, newest first, with the file on disk marked (listed first if it
    was never used)."""
    versions = constitution_queries.constitution_versions(session, name)
    current = content_hash(on_disk) if on_disk is not None else None
    for v in versions:
        v["current"] = v["version"] == current
    if current is not None and not any(v["current"] for v in versions):
        versions.insert(0, {"version": current, "first_used_at": None, "n_pairs": 0, "current": True})
    return versions


def check_text(store: ConstitutionStore, name: str, text: str) -> dict[str, Any]:
    """The editor's text validated: ok, or the error with its field and line."""
    try:
        constitution = store.validate(name, text)
    except ConstitutionError as exc:
        return {"ok": False, "message": exc.message, "field": exc.field, "line": exc.line}
    return {"ok": True, "version": constitution.version, "n_principles": len(constitution.spec.principles)}


@router.post("/constitutions/{name}/check")
@access("read", accepts=CONSOLE_FORMS)
def check_constitution(request: Request, name: str, form: FormDep, store: StoreDep):
    result = check_text(store, valid_name(name), text_field(form, "body"))
    return fragment(templates.get_template("_check.html").render(check=result))


@router.post("/constitutions/{name}")
@access("admin", accepts=CONSOLE_FORMS)
def save_constitution(request: Request, name: str, form: FormDep, session: SessionDep, store: StoreDep):
    text = text_field(form, "body")
    if_match = text_field(form, "if_match") or None
    try:
        act(
            session,
            lambda: services.save_constitution(request.app.state.engine, store, name, text, if_match),
        )
    except ACTION_ERRORS as exc:
        status, lines = refused(exc)
        conflict = status == 409 and "if-match" in " ".join(lines)
        check = check_text(store, name, text) if status == 422 else None
        html = templates.get_template("_saved.html").render(
            ok=False, lines=lines, conflict=conflict, check=check, name=name, if_match=if_match
        )
        return fragment(html, status)
    on_disk = _file_text(store, name) or text
    html = templates.get_template("_saved.html").render(
        ok=True,
        name=name,
        version=content_hash(on_disk),
        check=check_text(store, name, text),
        versions=_versions(session, store, name, on_disk),
    )
    return fragment(html)


@router.get("/constitutions/{name}/diff")
@access("read")
def constitution_diff(request: Request, name: str, session: SessionDep, store: StoreDep, a: str, b: str):
    texts = []
    for which in (a, b):
        if which == "file":
            texts.append(_file_text(store, valid_name(name)) or "")
            continue
        row = constitution_queries.find_version(session, valid_name(name), which)
        if row is None:
            raise ConsoleError(404, "version", f"no version {which!r} of {name!r}")
        texts.append(row.body)
    rows = line_diff(texts[0], texts[1])
    return fragment(templates.get_template("_line_diff.html").render(rows=rows, a=a, b=b))


@router.post("/constitutions/{name}/try")
@access("generate", accepts=CONSOLE_FORMS)
def try_constitution(
    request: Request,
    name: str,
    form: FormDep,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: CallerDep,
):
    """One prompt through the loop with the editor's (unsaved) text (`services.submit_try_job`)."""
    try:
        given_rounds = text_field(form, "revisions").strip()
        revisions = int_field(form, "revisions", 1, 1, settings.max_revisions) if given_rounds else None
        job = act(
            session,
            lambda: services.submit_try_job(
                session,
                name=name,
                text=text_field(form, "body"),
                prompt=text_field(form, "prompt"),
                revisions=revisions,
                max_tokens=int_field(form, "max_tokens", 128, 1, 8192),
                caller=caller,
                settings=settings,
                store=store,
            ),
        )
    except ACTION_ERRORS as exc:
        return errors_fragment("try-result", exc)
    request.state.audit_ids = {"job_id": str(job.id)}
    return try_result(request, name, job.id, session)


@router.get("/constitutions/{name}/try/{job_id}")
@access("read")
def try_result(request: Request, name: str, job_id: DbId, session: SessionDep):
    job = job_queries.get_job(session, job_id)
    if job is None or (job.job_metadata or {}).get("console_try") != name:
        raise ConsoleError(404, "job_id", f"no try of {name!r} with job {job_id}")
    state = job_routes.get_job(job_id, session)
    prompts = job_queries.list_job_prompts(session, job_id, status=None, after_id=None, limit=1)
    prompt, pair_id = prompts[0] if prompts else (None, None)
    pair = pair_queries.get_pair(session, pair_id)[0] if pair_id else None
    html = templates.get_template("_try.html").render(
        name=name,
        job=state,
        prompt=prompt,
        pair=pair,
        trajectory=(pair.trajectory if pair else {}),
        principles=_principles(session, job.constitution_version_id),
        live=state.status in OPEN_JOB_STATES,
    )
    return fragment(html)


# --- training -------------------------------------------------------------------------------------

TRAIN_PARAMS = (
    "base_model",
    "loss_type",
    "beta",
    "learning_rate",
    "epochs",
    "max_steps",
    "batch_size",
    "gradient_accumulation",
    "max_length",
    "eval_fraction",
    "seed",
)


@router.get("/train")
@access("read")
def training_page(request: Request, session: SessionDep, store: StoreDep, before: DbId | None = None):
    runs = training_routes.list_training(session, limit=PAGE_SIZE, before=before)
    return page(
        request,
        "training.html",
        runs=runs,
        live=any(run.status in OPEN_TRAIN_STATES for run in runs),
        older=runs[-1].id if len(runs) == PAGE_SIZE else None,
        constitutions=store.names(),
    )


def train_body(form: FormData) -> dict[str, Any]:
    """The `POST /train` body the start form stands for."""
    dataset = given(form, *FILTER_FIELDS)
    if dataset.get("include_flagged") == "on":
        dataset["include_flagged"] = "true"
    body: dict[str, Any] = {"dataset": dataset, **given(form, *TRAIN_PARAMS)}
    lora = given(form, "lora_r", "lora_alpha")
    if lora:
        body["lora"] = {key.removeprefix("lora_"): value for key, value in lora.items()}
    if not text_field(form, "evaluate"):
        body["evaluate"] = False
    return body


@router.post("/train")
@access("train", accepts=CONSOLE_FORMS)
def start_training(
    request: Request, form: FormDep, session: SessionDep, settings: SettingsDep, caller: CallerDep
):
    try:
        body = TrainRequest.model_validate(train_body(form), strict=False)  # a form's text
        job = act(
            session,
            lambda: services.submit_training_job(session, body=body, caller=caller, settings=settings),
        )
    except ACTION_ERRORS as exc:
        return errors_fragment("train-result", exc)
    request.state.audit_ids = {"train_id": str(job.id)}
    return go(request, f"/ui/train/{job.id}")


def _run_or_404(session: Session, train_id: int):
    try:
        return training_routes.get_training(train_id, session)
    except HTTPException:
        raise ConsoleError(404, "train_id", f"no training job {train_id}") from None


# The charts of a run: title, then the metrics drawn (TRL's names, as the trainer logs them).
CHARTS = (
    ("loss", "Loss", ["loss"]),
    ("accuracy", "Reward accuracy", ["rewards/accuracies"]),
    ("margins", "Reward margin", ["rewards/margins"]),
    ("logps", "Log-probs (chosen, rejected)", ["logps/chosen", "logps/rejected"]),
    ("lr", "Learning rate", ["learning_rate"]),
)


@router.get("/train/{train_id}")
@access("read")
def training_run_page(request: Request, train_id: DbId, session: SessionDep):
    run = _run_or_404(session, train_id)
    evals = list(dict.fromkeys([*(run.eval_before or {}), *(run.eval_after or {})]))
    return page(
        request,
        "training_run.html",
        run=run,
        live=run.status in OPEN_TRAIN_STATES,
        charts=CHARTS,
        eval_keys=evals,
    )


@router.get("/train/{train_id}/metrics.json")
@access("read")
def training_run_metrics(train_id: DbId, session: SessionDep):
    _run_or_404(session, train_id)
    rows = [{"step": m.step, **m.values} for m in training_queries.training_metrics(session, train_id)]
    return JSONResponse(rows, headers={"Cache-Control": "no-store"})


@router.post("/train/{train_id}/cancel")
@access("train", accepts=CONSOLE_FORMS)
def cancel_training(request: Request, train_id: DbId, form: FormDep, session: SessionDep, caller: CallerDep):
    try:
        act(session, lambda: services.cancel_training_job(session, train_id, caller))
    except ACTION_ERRORS as exc:
        return errors_fragment("train-action", exc)
    return go(request, f"/ui/train/{train_id}")


# --- workers --------------------------------------------------------------------------------------


@router.get("/workers")
@access("read")
def workers_page(request: Request, session: SessionDep, settings: SettingsDep):
    workers = worker_routes.list_workers(session, settings)
    now = datetime.now(UTC)
    return page(request, "workers.html", workers=workers, now=now)


# --- mounting -------------------------------------------------------------------------------------


def install_console(app: FastAPI) -> ConsoleAuth:
    """Mount the console at /ui (outside the API's schema) and return its session signer, which
    the Guard needs. Call after the API's error handlers are installed: on console paths, errors
    become pages; elsewhere the API's handlers answer as before."""
    auth = ConsoleAuth(app.state.settings.session_secret, app.state.keys)
    app.state.console_auth = auth
    app.mount("/ui", router, name="ui")

    async def console_error(request: Request, exc: ConsoleError) -> Response:
        return _error_page(request, exc.status, exc.field, exc.message)

    api_http_error = app.exception_handlers[StarletteHTTPException]
    api_validation_error = app.exception_handlers[RequestValidationError]

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if not is_console(request.url.path):
            return await api_http_error(request, exc)
        field, _, message = str(exc.detail).partition(": ")
        return _error_page(request, exc.status_code, field if message else "path", message or str(exc.detail))

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if not is_console(request.url.path):
            return await api_validation_error(request, exc)
        first = exc.errors()[0]
        return _error_page(request, 422, field_name(first["loc"]), first["msg"])

    app.add_exception_handler(ConsoleError, console_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    return auth


def _error_page(request: Request, status: int, field: str, message: str) -> Response:
    if "hx-request" in request.headers:  # a fragment where the page expected one
        return page(
            request, "_errors.html", status=status, element_id="errors", lines=[f"{field}: {message}"]
        )
    return page(request, "error.html", status=status, status_code=status, field=field, message=message)
