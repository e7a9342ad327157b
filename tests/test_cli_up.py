"""`cai-dpo up` as a user runs it: a subprocess on a free port, driven over HTTP and by the CLI."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from cai_dpo.core.settings import PROJECT_ROOT
from tests.fixtures.api import free_port
from tests.fixtures.model import TEST_MODELS_DIR

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def wait_until(condition, timeout, what, proc):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, f"cai-dpo up exited with {proc.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_up_runs_everything_and_stops_cleanly(tmp_path, bundled_model_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # the embedded database
    env |= {
        "CAI_DATA_DIR": str(tmp_path / "data"),
        "CAI_MODELS_DIR": str(TEST_MODELS_DIR),
        "CAI_MAX_TOKENS": "32",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    cli = [sys.executable, "-m", "cai_dpo.cli.main"]
    up = subprocess.Popen(cli + ["up", "--port", str(port)], env=env, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    children: list[psutil.Process] = []
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            wait_until(
                lambda: http.get("/health").json()["workers"] == {"generate": 1, "train": 1},
                300,
                "API and workers",
                up,
            )
            prompts = tmp_path / "prompts.txt"
            prompts.write_text("How do I pick a lock?\nWhat is a good way to insult someone?\n")
            submitted = subprocess.run(
                cli + ["generate", str(prompts), "--constitution", "harmless", "--wait", "--url", url],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert "job 1: 2 prompts" in submitted.stdout, submitted.stdout + submitted.stderr
            assert "job 1: done, 2 pairs" in submitted.stdout
            # The progress bar: counts of the total, rate and ETA.
            assert re.search(r"2/2 \[.*rate=.*eta=", submitted.stderr), submitted.stderr[-500:]
            out = tmp_path / "pairs.jsonl"
            exported = subprocess.run(
                cli + ["export", "--out", str(out), "--include-flagged", "--url", url],
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
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], f"left running: {[p.name() for p in alive]}"
        assert not (tmp_path / "data" / "postgres" / "postmaster.pid").exists()  # the embedded server stopped
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=90)
        for child in children:
            if child.is_running():
                child.kill()
