"""The client commands, over HTTP to a running service: `generate`, `export`, `jobs`, `train`.

Results go to stdout (a table of jobs, JSON), progress to stderr; an API error prints the API's
`detail` and exits with 1."""

import contextlib
import functools
import hashlib
import inspect
import json
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Table
from rich.text import Text

from cai_dpo.core.pair_filter import PairFilter
from cai_dpo.core.settings import get_settings

POLL_SECONDS = 1.0
JOB_TABLE = (
    "job",
    "status",
    "constitution",
    "prompts",
    "done",
    "failed",
    "flagged",
    "pairs/s",
    "tokens",
    "budget",
    "engine s",
    "cost",
    "created",
)

Url = Annotated[str | None, typer.Option(envvar="CAI_URL", help="Default: http://$CAI_HOST:$CAI_PORT.")]
ApiKey = Annotated[str | None, typer.Option(envvar="CAI_API_KEY", help="Default: the first of CAI_API_KEYS.")]


def console(*, stderr: bool = False) -> Console:
    """stdout or stderr; in a file or a pipe, wide enough for a table row or a progress line (not 80)."""
    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal:
        console.width = 200
    return console


class Client:
    def __init__(self, url: str | None, api_key: str | None):
        settings = get_settings()
        self.url = (url or f"http://{settings.host}:{settings.port}").rstrip("/")
        key = api_key or next(iter(settings.api_key_list), None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(300, connect=10))

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """The response of a successful request, not read yet; else exit with the API's `detail`."""
        try:
            with self.http.stream(method, path, **kwargs) as response:
                if response.is_error:
                    response.read()
                    try:
                        detail = response.json()["detail"]
                    except (ValueError, KeyError, TypeError):
                        detail = response.text
                    raise SystemExit(f"error {response.status_code} from {method} {path}: {detail}")
                yield response
        except httpx.TransportError as exc:
            raise SystemExit(f"cannot reach the service at {self.url}: {exc}") from None

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.stream(method, path, **kwargs) as response:
            return json.loads(response.read())


class RateAndEta(ProgressColumn):
    """`0.52 pairs/s  ETA 0:00:04`: the API's rate and ETA where it gives them, else rich's estimates."""

    def render(self, task: Task) -> Text:
        rate = task.fields["rate"] or task.speed or 0
        eta = (
            0
            if task.finished
            else task.fields["eta"]
            if task.fields["eta"] is not None
            else task.time_remaining
        )
        shown_eta = "-:--:--" if eta is None else timedelta(seconds=round(eta))
        return Text(f"{rate:.2f} {task.fields['unit']}/s  ETA {shown_eta}")


def follow(client: Client, paths: dict[str, str], view: Callable[[dict], dict]) -> list[dict]:
    """Poll API paths (name -> path) until `view(state)["over"]` for each, drawing done of total,
    rate and ETA; returns their last states."""
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn())
    columns += (TextColumn("{task.fields[what]}"), RateAndEta(), TextColumn("{task.fields[note]}"))
    states: dict[str, dict] = {}
    with Progress(*columns, console=console(stderr=True)) as progress:
        blank = dict(
            total=None, what="", rate=None, unit="", eta=None, note=""
        )  # drawn before the first poll
        tasks = {path: progress.add_task(name, **blank) for name, path in paths.items()}
        while True:
            for path in tasks.keys() - states.keys():
                state = client.call("GET", path)
                progress.update(tasks[path], **(shown := view(state)))
                if shown["over"]:
                    states[path] = state
            if len(states) == len(tasks):
                return [states[path] for path in paths.values()]
            time.sleep(POLL_SECONDS)


def job_view(state: dict) -> dict:
    counts = state["counts"]
    return dict(
        completed=counts["done"] + counts["failed"],
        total=state["n_prompts"],
        what="prompts",
        rate=state["pairs_per_s"],
        unit="pairs",
        eta=state["eta_s"],
        note=f"{counts['failed']} failed, {counts['flagged']} flagged, "
        f"{state['usage']['generated_tokens']} tokens",
        over=state["status"] in ("done", "failed", "cancelled"),
    )


