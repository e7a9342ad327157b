"""docker-compose.yml cannot run here; this keeps it consistent with the CLI and the settings."""

import re

import pytest
import typer
import yaml

from cai_dpo.cli.main import app
from cai_dpo.cli.supervisor import SERVICE_MODULES
from cai_dpo.core.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.unit

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def known_env_vars() -> set[str]:
    names = {"DATABASE_URL"}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names |= set(alias.choices) if alias is not None else {f"CAI_{name.upper()}"}
    return names


def test_has_the_four_services_with_health_checks():
    assert {"postgres", "api", "generate", "train"} <= set(SERVICES)
    for name in ("postgres", "api", "generate", "train"):
        assert "healthcheck" in SERVICES[name], name


def parse(args: list[str]) -> tuple[list[str], dict]:
    """The command path an argument list names and its parsed parameters, as `cai-dpo` would
    parse them (an unknown command, option or choice raises), without running anything."""
    command, path = typer.main.get_command(app), []
    while isinstance(command, typer.core.TyperGroup):
        name, *args = args
        command = command.get_command(typer.Context(command), name)
        assert command is not None, f"no command {name!r} in cai-dpo {' '.join(path)}"
        path.append(name)
    return path, command.make_context(" ".join(path), args).params


@pytest.mark.parametrize("service", ["api", "generate", "train"])
def test_commands_are_cli_commands(service):
    command = SERVICES[service]["command"]
    assert command[0] == "cai-dpo"
    path, params = parse(command[1:])
    if service == "api":
        assert (path, params) == (["serve"], {"host": "0.0.0.0", "port": 8000})
    else:
        assert (path, params) == (["worker"], {"kind": service})


@pytest.mark.parametrize("service", ["generate", "train"])
def test_worker_health_checks_look_for_the_process_the_command_runs(service):
    # `cai-dpo worker` execs into the worker's module when DATABASE_URL is set, as here.
    assert SERVICE_MODULES[service] in SERVICES[service]["healthcheck"]["test"]


def test_parse_refuses_what_cai_dpo_refuses():
    with pytest.raises(typer.BadParameter, match="evaluate"):
        parse(["worker", "evaluate"])
    with pytest.raises(AssertionError, match="no command"):
        parse(["serves"])


@pytest.mark.parametrize("service", ["api", "generate", "train"])
def test_environment_uses_real_settings_and_the_same_database(service):
    env = SERVICES[service]["environment"]
    unknown = set(env) - known_env_vars()
    assert not unknown, f"{service} sets variables no setting reads: {unknown}"
    assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
    volumes = {v.split(":")[1] for v in SERVICES[service]["volumes"]}
    assert {env["CAI_DATA_DIR"], env["CAI_CONSTITUTIONS_DIR"]} <= volumes


def test_api_needs_keys_since_it_binds_all_interfaces():
    api = SERVICES["api"]
    assert "0.0.0.0" in api["command"]
    assert re.search(r"\$\{CAI_API_KEYS:\?", api["environment"]["CAI_API_KEYS"])


def test_gpu_workers_reserve_a_gpu():
    for service in ("generate", "train"):
        devices = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
