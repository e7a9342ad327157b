"""The OpenAPI document is the contract: Schemathesis against `/openapi.json` of a live `cai-dpo serve`.

Every check Schemathesis has (server errors, response schemas, status codes, content types and
headers, schema-violating requests refused, schema-valid requests accepted, `Allow`, stateful
links), a fixed seed and a bounded number of cases per operation; `tests/schemathesis.toml` and
`tests/schemathesis_hooks.py` say what the run accepts and why. The server gets some pairs first,
so the routes that read them have something to read.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cai_dpo.core.settings import PROJECT_ROOT
from tests.helpers import free_port, insert_pairs, wait_for

pytestmark = pytest.mark.e2e

TESTS = Path(__file__).parent
SEED = 20260101
EXAMPLES = 20  # per operation in the fuzzing phase; with the coverage and stateful phases ~4,500 cases
# With keys the document declares the bearer scheme: Schemathesis also checks that every route but
# /health refuses a request without one (`ignored_auth`).
KEY = "0123456789abcdef0123"


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(600)  # about 45 s each on the 2-core dev machine
@pytest.mark.parametrize("keys", [False, True], ids=["loopback", "api-keys"])
def test_schemathesis_finds_no_contract_failure(settings, db, tmp_path, keys):
    insert_pairs(db, 20)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {
        "DATABASE_URL": settings.database_url,
        "CAI_DATA_DIR": str(tmp_path / "data"),
        "CAI_CONSTITUTIONS_DIR": str(settings.constitutions_dir),
        "CAI_API_KEYS": f"admin:admin:{KEY}" if keys else "",
        # Schemathesis sends thousands of requests without a key on purpose (it checks each is a 401):
        # the refusal budget that keeps a real client from flooding the audit log would answer 429.
        "CAI_REFUSALS_PER_MINUTE": "1000000",
    }
    auth = ["--header", f"Authorization: Bearer {KEY}"] if keys else []
    serve = subprocess.Popen(
        [sys.executable, "-m", "cai_dpo.cli.main", "serve", "--port", str(port)], env=env, cwd=PROJECT_ROOT
    )
    statuses = tmp_path / "statuses.json"
    try:
        wait_for(lambda: healthy(url), 60, "cai-dpo serve", procs=[serve])
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(TESTS / "schemathesis.toml"),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--seed",
                str(SEED),
                "--max-examples",
                str(EXAMPLES),
                "--no-color",
                *auth,
            ],
            env=os.environ
            | {
                "SCHEMATHESIS_HOOKS": str(TESTS / "schemathesis_hooks.py"),
                "CAI_SCHEMATHESIS_STATUSES": str(statuses),
            },
            cwd=tmp_path,  # its .hypothesis and .schemathesis folders
            capture_output=True,
            text=True,
            timeout=540,
        )
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    counts = json.loads(statuses.read_text())
    summary = re.search(r"^\s*(\d+ generated.*)$", run.stdout, re.M)
    print(f"schemathesis: {summary[1] if summary else '?'}; responses by status: {counts}")
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]
    assert not [status for status in counts if status.startswith("5")], counts
