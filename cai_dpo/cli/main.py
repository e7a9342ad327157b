"""The `cai-dpo` command: run the service (`up`, `serve`, `worker`), manage it (`db`, `model`), and
talk to a running one (`generate`, `export`, `jobs`, `train`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cai_dpo.core.db import database_url, downgrade_database, upgrade_database
from cai_dpo.core.logs import configure_logging
from cai_dpo.core.model_sources import prepare_bundled_model, resolve_model
from cai_dpo.core.settings import Settings, UnsafeBind, check_bind, get_settings

log = logging.getLogger("cai_dpo")


def service_module(command: str) -> list[str]:
    """The command line of one of the service's processes: each is its own Python module, so
    the CLI starts them without importing the API or the workers."""
    return [sys.executable, "-m", SERVICE_MODULES[command]]


SERVICE_MODULES = {
    "api": "cai_dpo.api",
    "generate": "cai_dpo.workers.generation",
    "train": "cai_dpo.workers.training",
}


# --- running the service --------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    host, port = args.host or settings.host, args.port or settings.port
    try:
        check_bind(settings.model_copy(update={"host": host}))
    except UnsafeBind as exc:
        raise SystemExit(str(exc)) from None
    env = os.environ | {"CAI_HOST": host, "CAI_PORT": str(port)}
    os.execvpe(sys.executable, service_module("api"), env)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    os.execv(sys.executable, service_module(args.kind))


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    url = database_url(settings)
    if args.action == "upgrade":
        upgrade_database(url, args.revision or "head")
    else:
        downgrade_database(url, args.revision or "base")
    log.info(
        "database %sd to %s", args.action, args.revision or ("head" if args.action == "upgrade" else "base")
    )
    return 0


def cmd_model(args: argparse.Namespace, settings: Settings) -> int:
    print(prepare_bundled_model(settings.models_dir))
    return 0


def kill_group(child: subprocess.Popen) -> None:
    """SIGKILL what is left of a child's process group (it was started as its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


class Supervisor:
    """Runs the API and the workers as child processes; one signal stops them all."""

    def __init__(self, commands: dict[str, list[str]], env: dict[str, str]):
        self.commands = commands
        self.env = env
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def start(self, name: str) -> None:
        # Own session: a Ctrl-C in the terminal reaches the supervisor only, which stops children in order.
        self.children[name] = subprocess.Popen(self.commands[name], env=self.env, start_new_session=True)
        log.info("started %s (pid %d)", name, self.children[name].pid)

    def stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        for name in self.commands:
            self.start(name)
        restarts: dict[str, list[float]] = {}
        code = 0
        while not self.stopping:
            time.sleep(0.2)
            for name, child in list(self.children.items()):
                if child.poll() is None or self.stopping:
                    continue
                log.error("%s exited with code %s", name, child.returncode)
                kill_group(child)  # vLLM's engine process outlives a killed worker otherwise
                recent = [t for t in restarts.get(name, []) if time.monotonic() - t < 60]
                if name == "api" or len(recent) >= 3:
                    log.error("%s cannot be kept running; stopping", name)
                    self.stopping, code = True, 1
                    break
                restarts[name] = recent + [time.monotonic()]
                self.start(name)
        self.shutdown()
        return code

    def shutdown(self, timeout: float = 30.0) -> None:
        log.info("stopping %s", ", ".join(self.children))
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, child in self.children.items():
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, timeout)
            kill_group(child)
            child.wait()


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    host = args.host or settings.host
    port = args.port or settings.port
    try:
        check_bind(settings.model_copy(update={"host": host}))
    except UnsafeBind as exc:
        raise SystemExit(str(exc)) from None
    url = database_url(settings)
    upgrade_database(url)
    if settings.engine == "vllm" and not args.no_generate_worker:
        resolve_model(settings.model, settings)
    env = os.environ | {"DATABASE_URL": url, "CAI_HOST": host, "CAI_PORT": str(port)}
    commands = {"api": service_module("api")}
    if not args.no_generate_worker:
        commands["generate"] = service_module("generate")
    if not args.no_train_worker:
        commands["train"] = service_module("train")
    log.info(
        "cai-dpo on http://%s:%d (database: %s)",
        host,
        port,
        "embedded" if not settings.database_url else "DATABASE_URL",
    )
    return Supervisor(commands, env).run()


# --- client commands ------------------------------------------------------------------------------


class Client:
    def __init__(self, args: argparse.Namespace, settings: Settings):
        import httpx

        url = args.url or os.environ.get("CAI_URL") or f"http://{settings.host}:{settings.port}"
        key = args.api_key or os.environ.get("CAI_API_KEY") or next(iter(settings.api_key_list), None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(300, connect=10)
        )

    def call(self, method: str, path: str, **kwargs):
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise SystemExit(f"error {response.status_code} from {method} {path}: {detail}")
        return response.json()


