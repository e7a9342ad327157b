"""Running the service: its processes (API, workers) under one supervisor, and the database they share.

Each process is its own Python module, started by name, so the CLI never imports the API or the
workers. The supervisor starts them in their own sessions (a Ctrl-C in the terminal reaches the
supervisor alone, which stops them in order), writes one log (they inherit its output), restarts
a crashed worker up to 3 times a minute, stops everything when the API crashes or on SIGINT/SIGTERM,
and kills each child's process group at the end, so vLLM's engine process never outlives its worker.

The embedded PostgreSQL (no `DATABASE_URL`): whoever starts it stops it. A command that finds no
server running in `$CAI_DATA_DIR/postgres` starts it, hands its URL to the processes it runs as
`DATABASE_URL` (they never start one of their own), and stops it when it exits, however it was asked
to (Ctrl-C, SIGTERM, a crash of the API). A command that finds one running joins it and leaves it
running; stopping the command that started it stops it for all. A process killed with SIGKILL stops
nothing: `cai-dpo db stop` stops the server it left behind.

Several GPUs (`cai-dpo up --gpus 0,1,2,3 --train-gpus 4,5,6,7`): one generation worker per GPU, or
per group of `--tensor-parallel-size` GPUs, each child seeing only its own (`CUDA_VISIBLE_DEVICES`),
and the training worker on GPUs of its own, under torchrun when it has more than one. On a CPU
host, several generation workers (`--generate-workers N`) each get their own cores
(`VLLM_CPU_OMP_THREADS_BIND`): vLLM pins its threads, and two engines pinned to the same cores
slow each other to a crawl.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from cai_dpo.core.db import embedded_postgres_pid, start_embedded_postgres, stop_embedded_postgres
from cai_dpo.core.settings import Settings

log = logging.getLogger("cai_dpo.supervisor")

SERVICE_MODULES = {
    "api": "app",
    "generate": "workers.generation",
    "train": "workers.training",
}
RESTARTS_PER_MINUTE = 3


def service_module(name: str) -> list[str]:
    """The command line of one of the service's processes (`api`, `generate`, `train`)."""
    return [sys.executable, "-m", SERVICE_MODULES[name]]


def torchrun_command(nproc_per_node: int) -> list[str]:
    """The training worker as `nproc_per_node` processes of one worker, on this host (torchrun)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc_per_node}", "-m", SERVICE_MODULES["train"],
    ]  # fmt: skip


@dataclass(frozen=True)
class Child:
    """One process the supervisor runs: its name in the log, command line and own environment
    (on top of the supervisor's)."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


class LayoutError(ValueError):
    """GPUs or workers asked for that cannot be laid out."""


def parse_devices(text: str | None) -> list[str]:
    """`0,1,2,3` (or GPU UUIDs) as CUDA_VISIBLE_DEVICES lists them; None or empty: none."""
    devices = [part.strip() for part in (text or "").split(",") if part.strip()]
    if len(set(devices)) != len(devices):
        raise LayoutError(f"a GPU is named twice in {text!r}")
    return devices


def cpu_list(cores: Sequence[int]) -> str:
    """Core ids as vLLM and taskset read them: `0-3,8,10-11`."""
    parts: list[str] = []
    ordered = sorted(cores)
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            first, last = ordered[start], ordered[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


def generation_envs(
    *, workers: int | None, gpus: Sequence[str], tensor_parallel_size: int, cores: Sequence[int]
) -> list[dict[str, str]]:
    """The environment of each generation worker.

    GPUs: one worker per `tensor_parallel_size` consecutive GPUs, seeing only those. CPUs: with more
    than one worker, each its own consecutive share of `cores` (split again per tensor-parallel
    rank, `|` between the ranks' lists); one worker keeps vLLM's own binding.
    """
    tp = tensor_parallel_size
    if gpus:
        if len(gpus) % tp:
            raise LayoutError(f"{len(gpus)} GPUs do not split into groups of {tp} (--tensor-parallel-size)")
        if workers is not None and workers != len(gpus) // tp:
            raise LayoutError(
                f"--generate-workers {workers} with {len(gpus)} GPUs in groups of {tp}: "
                f"that is {len(gpus) // tp} worker(s); leave --generate-workers out"
            )
        return [
            {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i : i + tp]), "CAI_VLLM_TENSOR_PARALLEL_SIZE": str(tp)}
            for i in range(0, len(gpus), tp)
        ]
    workers = workers or 1
    tp_env = {"CAI_VLLM_TENSOR_PARALLEL_SIZE": str(tp)} if tp > 1 else {}
    if workers == 1:
        return [tp_env]
    if len(cores) < workers * tp:
        raise LayoutError(
            f"{workers} generation workers of {tp} rank(s) each need {workers * tp} cores; "
            f"this process may use {len(cores)}"
        )
    cores = sorted(cores)
    envs = []
    for mine in _split(cores, workers):
        lists = [cpu_list(rank) for rank in _split(mine, tp)]
        envs.append({"VLLM_CPU_OMP_THREADS_BIND": "|".join(lists)} | tp_env)
    return envs


