"""Training under torchrun, on the CPU: 2 processes on gloo against the single-process trainer.

One torchrun group (this module run as `python -m torch.distributed.run --nproc-per-node 2 -m
tests.test_parallel_training`, once per test session) runs every multi-process case and saves what
rank 0 sees; the tests compare it with the single process here:

- one optimizer step on the same batch (the loop's own step function, with the group's ranks and
  with `Ranks.single()`), DDP with LoRA and FSDP2 with every weight: the same gradient (within
  1e-5), metrics, norm and update;
- whole runs (`run_training` with ranks): the same metrics at every step and the same model;
- a sharded checkpoint written by 2 ranks, resumed by 2 ranks: the weights of the run that was
  never stopped. A single process finding that checkpoint starts over rather than misreading it;
- a reward model's run (a classification head, rewards in place of log-probs): the same metrics and
  the same model, its head gathered with the rest.

And the worker itself under torchrun, on the real database: rank 0 claims the job, the ranks train
it, and it is stored once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cai_dpo.core.settings import PROJECT_ROOT
from cai_dpo.core.training_params import TrainParams
from workers.training.data import prepare_pairs
from workers.training.loop import TrainHooks, run_training
from workers.training.model import distribute, load_model
from workers.training.optim import make_optimizer
from workers.training.ranks import Ranks
from workers.training.schedule import pairs_for_step
from workers.training.step import forward_backward

pytestmark = pytest.mark.model  # real torch training, in 2 processes

LEARNING_RATE = 1e-2  # Adam's first step is about ±lr per weight: updates well above 1e-5
BASE = dict(max_length=96, batch_size=2, gradient_accumulation=2, learning_rate=LEARNING_RATE, seed=3)
KINDS = ("lora", "full")  # DDP with LoRA adapters; FSDP2 with every weight


def params(kind: str, **extra) -> TrainParams:
    lora = {"r": 4, "alpha": 8} if kind == "lora" else None
    return TrainParams.model_validate(BASE | {"lora": lora} | extra)


def pair_sets():
    from tests.fixtures.training import load_hh_pairs

    pairs = load_hh_pairs(12)
    return pairs[:9], pairs[9:12]  # 9 pairs: steps of 4, 4 and 1 pair (a rank with none)


def step_batch(model_path: Path, kind: str):
    """The first step's tokenized pairs, and made-up reference log-probs for them."""
    from transformers import AutoTokenizer

    p = params(kind, max_steps=1)
    train, _ = pair_sets()
    tokenized, _, _ = prepare_pairs(AutoTokenizer.from_pretrained(model_path), train, [], p.max_length)
    pairs = [tokenized[i] for i in pairs_for_step(0, len(tokenized), p.pairs_per_step, p.seed)]
    ref = torch.linspace(-400, -300, 2 * len(pairs)).view(2, -1)
    return p, pairs, ref[0], ref[1]