def read_prompts(path: Path) -> list:
    """Prompts from .txt (one per line), .json (a list) or .jsonl (strings, messages or {"prompt": ...})."""
    text = path.read_text()
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    items = (
        json.loads(text)
        if path.suffix == ".json"
        else [json.loads(line) for line in text.splitlines() if line.strip()]
    )
    prompts = []
    for n, item in enumerate(items, 1):
        if isinstance(item, dict):
            item = item.get("prompt", item.get("messages"))
        if not isinstance(item, str | list):
            raise SystemExit(f"{path}:{n}: expected a string, a message list, or an object with 'prompt'")
        prompts.append(item)
    return prompts


def progress_bar(client: Client, path: str, unit: str, done_of) -> dict:
    """Poll `path` until done, drawing counts, rate and ETA; returns the last state.

    `done_of(state)` gives (done, total, postfix, finished) from the API's answer.
    """
    from tqdm import tqdm

    with tqdm(unit=unit, dynamic_ncols=True) as bar:
        while True:
            state = client.call("GET", path)
            done, total, postfix, over = done_of(state)
            bar.total, bar.n = total, done
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
            if over:
                return state
            time.sleep(1.0)


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    client = Client(args, settings)
    prompts = read_prompts(Path(args.file))
    file_hash = hashlib.sha256(Path(args.file).read_bytes()).hexdigest()[:16]
    jobs = []
    for start in range(0, len(prompts), args.batch_size):
        body = {"prompts": prompts[start : start + args.batch_size], "constitution": args.constitution}
        if args.revisions:
            body["revisions"] = args.revisions
        if args.model:
            body["model"] = args.model
        if args.seed is not None:
            body["sampling"] = {"seed": args.seed}
        # Re-running the same command for the same file and batch returns the same job.
        key = f"cli-{file_hash}-{args.constitution}-{start}-{args.revisions}-{args.model}-{args.seed}"
        job = client.call("POST", "/generate", json=body, headers={"Idempotency-Key": key})
        jobs.append(job["job_id"])
        print(
            f"job {job['job_id']}: {job['n_prompts']} prompts, "
            f"constitution {args.constitution} @ {job['constitution_version'][:12]}"
        )
    if not args.wait:
        return 0
    failed = 0
    for job_id in jobs:
        state = progress_bar(
            client,
            f"/jobs/{job_id}",
            "prompt",
            lambda s: (
                s["counts"]["done"] + s["counts"]["failed"],
                s["n_prompts"],
                {
                    "rate": f"{(s['pairs_per_s'] or 0):.2f}/s",
                    "eta": f"{s['eta_s'] or 0:.0f}s",
                    "failed": s["counts"]["failed"],
                    "flagged": s["counts"]["flagged"],
                },
                s["status"] in ("done", "failed", "cancelled"),
            ),
        )
        failed += state["counts"]["failed"]
        print(
            f"job {job_id}: {state['status']}, {state['counts']['done']} pairs "
            f"({state['counts']['flagged']} flagged), {state['counts']['failed']} failed"
        )
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    client = Client(args, settings)
    params = {
        "format": args.format,
        "style": args.style,
        "split": args.split,
        "test_fraction": args.test_fraction,
        "include_flagged": args.include_flagged,
        "metadata": args.metadata,
        "job_id": args.job_id,
        "constitution": args.constitution,
        "constitution_version": args.constitution_version,
        "since": args.since,
    }
    params = {k: v for k, v in params.items() if v is not None}
    out = Path(args.out)
    partial = out.with_name(f".{out.name}.partial")
    # Written aside and renamed at the end: an interrupted export never leaves a truncated file behind.
    with client.http.stream("GET", "/export", params=params) as response:
        if response.status_code >= 400:
            response.read()
            raise SystemExit(f"error {response.status_code}: {response.json().get('detail')}")
        with partial.open("wb") as handle:
            for chunk in response.iter_bytes():
                handle.write(chunk)
    partial.replace(out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


def cmd_jobs(args: argparse.Namespace, settings: Settings) -> int:
    client = Client(args, settings)
    if (args.failed or args.retry) and args.job_id is None:
        raise SystemExit("--failed and --retry need a job id")
    if args.retry:
        result = client.call("POST", f"/jobs/{args.job_id}/retry")
    elif args.failed:
        result, cursor = [], None
        while True:
            params = {"status": "failed", "limit": 1000} | ({"cursor": cursor} if cursor else {})
            page = client.call("GET", f"/jobs/{args.job_id}/prompts", params=params)
            result += page["items"]
            if not (cursor := page["next_cursor"]):
                break
    else:
        result = client.call("GET", f"/jobs/{args.job_id}" if args.job_id else "/jobs")
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    client = Client(args, settings)
    body = json.loads(Path(args.config).read_text()) if args.config else {}
    if args.constitution:
        body.setdefault("dataset", {})["constitution"] = args.constitution
    job = client.call("POST", "/train", json=body)
    print(f"training job {job['train_id']}")
    if not args.wait:
        return 0
    state = progress_bar(
        client,
        f"/train/{job['train_id']}",
        "step",
        lambda s: (
            s["step"],
            s["total_steps"],
            {
                "step": f"{s['step']}/{s['total_steps'] or '?'}",
                "loss": (s.get("latest_metrics") or {}).get("loss"),
                "eta": f"{s.get('eta_s') or 0:.0f}s",
            },
            s["status"] in ("succeeded", "failed", "cancelled"),
        ),
    )
    print(
        f"training job {job['train_id']}: {state['status']} "
        f"{state.get('artifact') or state.get('error') or ''}"
    )
    return 0 if state["status"] == "succeeded" else 1


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    """Print the settings table of the README from the Settings class itself."""
    print("| Variable | Default | Meaning |\n|---|---|---|")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if alias is not None else f"CAI_{name.upper()}"
        default = field.default
        if isinstance(default, Path):
            default = f"<repo>/{default.name}"
        shown = "(unset)" if default in (None, "") else f"`{default}`"
        print(f"| `{env}` | {shown} | {field.description or ''} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cai-dpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="embedded database if needed, migrations, API and one worker of each kind")
    up.add_argument("--host")
    up.add_argument("--port", type=int)
    up.add_argument("--no-generate-worker", action="store_true")
    up.add_argument("--no-train-worker", action="store_true")
    up.set_defaults(func=cmd_up, role="up")

    serve = sub.add_parser("serve", help="the HTTP API alone")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve, role="api")

    worker = sub.add_parser("worker", help="a generation or training worker")
    worker.add_argument("kind", choices=["generate", "train"])
    worker.set_defaults(func=cmd_worker, role="worker")

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("revision", nargs="?")
    db.set_defaults(func=cmd_db, role="db")

    model = sub.add_parser("model", help="models")
    model.add_argument("action", choices=["prepare"])
    model.set_defaults(func=cmd_model, role="model")

    settings_cmd = sub.add_parser("settings", help="print the settings table (Markdown)")
    settings_cmd.set_defaults(func=cmd_settings, role="settings")

    def client_parser(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--url", help="service URL (default: CAI_URL, else http://CAI_HOST:CAI_PORT)")
        p.add_argument("--api-key", help="API key (default: CAI_API_KEY, else the first of CAI_API_KEYS)")
        p.set_defaults(role="client")
        return p

    generate = client_parser("generate", "submit prompts from a file (.txt, .json, .jsonl)")
    generate.add_argument("file")
    generate.add_argument("--constitution", required=True)
    generate.add_argument("--revisions", type=int)
    generate.add_argument("--model")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--batch-size", type=int, default=10_000, help="prompts per request")
    generate.add_argument("--wait", action="store_true", help="show progress until the job is done")
    generate.set_defaults(func=cmd_generate)

    export = client_parser("export", "download the dataset")
    export.add_argument("--out", required=True)
    export.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    export.add_argument("--style", choices=["standard", "conversational"], default="conversational")
    export.add_argument("--split", choices=["train", "test", "all"], default="all")
    export.add_argument("--test-fraction", type=float)
    export.add_argument("--include-flagged", action="store_true", default=None)
    export.add_argument("--metadata", action="store_true", default=None)
    export.add_argument("--job-id", type=int)
    export.add_argument("--constitution")
    export.add_argument("--constitution-version")
    export.add_argument("--since")
    export.set_defaults(func=cmd_export)

    jobs = client_parser("jobs", "show generation jobs")
    jobs.add_argument("job_id", nargs="?", type=int)
    jobs.add_argument("--failed", action="store_true", help="list the job's failed prompts and their errors")
    jobs.add_argument("--retry", action="store_true", help="queue the job's failed prompts again")
    jobs.set_defaults(func=cmd_jobs)

    train = client_parser("train", "start a DPO training job")
    train.add_argument("--config", help="JSON file with the POST /train body")
    train.add_argument("--constitution", help="train on this constitution's pairs")
    train.add_argument("--wait", action="store_true")
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.role)
    return args.func(args, get_settings())


if __name__ == "__main__":
    sys.exit(main())
