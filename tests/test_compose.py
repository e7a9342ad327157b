"""docker-compose.yml cannot run here; this keeps it consistent with the CLI and the settings."""

import re
import tomllib

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
        assert (path, params) == (["worker"], {"kind": service, "nproc_per_node": 1})


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


def gpu_ids(service: str) -> list[str]:
    (devices,) = SERVICES[service]["deploy"]["resources"]["reservations"]["devices"]
    assert devices["capabilities"] == ["gpu"] and "count" not in devices, service
    return devices["device_ids"]


def test_gpu_workers_reserve_gpus_of_their_own():
    generate, train = gpu_ids("generate"), gpu_ids("train")
    assert generate and train
    assert not set(generate) & set(train), "generation and training share a GPU"
    # One GPU each, as the commands run one process each (a multi-GPU trainer adds --nproc-per-node).
    assert len(generate) == 1 and len(train) == 1


def from_images() -> list[str]:
    """The images the Dockerfile's stages start from (`FROM image [AS name]`), stages excepted."""
    lines = [line.split() for line in (PROJECT_ROOT / "Dockerfile").read_text().splitlines()]
    froms = [words[1] for words in lines if words and words[0].upper() == "FROM"]
    stages = {words[3] for words in lines if len(words) >= 4 and words[0].upper() == "FROM"}
    return [image for image in froms if image not in stages | {"scratch"}]


def test_image_tags_are_pinned():
    images = [s["image"] for s in SERVICES.values()] + from_images()
    assert len(images) == len(SERVICES) + 2
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{image}: pin a release tag"
        assert any(c.isdigit() for c in tag), f"{image}: {tag!r} is no release"
    version = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, service in SERVICES.items():
        if "build" in service:  # our own images carry the project's version
            assert service["image"].endswith(f":{version}"), name


def test_worker_image_is_the_locked_vllm():
    locked = re.search(r"^vllm==(\S+)$", (PROJECT_ROOT / "requirements" / "gpu.lock").read_text(), re.M)
    assert f"vllm/vllm-openai:v{locked.group(1)}" in from_images()