def plain_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (DDP's `module.`, PairForward's `model.`)."""
    return name.removeprefix("module.").removeprefix("model.")


def one_step(model_path: Path, kind: str, ranks: Ranks) -> dict:
    """One optimizer step by the loop's own functions, with `ranks` (a group, or one process alone):
    metrics, norm, gradients and the weights before and after, each whole."""
    from torch.distributed.tensor import DTensor

    p, pairs, ref_chosen, ref_rejected = step_batch(model_path, kind)
    torch.manual_seed(p.seed)
    setup = distribute(*load_model(model_path, p, ranks), p, ranks)
    named = [(plain_name(n), q) for n, q in setup.engine.named_parameters() if q.requires_grad]
    optimizer = make_optimizer(setup.trainable, p.learning_rate, p.weight_decay)

    def full(tensor):
        return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()

    before = {n: full(q) for n, q in named}
    metrics = forward_backward(setup, pairs, ref_chosen, ref_rejected, p, 0, ranks)
    norm = optimizer.clip_and_step(p.max_grad_norm)
    grads = {n: full(q.grad) for n, q in named}
    after = {n: full(q) for n, q in named}
    return {"metrics": metrics, "norm": norm, "grads": grads, "before": before, "after": after}


# --- inside the torchrun group ---------------------------------------------------------------------


def group_step(workdir: Path, model_path: Path, kind: str, ranks) -> None:
    """One optimizer step on every rank; rank 0 saves what it saw."""
    saved = one_step(model_path, kind, ranks)
    if ranks.leader:
        torch.save(saved, workdir / f"step-{kind}.pt")


def group_runs(workdir: Path, model_path: Path, kind: str, ranks) -> None:
    train, evals = pair_sets()

    def run(name: str, steps: int, hooks: TrainHooks | None = None):
        return run_training(
            params(kind, max_steps=steps), model_path=model_path, train_pairs=train, eval_pairs=evals,
            output_dir=workdir / f"{name}-{kind}", hooks=hooks, checkpoint_steps=2, ranks=ranks,
        )  # fmt: skip

    run("two-steps", 2)
    run("whole", 4)
    # Stopped by rank 0's hook after step 2 (its checkpoint written), then resumed.
    steps: list[int] = []
    stopped = run(
        "resumed", 4, TrainHooks(on_step=lambda s, t, m: steps.append(s), should_stop=lambda: len(steps) >= 2)
    )
    if ranks.leader:
        shutil.copytree(workdir / f"resumed-{kind}", workdir / f"sharded-checkpoint-{kind}")
    ranks.barrier()
    resumed = run("resumed", 4)
    if ranks.leader:
        outcome = {"stopped": [stopped.status, stopped.step], "resumed": [resumed.status, resumed.step]}
        (workdir / f"outcome-{kind}.json").write_text(json.dumps(outcome))


REWARD_MODEL = dict(objective="reward_model", max_length=256)  # whole pairs only: room for most


def group_reward_model(workdir: Path, model_path: Path, kind: str, ranks) -> None:
    train, evals = pair_sets()
    run_training(
        params(kind, max_steps=2, **REWARD_MODEL), model_path=model_path, train_pairs=train,
        eval_pairs=evals, output_dir=workdir / f"reward-model-{kind}", ranks=ranks,
    )  # fmt: skip


def group_failed_start(workdir: Path, model_path: Path, ranks) -> None:
    """A run that cannot start (every pair's prompt fills max_length) fails on both ranks alike,
    and the group goes on with the next one."""
    from workers.training.ranks import SetupFailed

    train, evals = pair_sets()
    try:
        run_training(
            params("full", max_steps=1, max_length=8), model_path=model_path, train_pairs=train,
            eval_pairs=evals, output_dir=workdir / "failed-start", ranks=ranks,
        )  # fmt: skip
        error = None
    except SetupFailed as exc:
        error = str(exc)
    errors = ranks.all_gather(error)
    if ranks.leader:
        (workdir / "failed-start.json").write_text(json.dumps(errors))


def group_main(workdir: Path, model_path: Path) -> None:
    from workers.training.ranks import init_from_env

    ranks = init_from_env()
    assert ranks is not None and ranks.world_size == 2
    group_failed_start(workdir, model_path, ranks)
    for kind in KINDS:
        group_step(workdir, model_path, kind, ranks)
        group_runs(workdir, model_path, kind, ranks)
        group_reward_model(workdir, model_path, kind, ranks)
    ranks.barrier()
    ranks.close()


if __name__ == "__main__":
    group_main(Path(sys.argv[1]), Path(sys.argv[2]))


# --- the tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group(tmp_path_factory, tiny_model_path) -> Path:
    """What the 2-process group saved (run once for the module's tests)."""
    workdir = tmp_path_factory.mktemp("torchrun")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "tests.test_parallel_training", str(workdir), str(tiny_model_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return workdir


def test_a_run_that_cannot_start_fails_alike_on_every_rank(group):
    errors = json.loads((group / "failed-start.json").read_text())
    assert errors[0] == errors[1] and "no training pair has a response token left" in errors[0]
    # ... and the group trained every later run (the other tests here).


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_on_two_ranks_is_the_single_process_step(group, tiny_model_path, kind):
    dist = torch.load(group / f"step-{kind}.pt", weights_only=True)
    one = one_step(tiny_model_path, kind, Ranks.single("cpu"))
    assert torch.allclose(dist["metrics"], one["metrics"], rtol=1e-5, atol=1e-5)
    assert dist["norm"].item() == pytest.approx(one["norm"].item(), rel=1e-5)
    assert one["norm"].item() > 1e-3
    assert set(dist["grads"]) == set(one["grads"])
    for name, grad in one["grads"].items():
        assert torch.allclose(dist["grads"][name], grad, rtol=0, atol=1e-5), name
        assert torch.equal(dist["before"][name], one["before"][name]), name
        update, want = (
            dist["after"][name] - dist["before"][name],
            one["after"][name] - one["before"][name],
        )
        # AdamW's first update is lr * g / (|g| + eps), about ±lr whatever |g|: where g is within
        # float32 rounding of 0, its sign (and so the update's) is the reduction order's. On an
        # AVX2 machine none was; on an AVX-512 one a k_proj weight was. Updates agree where the
        # gradient is well above that rounding, and are about ±lr at most everywhere.
        clear = grad.abs() > 1e-6
        assert torch.allclose(update[clear], want[clear], rtol=0, atol=1e-5), name
        assert update.abs().max() <= LEARNING_RATE * 1.001, name
        assert update.abs().max() > LEARNING_RATE / 2 or "lora_A" in name, name
    if kind == "lora":  # only the adapters train; B moves first (A's gradient is 0 while B is)
        assert all("lora_" in name for name in one["grads"])
        assert all(not g.any() for name, g in one["grads"].items() if "lora_A" in name)


def history(model_dir: Path) -> list[dict]:
    speed = {"tokens_per_s", "pairs_per_s", "mfu"}
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in speed} for row in rows]


def single_run(tiny_model_path: Path, tmp_path: Path, kind: str, steps: int):
    train, evals = pair_sets()
    return run_training(
        params(kind, max_steps=steps), model_path=tiny_model_path, train_pairs=train, eval_pairs=evals,
        output_dir=tmp_path / kind, checkpoint_steps=2,
    )  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_on_two_ranks_trains_as_one_process(group, tiny_model_path, tmp_path, kind):
    one = single_run(tiny_model_path, tmp_path, kind, 2)
    dist_dir = group / f"two-steps-{kind}" / "model"
    for row, want in zip(history(dist_dir), history(one.model_dir), strict=True):
        assert row == pytest.approx(want, rel=1e-5, abs=1e-5)
    record = json.loads((dist_dir / "training_config.json").read_text())
    assert record["eval_after"] == pytest.approx(one.eval_after, rel=1e-5, abs=1e-5)
    assert record["eval_before"] == pytest.approx(one.eval_before, rel=1e-5, abs=1e-5)
    assert record["data"]["world_size"] == 2 and record["data"]["parallel"] == (
        "ddp" if kind == "lora" else "fsdp"
    )
    # The saved model: LoRA merged into the base (the same everywhere); FSDP's shards gathered.
    got, want = load_file(dist_dir / "model.safetensors"), load_file(one.model_dir / "model.safetensors")
    assert set(got) == set(want)
    base = load_file(tiny_model_path / "model.safetensors")
    diffs = torch.cat([(got[n] - want[n]).abs().flatten() for n in want])
    moved = torch.cat([(want[n] - base[n]).abs().flatten() for n in want if n in base])
    assert moved.max() > LEARNING_RATE / 2  # the model did train
    assert diffs.max() <= 2 * LEARNING_RATE
    # As in one step: a handful of weights whose gradient sits at Adam's eps differ (measured: 4 of
    # 3.2M with FSDP, none with DDP, whose per-row numerics are the single process's).
    assert (diffs > 1e-5).sum() <= (0 if kind == "lora" else 1e-5 * diffs.numel())


@pytest.mark.parametrize("kind", KINDS)
def test_a_reward_model_on_two_ranks_trains_as_one_process(group, tiny_model_path, tmp_path, kind):
    train, evals = pair_sets()
    one = run_training(
        params(kind, max_steps=2, **REWARD_MODEL), model_path=tiny_model_path, train_pairs=train,
        eval_pairs=evals, output_dir=tmp_path,
    )  # fmt: skip
    dist_dir = group / f"reward-model-{kind}" / "model"
    rows = history(dist_dir)
    assert [row["step"] for row in rows] == [1, 2] and "accuracy" in rows[0]
    for row, want in zip(rows, history(one.model_dir), strict=True):
        assert row == pytest.approx(want, rel=1e-5, abs=1e-5)
    record = json.loads((dist_dir / "training_config.json").read_text())
    assert record["eval_after"] == pytest.approx(one.eval_after, rel=1e-5, abs=1e-5)
    got, want = load_file(dist_dir / "model.safetensors"), load_file(one.model_dir / "model.safetensors")
    assert set(got) == set(want) and "score.weight" in want  # the head, gathered and merged
    diffs = torch.cat([(got[n] - want[n]).abs().flatten() for n in want])
    assert (diffs > 1e-5).sum() <= (0 if kind == "lora" else 1e-5 * diffs.numel())


@pytest.mark.parametrize("kind", KINDS)
def test_a_sharded_checkpoint_resumes_on_two_ranks_to_the_same_weights(
    group, tiny_model_path, tmp_path, kind
):
    outcome = json.loads((group / f"outcome-{kind}.json").read_text())
    assert outcome == {"stopped": ["stopped", 2], "resumed": ["completed", 4]}
    sharded = group / f"sharded-checkpoint-{kind}" / "checkpoint"
    assert json.loads((sharded / "state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed, whole = group / f"resumed-{kind}" / "model", group / f"whole-{kind}" / "model"
    assert json.loads((resumed / "training_config.json").read_text())["resumed_from_step"] == 2
    for row, want in zip(history(resumed), history(whole), strict=True):
        assert row == pytest.approx(want, rel=1e-6, abs=1e-7)
    got, want = load_file(resumed / "model.safetensors"), load_file(whole / "model.safetensors")
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-6), name
    assert not (group / f"resumed-{kind}" / "checkpoint").exists()  # removed with the model saved

    # One process finding a 2-rank checkpoint starts over: the same data gives the same model.
    copy = tmp_path / "copy"
    shutil.copytree(group / f"sharded-checkpoint-{kind}", copy)
    train, evals = pair_sets()
    single = run_training(
        params(kind, max_steps=4), model_path=tiny_model_path, train_pairs=train, eval_pairs=evals,
        output_dir=copy, checkpoint_steps=2,
    )  # fmt: skip
    assert single.status == "completed" and single.step == 4
    assert json.loads((single.model_dir / "training_config.json").read_text())["resumed_from_step"] is None


# --- the worker under torchrun ------------------------------------------------------------------------


@pytest.mark.e2e  # the worker's processes, under torchrun, on the real database
def test_a_torchrun_worker_claims_on_rank_0_and_trains_on_both(settings, db, tiny_model_path, tmp_path):
    from sqlalchemy import select

    from cai_dpo.core.db import session_scope
    from cai_dpo.core.queries import training as training_queries
    from cai_dpo.core.tables import TrainingJob, TrainingMetric, Worker
    from tests.helpers import insert_pairs, wait_for

    insert_pairs(db, 16, flagged_extra=False)
    with session_scope(db) as session:
        train_id = training_queries.create_training_job(
            session,
            base_model=str(tiny_model_path),
            dataset={"source": "test"},
            params={"max_steps": 3, "batch_size": 2, "max_length": 64, "lora": {"r": 4}, "evaluate": False},
        ).id
    store = tmp_path / "shared-models"
    env = os.environ | {
        "DATABASE_URL": settings.database_url,
        "CAI_DATA_DIR": str(settings.data_dir),
        "CAI_MODELS_DIR": str(tmp_path / "models"),
        "CAI_POLL_SECONDS": "0.5",
        "CAI_ARTIFACT_STORE": str(store),
    }
    command = [sys.executable, "-m", "cai_dpo.cli.main", "worker", "train", "--nproc-per-node", "2"]
    worker = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, start_new_session=True)

    def job() -> TrainingJob:
        with session_scope(db) as session:
            return session.get(TrainingJob, train_id)

    try:
        wait_for(
            lambda: job().status in ("succeeded", "failed"), 600, "the job", procs=(worker,), interval=0.5
        )
        row = job()
        assert row.status == "succeeded", row.last_error
        assert row.attempts == 1 and row.step == row.total_steps == 3
        with session_scope(db) as session:
            steps = session.scalars(
                select(TrainingMetric.step).where(TrainingMetric.train_id == train_id)
            ).all()
            workers = session.scalars(select(Worker).where(Worker.kind == "train")).all()
        assert sorted(steps) == [1, 2, 3]  # written once, by rank 0
        assert [w.stats.get("ranks") for w in workers] == [2]  # one worker to the service: rank 0
        artifact = Path(row.artifact_path)
        assert artifact.parent == store and (artifact / "config.json").exists()
        config = json.loads((artifact / "training_config.json").read_text())
        assert config["data"]["world_size"] == 2 and config["data"]["parallel"] == "ddp"
    finally:
        # torchrun passes SIGTERM on; rank 0 stops, then tells the followers (torchrun itself
        # reports the signal as exit code 1).
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            raise AssertionError("the torchrun worker did not stop on SIGTERM") from None
