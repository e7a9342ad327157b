"""What `cai-dpo up` and `cai-dpo worker` start on a host with several GPUs or cores: which
processes, with which command line and which environment of their own (no process is started)."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cai_dpo.cli import main as cli_main
from cai_dpo.cli import supervisor
from cai_dpo.cli.supervisor import (
    Child,
    LayoutError,
    Supervisor,
    cpu_list,
    generation_envs,
    parse_devices,
    service_children,
)

pytestmark = pytest.mark.unit

GENERATE = [sys.executable, "-m", "workers.generation"]
TRAIN = [sys.executable, "-m", "workers.training"]


def by_name(children: list[Child]) -> dict[str, Child]:
    return {child.name: child for child in children}


def test_one_generation_worker_per_gpu_each_seeing_only_its_own():
    children = by_name(service_children(gpus=["0", "1", "2", "3"], train_gpus=["4"]))
    assert list(children) == ["api", "generate-0", "generate-1", "generate-2", "generate-3", "train"]
    for i in range(4):
        child = children[f"generate-{i}"]
        assert child.command == GENERATE
        assert child.env == {"CUDA_VISIBLE_DEVICES": str(i), "CAI_VLLM_TENSOR_PARALLEL_SIZE": "1"}
    # One training GPU: the plain worker, on that GPU alone.
    assert children["train"] == Child("train", TRAIN, {"CUDA_VISIBLE_DEVICES": "4"})
    assert children["api"].env == {}


def test_tensor_parallel_groups():
    envs = generation_envs(workers=None, gpus=["0", "1", "2", "3"], tensor_parallel_size=2, cores=[0])
    assert envs == [
        {"CUDA_VISIBLE_DEVICES": "0,1", "CAI_VLLM_TENSOR_PARALLEL_SIZE": "2"},
        {"CUDA_VISIBLE_DEVICES": "2,3", "CAI_VLLM_TENSOR_PARALLEL_SIZE": "2"},
    ]
    with pytest.raises(LayoutError, match="groups of 3"):
        generation_envs(workers=None, gpus=["0", "1", "2", "3"], tensor_parallel_size=3, cores=[0])
    with pytest.raises(LayoutError, match="that is 2 worker"):
        generation_envs(workers=4, gpus=["0", "1", "2", "3"], tensor_parallel_size=2, cores=[0])


def test_a_multi_gpu_trainer_runs_under_torchrun_on_its_own_gpus():
    (train,) = service_children(api=False, generate=False, train_gpus=["4", "5", "6", "7"])
    assert train.env == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert train.command == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
        "-m", "workers.training",
    ]  # fmt: skip


def test_gpus_for_generation_need_gpus_for_training():
    with pytest.raises(LayoutError, match="--train-gpus"):
        service_children(gpus=["0", "1"])
    assert [c.name for c in service_children(gpus=["0", "1"], train=False)] == [
        "api",
        "generate-0",
        "generate-1",
    ]


def test_cpu_workers_get_cores_of_their_own():
    # Two engines on a two-core machine (the CI's): one core each, never the same one.
    envs = [c.env for c in service_children(generate_workers=2, cores=[0, 1]) if c.name.startswith("gen")]
    assert envs == [{"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_OMP_THREADS_BIND": "1"}]
    # Uneven shares differ by one core at most; tensor-parallel ranks split a worker's share.
    three = generation_envs(workers=3, gpus=[], tensor_parallel_size=1, cores=range(8))
    assert [e["VLLM_CPU_OMP_THREADS_BIND"] for e in three] == ["0-1", "2-4", "5-7"]
    two_by_two = generation_envs(workers=2, gpus=[], tensor_parallel_size=2, cores=[4, 5, 6, 7, 8, 9, 10, 11])
    assert two_by_two == [
        {"VLLM_CPU_OMP_THREADS_BIND": "4-5|6-7", "CAI_VLLM_TENSOR_PARALLEL_SIZE": "2"},
        {"VLLM_CPU_OMP_THREADS_BIND": "8-9|10-11", "CAI_VLLM_TENSOR_PARALLEL_SIZE": "2"},
    ]
    # One worker keeps vLLM's own binding (the default `cai-dpo up`, unchanged).
    assert generation_envs(workers=None, gpus=[], tensor_parallel_size=1, cores=[0, 1]) == [{}]
    with pytest.raises(LayoutError, match="need 3 cores"):
        generation_envs(workers=3, gpus=[], tensor_parallel_size=1, cores=[0, 1])


def test_core_lists_and_device_lists():
    assert cpu_list([3, 0, 1, 2, 8, 10, 11]) == "0-3,8,10-11"
    assert cpu_list([5]) == "5"
    assert parse_devices(" 0, 1,2 ") == ["0", "1", "2"] and parse_devices(None) == []
    with pytest.raises(LayoutError, match="twice"):
        parse_devices("0,1,0")


def test_each_child_gets_the_supervisor_environment_and_its_own(monkeypatch):
    started: dict[str, dict[str, str]] = {}

    class Recorder:
        def __init__(self, command, env, start_new_session):
            started[command[-1]] = env
            self.pid = 1

    monkeypatch.setattr(subprocess, "Popen", Recorder)
    children = [Child("a", ["x", "a"], {"VLLM_CPU_OMP_THREADS_BIND": "0"}), Child("b", ["x", "b"])]
    supervisor_ = Supervisor(
        children, {"DATABASE_URL": "postgresql://db", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    )
    for name in ("a", "b"):
        supervisor_.start(name)
    assert started == {
        "a": {"DATABASE_URL": "postgresql://db", "VLLM_CPU_OMP_THREADS_BIND": "0"},
        "b": {"DATABASE_URL": "postgresql://db", "VLLM_CPU_OMP_THREADS_BIND": "auto"},
    }


def test_the_commands_lay_out_what_their_options_say(monkeypatch):
    ran: list = []
    monkeypatch.setattr(
        cli_main, "run_service", lambda children, settings, prepare: ran.append(children) or 0
    )
    monkeypatch.setattr(cli_main, "run_alone", lambda name, settings, command=None: ran.append(command) or 0)
    runner = CliRunner()

    result = runner.invoke(
        cli_main.app, ["up", "--gpus", "0,1", "--tensor-parallel-size", "2", "--train-gpus", "2,3"]
    )
    assert result.exit_code == 0, result.output
    generate, train = ran.pop()[1:]
    assert generate.env == {"CUDA_VISIBLE_DEVICES": "0,1", "CAI_VLLM_TENSOR_PARALLEL_SIZE": "2"}
    assert train.env == {"CUDA_VISIBLE_DEVICES": "2,3"} and "--nproc-per-node=2" in train.command

    monkeypatch.setattr(supervisor.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    result = runner.invoke(cli_main.app, ["up", "--generate-workers", "2", "--no-train-worker"])
    assert result.exit_code == 0, result.output
    binds = {c.name: c.env.get("VLLM_CPU_OMP_THREADS_BIND") for c in ran.pop()}
    assert binds == {"api": None, "generate-0": "0-1", "generate-1": "2-3"}

    result = runner.invoke(cli_main.app, ["up", "--gpus", "0,1"])
    assert result.exit_code == 2 and "--train-gpus" in result.output

    # A GPU host of a larger service: workers only, on the shared database.
    result = runner.invoke(cli_main.app, ["up", "--no-api", "--gpus", "0,1,2", "--train-gpus", "3"])
    assert result.exit_code == 0, result.output
    assert [c.name for c in ran.pop()] == ["generate-0", "generate-1", "generate-2", "train"]

    assert runner.invoke(cli_main.app, ["worker", "train", "--nproc-per-node", "4"]).exit_code == 0
    assert ran.pop() == supervisor.torchrun_command(4)
    assert runner.invoke(cli_main.app, ["worker", "train"]).exit_code == 0
    assert ran.pop() is None  # the module itself, as before
    result = runner.invoke(cli_main.app, ["worker", "generate", "--nproc-per-node", "2"])
    assert result.exit_code == 2 and "training worker" in result.output
