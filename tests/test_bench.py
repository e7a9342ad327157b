"""Every benchmark runs as docs/BENCHMARKS.md says (`python bench/<name>.py`): its `--help` answers,
and every import it makes, function-level ones included, resolves the way a script's does (its own
folder first on `sys.path`, not the repository root). `python bench/generation.py` once finished
its raw-vLLM side and then died on `from bench.service import ...` in the service side.

`bench/ceiling.py --dry-run` also runs once, end to end: its two engine paths on a real service."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cai_dpo.core.settings import PROJECT_ROOT

SCRIPTS = sorted((PROJECT_ROOT / "bench").glob("*.py"))

# Run as `python bench/x.py`: sys.path[0] is bench/, and the repository root is not on the path
# unless the script puts it there (several do, before importing the project).
RESOLVE = """
import ast, importlib.util, sys
script = sys.argv[1]
sys.path[0] = str(__import__("pathlib").Path(script).parent)
missing = []
for node in ast.walk(ast.parse(open(script).read())):
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
    for name in names:
        top = name.split(".")[0]
        if top in ("cai_dpo", "app", "workers", "tests"):  # the project: on the path by the script
            continue
        if importlib.util.find_spec(top) is None:
            missing.append(name)
print(",".join(missing))
"""


def script_imports(script: Path) -> set[str]:
    tree = ast.parse(script.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


@pytest.mark.unit
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_each_benchmark_answers_help_and_its_imports_resolve_as_a_script(script):
    # `bench` itself is no package on a script's path: `from bench.x import` fails when run as documented.
    assert "bench" not in script_imports(script), (
        f"{script.name} imports `bench.*`; import its sibling by name"
    )
    helped = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    resolved = subprocess.run(
        [sys.executable, "-c", RESOLVE, str(script)], capture_output=True, text=True, cwd="/", timeout=60
    )
    assert resolved.returncode == 0 and resolved.stdout.strip() == "", (
        resolved.stdout,
        resolved.stderr[-2000:],
    )


# `cai-dpo serve` on an embedded PostgreSQL, a scripted worker, the stub server and a real
# `cai-dpo worker generate`: subprocesses of the service, each start a second or two.
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_generation_ceiling_dry_run_makes_one_pair_per_prompt_on_both_paths():
    ran = subprocess.run(
        [sys.executable, "bench/ceiling.py", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=220,
    )
    assert ran.returncode == 0, ran.stderr[-4000:]
    lines = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    runs = {run["path"]: run for run in lines if "path" in run}
    assert set(runs) == {"scripted", "openai"}, ran.stdout
    for run in runs.values():
        assert run["pairs_per_s"] > 0 and run["worker_cpu_ms_per_pair"] > 0, run
        # Every prompt ended done, with exactly one pair.
        assert run["done"] == run["prompts"] == run["pairs"] > 0 and run["failed"] == 0, run
        assert run["all_done_one_pair"], run
    assert runs["openai"]["mode"] == "ai_feedback" and runs["openai"]["stub_requests_per_pair"]["judge"] > 0
    assert lines[-1]["all_done_one_pair"] is True