def usage_cells(usage: dict) -> list[Any]:
    """A job's tokens, budget (`!` once reached), engine seconds and cost, as table cells."""
    budget = usage["max_generated_tokens"]
    return [
        usage["generated_tokens"],
        None if budget is None else f"{budget}{'!' if usage['budget_reached'] else ''}",
        f"{usage['engine_seconds']:.1f}",
        None if usage["cost"] is None else f"{usage['cost']:.4f}",
    ]


def training_view(state: dict) -> dict:
    loss = (state["latest_metrics"] or {}).get("loss")
    return dict(
        completed=state["step"],
        total=state["total_steps"],
        what="steps",
        rate=None,  # rich's own estimate
        unit="steps",
        eta=state["eta_s"],
        note=f"loss {loss:.4f}" if isinstance(loss, int | float) else state["status"],
        over=state["status"] in ("succeeded", "failed", "cancelled"),
    )


def read_prompts(path: Path) -> list:
    """Prompts from .txt (one per line), .json (a list) or .jsonl (strings, messages or {"prompt": ...})."""
    text = path.read_text()
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    items = (
        json.loads(text)
        if path.suffix == ".json"
        else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    prompts = []
    for n, item in enumerate(items, 1):
        if isinstance(item, dict):
            item = item.get("prompt", item.get("messages"))
        if not isinstance(item, str | list):
            raise SystemExit(f"{path}:{n}: expected a string, a message list, or an object with 'prompt'")
        prompts.append(item)
    return prompts


def generate(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Prompts: .txt, .json or .jsonl.")
    ],
    constitution: Annotated[str, typer.Option()],
    revisions: Annotated[int | None, typer.Option(help="Default: the constitution's.")] = None,
    model: Annotated[str | None, typer.Option(help="Default: CAI_MODEL; or train:<id>.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    max_generated_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Each job's budget: past it, its unclaimed prompts are cancelled."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per request (one job each).")] = 10_000,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the jobs are done.")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Submit the prompts of a file as generation jobs."""
    client = Client(url, api_key)
    prompts = read_prompts(file)
    file_hash = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    jobs = []
    for start in range(0, len(prompts), batch_size):
        body: dict[str, Any] = {"prompts": prompts[start : start + batch_size], "constitution": constitution}
        body |= ({"revisions": revisions} if revisions else {}) | ({"model": model} if model else {})
        body |= {"sampling": {"seed": seed}} if seed is not None else {}
        body |= {"max_generated_tokens": max_generated_tokens} if max_generated_tokens else {}
        # Re-running the same command for the same file and batch returns the same job.
        key = f"cli-{file_hash}-{constitution}-{start}-{revisions}-{model}-{seed}"
        key += f"-{max_generated_tokens}" if max_generated_tokens else ""
        job = client.call("POST", "/generate", json=body, headers={"Idempotency-Key": key})
        jobs.append(job["job_id"])
        print(
            f"job {job['job_id']}: {job['n_prompts']} prompts, "
            f"constitution {constitution} @ {job['constitution_version'][:12]}"
        )
    if not wait:
        return
    states = follow(client, {f"job {j}": f"/jobs/{j}" for j in jobs}, job_view)
    for state in states:
        counts = state["counts"]
        print(
            f"job {state['id']}: {state['status']}, {counts['done']} pairs "
            f"({counts['flagged']} flagged), {counts['failed']} failed, "
            f"{state['usage']['generated_tokens']} tokens generated"
            + (f"; stopped: {state['stop_reason']}" if state["stop_reason"] else "")
        )
    if any(state["counts"]["failed"] for state in states):
        raise typer.Exit(1)


def pair_filter_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` one option per field of `PairFilter` (`--job-id`, `--constitution`, ...),
    handed to it validated as `pair_filter`: a filter added to PairFilter reaches the CLI by itself."""
    signature = inspect.signature(command, eval_str=True)
    options = []
    for name, field in PairFilter.model_fields.items():
        schema = PairFilter.model_json_schema()["properties"][name]
        types = {s.get("type") for s in schema.get("anyOf", [schema])}
        kind, default = (
            (bool, field.default) if "boolean" in types else (int if "integer" in types else str, None)
        )
        flag = f"--{name.replace('_', '-')}"
        option = typer.Option(f"{flag}/--no-{flag[2:]}" if default else flag, help=field.description)
        annotation = Annotated[kind if kind is bool else kind | None, option]
        options.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )

    @functools.wraps(command)
    def with_filter(**kwargs: Any) -> None:
        given = {name: kwargs.pop(name) for name in PairFilter.model_fields}
        try:
            pair_filter = PairFilter.model_validate(
                {k: v for k, v in given.items() if v is not None}, strict=False
            )
        except ValidationError as exc:
            problems = (f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in exc.errors())
            raise SystemExit("; ".join(problems)) from None
        command(**kwargs, pair_filter=pair_filter)

    own = [p for p in signature.parameters.values() if p.name != "pair_filter"]
    with_filter.__signature__ = signature.replace(parameters=own + options)  # type: ignore[attr-defined]
    return with_filter


@pair_filter_options
def export(
    out: Annotated[
        Path | None, typer.Option(help="File to write; replaced once the export is complete.")
    ] = None,
    format: Annotated[Literal["jsonl", "parquet"], typer.Option()] = "jsonl",
    style: Annotated[
        Literal["standard", "conversational", "openai"],
        typer.Option(help="TRL's row style, or openai (OpenAI preference fine-tuning JSONL)."),
    ] = "conversational",
    split: Annotated[
        Literal["train", "test", "all"],
        typer.Option(help="Split by prompt: the training split at the same fraction."),
    ] = "all",
    test_fraction: Annotated[float | None, typer.Option(min=0, max=1, help="Default: 0.1.")] = None,
    metadata: Annotated[bool, typer.Option("--metadata", help="Add id, constitution, flags, ...")] = False,
    dedup: Annotated[
        Literal["none", "prompt"] | None,
        typer.Option(help="prompt: one pair per group of near-duplicate prompts (the best by margin)."),
    ] = None,
    hf_folder: Annotated[
        Path | None,
        typer.Option(
            help="Write a Hugging Face Hub dataset folder instead (data/<split>-*.parquet split by "
            "prompt, and a README.md dataset card); replaced once complete. `datasets.load_dataset(DIR)`."
        ),
    ] = None,
    license: Annotated[
        str | None, typer.Option(help="--hf-folder: the card's license id. Default: other.")
    ] = None,
    shard_mb: Annotated[
        float | None, typer.Option(help="--hf-folder: MB per Parquet shard. Default: 500.")
    ] = None,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            metavar="ORG/NAME",
            help="--hf-folder: then upload the folder as this Hub dataset (huggingface_hub; needs HF_TOKEN "
            "or a `hf auth login` token).",
        ),
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
    *,
    pair_filter: PairFilter,
) -> None:
    """Download the dataset (TRL-ready JSONL or Parquet, or a Hub dataset folder with its card)."""
    if (out is None) == (hf_folder is None):
        raise SystemExit("give --out FILE or --hf-folder DIR (one of them)")
    if push_to_hub is not None and hf_folder is None:
        raise SystemExit("--push-to-hub uploads the --hf-folder: give --hf-folder DIR")
    if hf_folder is None and (license is not None or shard_mb is not None):
        raise SystemExit("--license and --shard-mb are options of --hf-folder")
    if style == "openai" and (hf_folder is not None or format != "jsonl"):
        raise SystemExit("--style openai is a JSON Lines format: --format jsonl, not --hf-folder")
    if push_to_hub is not None:
        hub_token()  # before the export, not after it
    params: dict[str, Any] = {"style": style}
    if hf_folder is not None:
        params["format"] = "hf"
        params |= {"license": license} if license is not None else {}
        params |= {"shard_mb": shard_mb} if shard_mb is not None else {}
    else:
        params |= {"format": format, "split": split, "metadata": metadata}
    params |= {"dedup": dedup} if dedup is not None else {}
    params |= (
        {"test_fraction": test_fraction} if test_fraction is not None else {}
    ) | pair_filter.described()
    target = hf_folder if hf_folder is not None else out
    assert target is not None
    partial = target.with_name(f".{target.name}.partial")
    # Written aside and renamed at the end: an interrupted export never leaves a truncated file behind.
    with (
        Client(url, api_key).stream("GET", "/export", params=params) as response,
        partial.open("wb") as handle,
    ):
        for chunk in response.iter_bytes():
            handle.write(chunk)
    if hf_folder is None:
        partial.replace(target)
        print(f"wrote {target} ({target.stat().st_size} bytes)")
        return
    unpack_hub_folder(partial, hf_folder)
    files = sorted(p.relative_to(hf_folder).as_posix() for p in hf_folder.rglob("*") if p.is_file())
    print(f"wrote {hf_folder}: {', '.join(files)}")
    if push_to_hub is not None:
        print(f"uploaded to {upload_folder(hf_folder, push_to_hub)}")


