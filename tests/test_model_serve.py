"""Serving a trained model (`cai-dpo model serve train:<id>`): the `vllm serve` arguments for each
kind of artifact, the command's refusals, GET /train/{id}'s `serve`, and once for real: a finished
run on the bundled model served by vLLM and answering an OpenAI chat completion."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner, Result

from cai_dpo.cli import model_serve
from cai_dpo.cli.main import app
from cai_dpo.core.db import session_scope
from cai_dpo.core.serving import (
    NotServable,
    TrainedArtifact,
    read_artifact,
    serve_hint,
    vllm_lora_rank,
    vllm_serve_args,
)
from cai_dpo.core.settings import Settings
from cai_dpo.core.tables import TrainingJob
from tests.fixtures.model import TEST_MODELS_DIR
from tests.helpers import free_port, import_hh, insert_pairs, stop_worker, train_to_the_end, wait_for

URL = "http://cai.test"


def merged_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


def adapter_folder(path: Path, r: int = 8) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --- the arguments ------------------------------------------------------------------------------


@pytest.mark.unit
def test_merged_weights_are_the_model_on_the_cpu_with_the_engines_own_options(tmp_path):
    artifact = read_artifact(merged_folder(tmp_path / "model"))
    assert not artifact.is_adapter
    args = vllm_serve_args(artifact, train_id=7, settings=Settings(), on_cpu=True, port=9001)
    assert option(args, "--model") == str(tmp_path / "model")
    assert option(args, "--served-model-name") == "train-7"
    assert (option(args, "--host"), option(args, "--port")) == ("127.0.0.1", "9001")
    # As VLLMEngine on a CPU: float32, eager, whole prefills, a quarter of the memory.
    assert option(args, "--dtype") == "float32" and "--enforce-eager" in args
    assert "--no-enable-chunked-prefill" in args and option(args, "--gpu-memory-utilization") == "0.25"
    assert option(args, "--max-model-len") == "2048"
    assert "--enable-lora" not in args and "--lora-modules" not in args


@pytest.mark.unit
def test_on_a_gpu_the_models_dtype_cuda_graphs_and_the_settings_limits(tmp_path):
    settings = Settings(vllm_max_num_seqs=64, vllm_tensor_parallel_size=2, vllm_kv_cache_gib=1.5)
    args = vllm_serve_args(
        read_artifact(merged_folder(tmp_path)), train_id=3, settings=settings, on_cpu=False
    )
    assert option(args, "--dtype") == "auto" and "--enforce-eager" not in args
    assert "--no-enable-chunked-prefill" not in args and option(args, "--gpu-memory-utilization") == "0.9"
    assert option(args, "--tensor-parallel-size") == "2" and option(args, "--max-num-seqs") == "64"
    assert option(args, "--kv-cache-memory-bytes") == str(int(1.5 * 2**30))
    assert option(args, "--port") == "8001"  # CAI_OPENAI_BASE_URL's default


@pytest.mark.unit
def test_a_lora_adapter_is_served_on_its_base_under_the_trained_name(tmp_path):
    adapter = read_artifact(adapter_folder(tmp_path / "adapter", r=12))
    assert adapter == TrainedArtifact(tmp_path / "adapter", lora_rank=12)
    base = merged_folder(tmp_path / "base")
    args = vllm_serve_args(
        adapter,
        train_id=5,
        settings=Settings(),
        on_cpu=True,
        base_model=base,
        base_name="smollm2-135m-instruct",
    )
    assert option(args, "--model") == str(base)
    assert option(args, "--served-model-name") == "smollm2-135m-instruct"
    assert "--enable-lora" in args and option(args, "--lora-modules") == f"train-5={tmp_path / 'adapter'}"
    assert option(args, "--max-lora-rank") == "16"  # the next rank vLLM takes
    assert option(args, "--dtype") == "float32"
    with pytest.raises(NotServable, match="base model"):
        vllm_serve_args(adapter, train_id=5, settings=Settings(), on_cpu=True)


@pytest.mark.unit
def test_lora_ranks_and_folders_vllm_cannot_serve(tmp_path):
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(NotServable, match="up to rank 512"):
        vllm_lora_rank(513)
    with pytest.raises(NotServable, match="neither a model folder"):
        read_artifact(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(NotServable, match="no LoRA rank"):
        read_artifact(tmp_path)
    reward_model = tmp_path / "reward-model"
    merged_folder(reward_model).joinpath("config.json").write_text(
        json.dumps({"architectures": ["LlamaForSequenceClassification"], "num_labels": 1})
    )
    with pytest.raises(NotServable, match="is a reward model .* generates none; name it as a best_of_n"):
        read_artifact(reward_model)


# --- the command against a fake API -------------------------------------------------------------


def run_state(
    train_id: int, status: str = "succeeded", artifact: str | None = None, base="smollm2-135m-instruct"
):
    return {"id": train_id, "status": status, "artifact": artifact, "base_model": base}


@pytest.fixture
def fake_api(monkeypatch):
    """GET /train/{id} answered from `runs` (404 for others); the device taken to be a CPU."""
    runs: dict[int, dict] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        train_id = int(request.url.path.rsplit("/", 1)[1])
        if train_id not in runs:
            return httpx.Response(404, json={"detail": f"train_id: no training job {train_id}"})
        return httpx.Response(200, json=runs[train_id])

    real_client = httpx.Client
    monkeypatch.setattr(
        httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(answer), **kw)
    )
    monkeypatch.setattr(model_serve, "on_cpu", lambda: True)
    return runs


def cli(*args: str, url: str = URL) -> Result:
    return CliRunner().invoke(app, ["model", "serve", *args, "--url", url])


@pytest.mark.unit
def test_print_shows_the_vllm_command_of_a_merged_run(fake_api, tmp_path):
    fake_api[4] = run_state(4, artifact=str(merged_folder(tmp_path / "model")))
    result = cli("train:4", "--port", "8123", "--print")
    assert result.exit_code == 0, result.output
    command = shlex.split(result.stdout)
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert option(command, "--model") == str(tmp_path / "model") and option(command, "--port") == "8123"
    assert option(command, "--served-model-name") == "train-4"


@pytest.mark.unit
def test_print_serves_an_adapter_on_its_base_run(fake_api, tmp_path):
    base = merged_folder(tmp_path / "base-model")
    fake_api[2] = run_state(2, artifact=str(base))
    fake_api[6] = run_state(6, artifact=str(adapter_folder(tmp_path / "adapter")), base="train:2")
    result = cli("train:6", "--print")
    assert result.exit_code == 0, result.output
    command = shlex.split(result.stdout)
    assert option(command, "--model") == str(base) and option(command, "--served-model-name") == "train-2"
    assert option(command, "--lora-modules") == f"train-6={tmp_path / 'adapter'}"


@pytest.mark.unit
def test_unknown_unfinished_or_misnamed_runs_exit_non_zero_saying_why(fake_api, tmp_path):
    result = cli("train:9", "--print")
    assert (
        result.exit_code == 1 and "error 404 from GET /train/9: train_id: no training job 9" in result.output
    )
    fake_api[3] = run_state(3, status="running")
    result = cli("train:3", "--print")
    assert result.exit_code == 1 and "the training job is running; only a finished" in result.output
    fake_api[5] = run_state(5, artifact=str(tmp_path / "gone"))
    result = cli("train:5", "--print")
    assert result.exit_code == 1 and "no Hugging Face model folder" in result.output
    result = cli("smollm2-135m-instruct", "--print")
    assert result.exit_code == 1 and "train:<id>" in result.output
    result = cli("train:4", "--host", "0.0.0.0", "--print")
    assert result.exit_code == 1 and "VLLM_API_KEY" in result.output


# --- GET /train/{id} ----------------------------------------------------------------------------


@pytest.mark.db
def test_get_train_says_how_to_serve_a_finished_run_only(client, db, tmp_path, monkeypatch):
    insert_pairs(db, 4)
    train_id = client.post("/train", json={}).json()["train_id"]
    assert client.get(f"/train/{train_id}").json()["serve"] is None
    model = merged_folder(tmp_path / "model")
    with session_scope(db) as session:
        session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == train_id)
            .values(status="succeeded", artifact_path=str(model))
        )
    serve = client.get(f"/train/{train_id}").json()["serve"]
    assert (
        serve
        == serve_hint(train_id)
        == {
            "command": f"cai-dpo model serve train:{train_id}",
            "base_url": "http://127.0.0.1:8001/v1",
            "model": f"train-{train_id}",
        }
    )
    # The command it names, against this API: the run's artifact as vLLM's model.
    monkeypatch.setattr(model_serve, "on_cpu", lambda: True)
    url = str(client.base_url).rstrip("/")
    result = cli(f"train:{train_id}", "--print", url=url)
    assert result.exit_code == 0, result.output
    assert option(shlex.split(result.stdout), "--model") == str(model)


# --- for real: a finished run on the bundled model, served by vLLM ------------------------------


def train_one_step(client, settings, db) -> int:
    """A finished LoRA run of the bundled model (1 step of 2 pairs, merged into its artifact), by
    the real training worker: what `train:<id>` is after any run."""
    import_hh(client, 4)
    body = {"dataset": {"source": "hh"}, "max_steps": 1, "batch_size": 2, "max_length": 128}
    train_id = train_to_the_end(client, settings, db, body | {"eval_fraction": 0, "lora": {"r": 8}}, 300)
    state = client.get(f"/train/{train_id}").json()
    assert state["status"] == "succeeded", state["error"]
    return train_id


@pytest.mark.model
@pytest.mark.vllm
@pytest.mark.e2e  # `vllm serve` runs as a subprocess
def test_a_trained_model_is_served_over_the_openai_api(bundled_model_path, client, settings, db, tmp_path):
    settings = settings.model_copy(update={"models_dir_override": TEST_MODELS_DIR})
    train_id = train_one_step(client, settings, db)
    serve = client.get(f"/train/{train_id}").json()["serve"]
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "cai_dpo.cli.main", *shlex.split(serve["command"])[1:]]
    command += ["--port", str(port), "--url", str(client.base_url).rstrip("/")]
    # A small KV cache: the CPU's default is a quarter of the machine's memory.
    env = {**os.environ, "CAI_VLLM_KV_CACHE_GIB": "0.5", "CAI_VLLM_MAX_MODEL_LEN": "1024"}
    with log_path.open("wb") as log:
        # Its own session: the command becomes the server (exec), whose engine process joins it.
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base_url = serve["base_url"].replace("8001", str(port))

    def listed() -> list[str] | None:
        try:
            response = httpx.get(f"{base_url}/models", timeout=2)
        except httpx.TransportError:
            return None
        return [model["id"] for model in response.json()["data"]] if response.status_code == 200 else None

    try:
        try:
            models = wait_for(listed, 150, "vLLM's /v1/models", procs=[server], interval=0.5)
        except AssertionError as exc:
            pytest.fail(f"{exc}; the server's output:\n{log_path.read_text()[-4000:]}")
        assert models == [serve["model"]] == [f"train-{train_id}"]
        response = httpx.post(
            f"{base_url}/chat/completions",
            json={
                "model": serve["model"],
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=60,
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == f"train-{train_id}" and answer["choices"][0]["message"]["content"].strip()
    finally:
        stop_worker(server)
