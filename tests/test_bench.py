"""Every benchmark runs as docs/BENCHMARKS.md says (`python bench/<name>.py`): its `--help` answers,
and every import it makes, function-level ones included, resolves the way a script's does (its own
folder first on `sys.path`, not the repository root). `python bench/generation.py` once finished
its raw-vLLM side and then died on `from bench.service import ...` in the service side."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cai_dpo.core.settings import PROJECT_ROOT

pytestmark = pytest.mark.unit

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