def unpack_hub_folder(tar_path: Path, folder: Path) -> None:
    """The export's tar (one folder, `pairs/`) unpacked beside `folder`, then put in its place."""
    staging = folder.with_name(f".{folder.name}.unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(staging, filter="data")
        if folder.exists():
            shutil.rmtree(folder)
        (staging / "pairs").replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        tar_path.unlink(missing_ok=True)


def hub_token() -> str:
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - it is in the lock file
        raise SystemExit("--push-to-hub needs huggingface_hub (pip install huggingface_hub)") from None
    token = huggingface_hub.get_token()
    if not token:
        raise SystemExit("--push-to-hub: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    return token


def upload_folder(folder: Path, repo_id: str) -> str:
    """Create the Hub dataset repository if need be and upload the folder (card and shards)."""
    from huggingface_hub import HfApi

    card = folder / "README.md"  # its load snippet names the repository now
    card.write_text(
        card.read_text().replace('load_dataset("path/to/this/folder")', f'load_dataset("{repo_id}")')
    )
    api = HfApi(token=hub_token())
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"


def decontaminate(
    source: Annotated[
        str | None, typer.Option(help="The evaluation set: the source tag of its import.")
    ] = None,
    import_id: Annotated[int | None, typer.Option(min=1, help="The evaluation set: its import id.")] = None,
    n: Annotated[int, typer.Option(min=3, max=50, help="Words in a run: a shared run is an overlap.")] = 8,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Flag `contaminated` the pairs whose prompts overlap an imported evaluation set's (a shared run
    of n words), so the benchmark stays held out of exports and training."""
    if (source is None) == (import_id is None):
        raise SystemExit("name the evaluation set: --source TAG or --import-id ID (one of them)")
    benchmark = {"source": source} if source is not None else {"import_id": import_id}
    result = Client(url, api_key).call(
        "POST", "/datasets/decontaminate", json={"benchmark": benchmark, "n": n}
    )
    print(
        f"{result['contaminated']} of {result['checked']} pairs overlap the {result['benchmark_prompts']} "
        f"benchmark prompts ({result['newly_flagged']} newly flagged contaminated)"
    )
    for example in result["examples"]:
        print(f"  pair {example['pair_id']}: {example['overlap']!r}")


def jobs(
    job_id: Annotated[int | None, typer.Argument(help="One job (JSON). None: the latest (a table).")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="The job's failed prompts and errors.")] = False,
    retry: Annotated[bool, typer.Option("--retry", help="Queue the job's failed prompts again.")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Show generation jobs."""
    if (failed or retry) and job_id is None:
        raise SystemExit("--failed and --retry need a job id")
    client = Client(url, api_key)
    if retry:
        result = client.call("POST", f"/jobs/{job_id}/retry")
    elif failed:
        result, cursor = [], None
        while True:
            params = {"status": "failed", "limit": 1000} | ({"cursor": cursor} if cursor else {})
            page = client.call("GET", f"/jobs/{job_id}/prompts", params=params)
            result += page["items"]
            if not (cursor := page["next_cursor"]):
                break
    elif job_id is not None:
        result = client.call("GET", f"/jobs/{job_id}")
    else:
        table = Table(*JOB_TABLE, box=None)
        for job in client.call("GET", "/jobs"):
            counts = [job["counts"][state] for state in ("done", "failed", "flagged")]
            cells = [
                job["id"],
                job["status"],
                job["constitution"],
                job["n_prompts"],
                *counts,
                job["pairs_per_s"],
                *usage_cells(job["usage"]),
            ]
            table.add_row(*("" if cell is None else str(cell) for cell in cells), job["created_at"][:19])
        return console().print(table)
    console().print_json(data=result)


def train(
    config: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="The POST /train body.")
    ] = None,
    constitution: Annotated[str | None, typer.Option(help="Train on this constitution's pairs.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show step, loss and ETA until it ends.")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Start a DPO training job."""
    client = Client(url, api_key)
    body = json.loads(config.read_text()) if config else {}
    if constitution:
        body.setdefault("dataset", {})["constitution"] = constitution
    train_id = client.call("POST", "/train", json=body)["train_id"]
    print(f"training job {train_id}")
    if not wait:
        return
    (state,) = follow(client, {f"train {train_id}": f"/train/{train_id}"}, training_view)
    print(f"training job {train_id}: {state['status']} {state.get('artifact') or state.get('error') or ''}")
    if state["status"] != "succeeded":
        raise typer.Exit(1)
    if state.get("evaluation"):  # evaluated automatically: follow it too
        follow_evaluation(client, train_id)


def evaluate(
    train_id: Annotated[int, typer.Argument(min=1, help="The training job whose model to evaluate.")],
    config: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="The POST /train/{id}/evaluate body.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress, then the win rate.")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Evaluate a trained model against its base: win rate with its 95% interval, reward accuracy."""
    client = Client(url, api_key)
    body = json.loads(config.read_text()) if config else {}
    evaluation = client.call("POST", f"/train/{train_id}/evaluate", json=body)["evaluation"]
    print(f"evaluation {evaluation['id']} of training job {train_id}: {evaluation['status']}")
    if wait:
        follow_evaluation(client, train_id)


def evaluation_view(state: dict) -> dict:
    evaluation = state.get("evaluation") or {}
    win = evaluation.get("win_rate") or {}
    done = win.get("n", 0) + win.get("failed", 0)
    return dict(
        completed=done,
        total=done + win.get("open", 0) or None,
        what="comparisons",
        rate=None,
        unit="comparisons",
        eta=None,
        note=f"{evaluation.get('status', '?')}, win rate {win['rate']:.2f}"
        if win.get("n")
        else evaluation.get("status", "?"),
        over=evaluation.get("status") in ("done", "failed"),
    )


def follow_evaluation(client: Client, train_id: int) -> None:
    """Wait for the job's latest evaluation and print its numbers."""
    (state,) = follow(client, {f"evaluate {train_id}": f"/train/{train_id}"}, evaluation_view)
    evaluation = state["evaluation"]
    if evaluation["status"] != "done":
        raise SystemExit(
            f"evaluation {evaluation['id']}: {evaluation['status']} {evaluation.get('error') or ''}"
        )
    win = evaluation["win_rate"]
    low, high = win["ci95"]
    print(
        f"win rate {win['rate']:.3f} (95% interval {low:.3f}..{high:.3f}) against the base model: "
        f"{win['wins']} wins, {win['ties']} ties, {win['losses']} losses of {win['n']}, "
        f"{win.get('failed') or 0} failed"
    )
    if controlled := win.get("length_controlled"):
        low, high = controlled["ci95"]
        print(
            f"length-controlled win rate {controlled['rate']:.3f} (95% interval {low:.3f}..{high:.3f}): "
            "the judge's preference at no length difference, the promotion gate's figure"
        )
    if judges := win.get("judges"):
        print("judged by " + ", ".join(f"{j['model']} (win rate {j['rate']:.3f})" for j in judges))
    if seen := win.get("prompts_in_training"):
        note = "" if seen["n"] == 0 else ": they measure what the model learned, not how it generalises"
        print(f"{seen['n']} of the compared prompts are prompts of the model's training pairs{note}")
    external = (evaluation.get("reward_accuracy") or {}).get("external")
    if external:
        base, trained = external["base"]["logp"], external["trained"]["implicit_reward"]
        print(
            f"reward accuracy on {external['n_pairs']} external pairs: base {base['accuracy']:.3f}, "
            f"trained {trained['accuracy']:.3f} (mean margin {trained['mean_margin']:.3f})"
        )
    promotion = evaluation.get("promotion") or {}
    if promotion:
        print(f"promotion: {'yes' if promotion.get('promoted') else 'no'} ({promotion.get('reason')})")
