"""The README documents what the code does: its settings table is the one the code prints."""

import subprocess
import sys

import pytest

from cai_dpo.core.settings import PROJECT_ROOT

# The settings table is printed by a one-shot `cai-dpo settings` (a second or two, no service).
pytestmark = pytest.mark.unit

README = (PROJECT_ROOT / "README.md").read_text()


def test_settings_table_matches_the_settings_class():
    table = subprocess.run(
        [sys.executable, "-m", "cai_dpo.cli.main", "settings"],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
    ).stdout.strip()
    assert table in README, "README's settings table is stale: paste `cai-dpo settings` into it"


def test_ci_runs_the_readme_test_command():
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert "make test    #" in README and "make up      #" in README
    assert "\nmake test\n" in ci


def test_readme_has_a_curl_example_for_every_route():
    import re

    from app.main import create_app

    examples = re.findall(r"localhost:8000(/[^\s?'\"]*)", README)
    missing = []
    for route in create_app(migrate=False).routes:
        path = getattr(route, "path", "")
        if path.startswith(("/docs", "/redoc", "/openapi")):
            continue
        pattern = re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")
        if not any(pattern.match(example) for example in examples):
            missing.append(path)
    assert not missing, f"README has no curl example for {missing}"
