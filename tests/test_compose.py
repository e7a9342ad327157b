"""docker-compose.yml cannot run here; this keeps it consistent with the CLI and the settings."""

import re

import pytest
import yaml

from cai_dpo.cli.main import build_parser
from cai_dpo.core.settings import PROJECT_ROOT, Settings

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


@pytest.mark.parametrize("service", ["api", "generate", "train"])
def test_commands_are_cli_commands(service):
    command = SERVICES[service]["command"]
    assert command[0] == "cai-dpo"
    args = build_parser().parse_args(command[1:])
    assert args.func.__name__ in {"cmd_serve", "cmd_worker"}


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
