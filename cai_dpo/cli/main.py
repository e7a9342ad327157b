"""The `cai-dpo` command: run the service (`up`, `serve`, `worker`), manage it (`db`, `model`,
`settings`), and talk to a running one (`generate`, `export`, `jobs`, `train`)."""

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

from cai_dpo.cli import client
from cai_dpo.cli.calibrate import calibrate
from cai_dpo.cli.model_serve import serve as serve_model
from cai_dpo.cli.supervisor import (
    LayoutError,
    parse_devices,
    run_alone,
    run_service,
    service_children,
    service_database,
    torchrun_command,
)
from cai_dpo.core.db import downgrade_database, stop_embedded_postgres, upgrade_database
from cai_dpo.core.logs import configure_logging
from cai_dpo.core.model_sources import prepare_bundled_model, resolve_model
from cai_dpo.core.settings import Settings, UnsafeBind, check_bind, get_settings

log = logging.getLogger("cai_dpo")

app = typer.Typer(
    name="cai-dpo",
    help=__doc__,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_show_locals=False,  # locals hold API keys
)
db_app = typer.Typer(help="The database: migrations, and the embedded server.", no_args_is_help=True)
model_app = typer.Typer(help="Models.", no_args_is_help=True)
app.add_typer(db_app, name="db", rich_help_panel="Manage it")
app.add_typer(model_app, name="model", rich_help_panel="Manage it")
for command in (
    client.generate,
    client.export,
    client.jobs,
    client.train,
    client.evaluate,
    calibrate,
    client.decontaminate,
):
    app.command(rich_help_panel="Talk to a running service")(command)

Host = Annotated[str | None, typer.Option(help="Bind address. Default: CAI_HOST.")]
Port = Annotated[int | None, typer.Option(min=1, max=65535, help="Port. Default: CAI_PORT.")]


@app.callback()
def logging_setup(ctx: typer.Context) -> None:
    configure_logging(ctx.invoked_subcommand or "cai-dpo")


def bound_settings(host: str | None, port: int | None) -> Settings:
    """The settings with the command's address; no API keys means loopback only."""
    settings = get_settings()
    settings = settings.model_copy(update={"host": host or settings.host, "port": port or settings.port})
    try:
        check_bind(settings)
    except UnsafeBind as exc:
        raise SystemExit(str(exc)) from None
    return settings


@app.command(rich_help_panel="Run the service")
def up(
    host: Host = None,
    port: Port = None,
    no_generate_worker: Annotated[
        bool, typer.Option("--no-generate-worker", help="Without the generation worker.")
    ] = False,
    no_train_worker: Annotated[
        bool, typer.Option("--no-train-worker", help="Without the training worker.")
    ] = False,
    no_api: Annotated[
        bool, typer.Option("--no-api", help="Without the API: a host of workers, on a shared DATABASE_URL.")
    ] = False,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="GPUs of the generation workers, e.g. `0,1,2,3`: one worker per GPU (or per "
            "--tensor-parallel-size GPUs), each seeing only its own (CUDA_VISIBLE_DEVICES)."
        ),
    ] = None,
    tensor_parallel_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="GPUs per generation worker (vLLM tensor parallel). Default: CAI_VLLM_TENSOR_PARALLEL_SIZE.",
        ),  # fmt: skip
    ] = None,
    train_gpus: Annotated[
        str | None,
        typer.Option(
            help="GPUs of the training worker, e.g. `4,5,6,7`; more than one runs it under torchrun "
            "(FSDP2 for full fine-tuning, DDP for LoRA). Required with --gpus."
        ),
    ] = None,
    generate_workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Generation workers on a CPU host, each with its own cores (VLLM_CPU_OMP_THREADS_BIND). "
            "With --gpus: one per GPU group.",
        ),
    ] = None,
) -> None:
    """Everything: the database (embedded unless DATABASE_URL), migrations, the model, the API and
    the workers (one of each kind by default). Ctrl-C or SIGTERM stops it all."""
    settings = bound_settings(host, port)
    try:
        children = service_children(
            api=not no_api,
            generate=not no_generate_worker,
            train=not no_train_worker,
            generate_workers=generate_workers,
            gpus=parse_devices(gpus),
            tensor_parallel_size=tensor_parallel_size or settings.vllm_tensor_parallel_size,
            train_gpus=parse_devices(train_gpus),
        )
    except LayoutError as exc:
        raise typer.BadParameter(str(exc)) from None

    def prepare(url: str) -> None:
        upgrade_database(url)
        if settings.engine == "vllm" and not no_generate_worker:
            resolve_model(settings.model, settings)
        database = "DATABASE_URL" if settings.database_url else "embedded"
        where = "workers only" if no_api else f"http://{settings.host}:{settings.port}"
        log.info("cai-dpo on %s (database: %s)", where, database)

    raise typer.Exit(run_service(children, settings, prepare))


@app.command(rich_help_panel="Run the service")
def serve(host: Host = None, port: Port = None) -> None:
    """The HTTP API alone."""
    raise typer.Exit(run_alone("api", bound_settings(host, port)))


@app.command(rich_help_panel="Run the service")
def worker(
    kind: Annotated[Literal["generate", "train"], typer.Argument(help="Which worker.")],
    nproc_per_node: Annotated[
        int,
        typer.Option(
            min=1,
            help="train: processes of the worker on this host, one per GPU, under torchrun (FSDP2 / "
            "DDP). Several hosts: run `torchrun ... -m workers.training` on each (docs/DEPLOY.md).",
        ),
    ] = 1,
) -> None:
    """A generation or training worker."""
    if nproc_per_node > 1 and kind != "train":
        raise typer.BadParameter("--nproc-per-node is for the training worker")
    command = torchrun_command(nproc_per_node) if nproc_per_node > 1 else None
    raise typer.Exit(run_alone(kind, get_settings(), command))


@db_app.command()
def upgrade(revision: Annotated[str, typer.Argument(help="Alembic revision.")] = "head") -> None:
    """Migrate the schema up (to the latest by default)."""
    with service_database(get_settings()) as url:
        upgrade_database(url, revision)
    log.info("database upgraded to %s", revision)


@db_app.command()
def downgrade(revision: Annotated[str, typer.Argument(help="Alembic revision.")] = "base") -> None:
    """Migrate the schema down (to an empty database by default)."""
    with service_database(get_settings()) as url:
        downgrade_database(url, revision)
    log.info("database downgraded to %s", revision)


@db_app.command()
def stop() -> None:
    """Stop the embedded PostgreSQL in $CAI_DATA_DIR/postgres (left running by a killed command)."""
    folder = get_settings().data_dir / "postgres"
    pid = stop_embedded_postgres(get_settings().data_dir)
    print(f"stopped the embedded PostgreSQL in {folder} (pid {pid})" if pid else f"none running in {folder}")


@model_app.command()
def prepare() -> None:
    """Download, check and convert the bundled model once; print its folder."""
    print(prepare_bundled_model(get_settings().models_dir))


model_app.command("serve")(serve_model)


@app.command(rich_help_panel="Manage it")
def settings() -> None:
    """Print the settings table of the README (Markdown), from the Settings class itself."""
    print("| Variable | Default | Meaning |\n|---|---|---|")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if alias is not None else f"CAI_{name.upper()}"
        default = field.default
        if isinstance(default, Path):
            default = f"<repo>/{default.name}"
        shown = "(unset)" if default in (None, "") else f"`{default}`"
        print(f"| `{env}` | {shown} | {field.description or ''} |")


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="cai-dpo")


if __name__ == "__main__":
    main()