def _split(items: Sequence[int], parts: int) -> list[list[int]]:
    """`items` in `parts` consecutive runs whose lengths differ by one at most."""
    bounds = [len(items) * i // parts for i in range(parts + 1)]
    return [list(items[bounds[i] : bounds[i + 1]]) for i in range(parts)]


def service_children(
    *,
    api: bool = True,
    generate: bool = True,
    train: bool = True,
    generate_workers: int | None = None,
    gpus: Sequence[str] = (),
    tensor_parallel_size: int = 1,
    train_gpus: Sequence[str] = (),
    cores: Sequence[int] | None = None,
) -> list[Child]:
    """The processes of `cai-dpo up`: the API, the generation workers, the training worker."""
    if gpus and train and not train_gpus:
        raise LayoutError(
            "--gpus names the generation workers' GPUs: give the training worker its own with "
            "--train-gpus (or start it elsewhere: --no-train-worker)"
        )
    shared = sorted(set(gpus) & set(train_gpus)) if generate else []
    if shared:
        log.warning("GPUs %s run both generation and training: each has less memory", ",".join(shared))
    children = [Child("api", service_module("api"))] if api else []
    if generate:
        cores = sorted(os.sched_getaffinity(0)) if cores is None else list(cores)
        envs = generation_envs(
            workers=generate_workers, gpus=gpus, tensor_parallel_size=tensor_parallel_size, cores=cores
        )
        for i, env in enumerate(envs):
            children.append(
                Child("generate" if len(envs) == 1 else f"generate-{i}", service_module("generate"), env)
            )
    if train:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(train_gpus)} if train_gpus else {}
        command = torchrun_command(len(train_gpus)) if len(train_gpus) > 1 else service_module("train")
        children.append(Child("train", command, env))
    return children


@contextlib.contextmanager
def service_database(settings: Settings) -> Iterator[str]:
    """The database URL of the block: `DATABASE_URL`, or the embedded server, started here and
    stopped when the block ends unless it was running already (the module's docstring)."""
    if settings.database_url:
        yield settings.database_url
        return
    joined = embedded_postgres_pid(settings.data_dir)
    if joined:
        log.info("joined the embedded PostgreSQL already running (pid %d); it is left running", joined)
    try:  # a signal while the server starts stops it too
        yield start_embedded_postgres(settings.data_dir, stop_at_exit=False)
    finally:
        if not joined:
            stop_embedded_postgres(settings.data_dir)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C (KeyboardInterrupt), so `finally` blocks run: the database
    started for the block is stopped even when the command is stopped while it starts up."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def kill_group(child: subprocess.Popen) -> None:
    """SIGKILL what is left of a child's process group (it was started as its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


class Supervisor:
    """Runs the service's processes as children; one signal stops them all."""

    def __init__(self, children: Sequence[Child], env: dict[str, str]):
        self.specs = {child.name: child for child in children}
        self.commands = {child.name: child.command for child in children}
        self.env = env
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def start(self, name: str) -> None:
        spec = self.specs[name]
        self.children[name] = subprocess.Popen(spec.command, env=self.env | spec.env, start_new_session=True)
        own = " ".join(f"{key}={value}" for key, value in spec.env.items())
        log.info("started %s (pid %d)%s", name, self.children[name].pid, f" with {own}" if own else "")

    def stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        """Until a signal or a crash it cannot mend; returns the exit code (1 after a crash)."""
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        restarts: dict[str, list[float]] = {}
        code = 0
        try:
            for name in self.commands:
                self.start(name)
            while not self.stopping:
                time.sleep(0.2)
                for name, child in list(self.children.items()):
                    if child.poll() is None or self.stopping:
                        continue
                    log.error("%s exited with code %s", name, child.returncode)
                    kill_group(child)  # vLLM's engine process outlives a killed worker otherwise
                    recent = [t for t in restarts.get(name, []) if time.monotonic() - t < 60]
                    if name == "api" or len(recent) >= RESTARTS_PER_MINUTE:
                        log.error("%s cannot be kept running; stopping", name)
                        self.stopping, code = True, 1
                        break
                    restarts[name] = [*recent, time.monotonic()]
                    self.start(name)
        finally:
            self.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
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


def run_service(
    children: Sequence[Child | str], settings: Settings, prepare: Callable[[str], None] | None = None
) -> int:
    """Run the processes (`Child`ren, or names: `api`, `generate`, `train`) until stopped, on the
    service's database; `prepare(url)` runs first (migrations, the model). Returns the exit code."""
    specs = [c if isinstance(c, Child) else Child(c, service_module(c)) for c in children]
    with interruptible(), service_database(settings) as url:
        if prepare is not None:
            prepare(url)
        env = os.environ | {"DATABASE_URL": url, "CAI_HOST": settings.host, "CAI_PORT": str(settings.port)}
        return Supervisor(specs, env).run()


def run_alone(name: str, settings: Settings, command: list[str] | None = None) -> int:
    """One process (`cai-dpo serve`, `cai-dpo worker`; `command` instead of the module's own, e.g.
    torchrun's). With `DATABASE_URL` there is nothing to own: the process replaces this one (exec),
    so a container's signals and a kill of the command's process group reach it directly. Else it
    runs under the supervisor, which owns the embedded database; returns the exit code then."""
    command = command or service_module(name)
    if not settings.database_url:
        return run_service([Child(name, command)], settings)
    env = os.environ | {"CAI_HOST": settings.host, "CAI_PORT": str(settings.port)}
    os.execvpe(command[0], command, env)
