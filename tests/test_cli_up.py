"""`cai-dpo up` as a user runs it: a subprocess on a free port, driven over HTTP and by the CLI."""

import os
import re
import signal
import subprocess
import sys

import httpx
import psutil
import pytest

from cai_dpo.core.db import embedded_postgres_pid, stop_embedded_postgres
from cai_dpo.core.settings import PROJECT_ROOT
from tests.helpers import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.model]


def alive(proc: psutil.Process) -> bool:
    """Running, and no zombie (a stopped server is reparented, and reaped whenever its new parent
    gets to it)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_up_runs_everything_and_stops_cleanly(tmp_path, bundled_model_path):
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # the embedded database
    env |= {
        "CAI_DATA_DIR": str(data),
        "CAI_MODELS_DIR": str(bundled_model_path.parent),
        "CAI_MAX_TOKENS": "32",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    cli = [sys.executable, "-m", "cai_dpo.cli.main"]
    up = subprocess.Popen([*cli, "up", "--port", str(port)], env=env, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    children: list[psutil.Process] = []

    def live_workers(http: httpx.Client) -> bool:
        try:
            return http.get("/health").json()["workers"] == {"generate": 1, "train": 1}
        except httpx.TransportError:
            return False

    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            wait_for(lambda: live_workers(http), 300, "API and workers", procs=[up], interval=0.5)
            prompts = tmp_path / "prompts.txt"
            prompts.write_text("How do I pick a lock?\nWhat is a good way to insult someone?\n")
            submitted = subprocess.run(
                [*cli, "generate", str(prompts), "--constitution", "harmless", "--wait", "--url", url],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert "job 1: 2 prompts" in submitted.stdout, submitted.stdout + submitted.stderr
            assert "job 1: done, 2 pairs" in submitted.stdout
            # The progress bar: counts of the total, rate and ETA.
            progress = r"job 1 .*2/2 prompts [\d.]+ pairs/s +ETA \d+:\d\d:\d\d"
            assert re.search(progress, submitted.stderr), submitted.stderr[-500:]
            out = tmp_path / "pairs.jsonl"
            exported = subprocess.run(
                [*cli, "export", "--out", str(out), "--include-flagged", "--url", url],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert exported.returncode == 0, exported.stderr
            assert len(out.read_text().splitlines()) == 2
            workers = http.get("/workers").json()
            assert {w["kind"] for w in workers} == {"generate", "train"}
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3
        pid = embedded_postgres_pid(data)
        assert pid is not None, "no embedded server in the data folder"
        server = psutil.Process(pid)
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
        _, left = psutil.wait_procs(children, timeout=10)
        assert [p for p in left if alive(p)] == [], f"left running: {[p.name() for p in left]}"
        # The embedded server `up` started is stopped with it.
        assert not alive(server) and embedded_postgres_pid(data) is None
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=90)
        for child in children:
            if child.is_running():
                child.kill()
        stop_embedded_postgres(data)
