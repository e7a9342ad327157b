"""The quality loop's bookkeeping: generation modes (revise + verify, ai_feedback, best_of_n) write
pairs with their preference, scores and margin; exports filter on them; an evaluation compares
the trained model with its base and the promotion gate acts on the win rate.

A scripted engine stands in for vLLM (it prefers the longer of two options, so outcomes are
known), with the real `Judge` building the questions; the same modes on the real engine and the
bundled model are in test_quality_e2e.py. The statistics are tested alone at the top.
"""

import asyncio
import json
import math
import re

import pytest
from sqlalchemy import select

from cai_dpo.core.db import session_scope
from cai_dpo.core.evaluation import (
    EvaluationRequest,
    promotion_decision,
    reward_accuracy,
    wilson_interval,
    win_rate,
)
from cai_dpo.core.generation_modes import Sampling
from cai_dpo.core.queries import evaluations as evaluation_queries
from cai_dpo.core.queries import training as training_queries
from cai_dpo.core.tables import Comparison, Pair, Prompt, TrainingJob, TrainPolicy
from tests.fake_engine import ScriptedEngine
from tests.helpers import run_until, statuses
from workers.generation.modes import log_odds
from workers.generation.worker import GenerationWorker
from workers.training.worker import TrainingWorker

# --- the statistics, alone ------------------------------------------------------------------------


@pytest.mark.unit
def test_win_rate_counts_ties_as_half_and_gives_a_wilson_interval():
    result = win_rate([0.9, 0.8, 0.52, 0.48, 0.1, 0.3])
    assert (result.wins, result.ties, result.losses, result.n) == (2, 2, 2, 6)
    assert result.rate == pytest.approx(0.5)
    low, high = result.ci95
    assert low < 0.5 < high and high - low > 0.5  # six comparisons decide nothing
    # The Wilson interval of 45 successes in 50: known values (Wilson 1927; e.g. R's prop.test
    # without continuity correction gives 0.7864..0.9565).
    assert wilson_interval(45, 50) == pytest.approx((0.7864, 0.9565), abs=1e-4)
    assert win_rate([]).n == 0 and win_rate([]).ci95 == (0.0, 1.0)


@pytest.mark.unit
def test_promotion_needs_the_lower_bound_above_one_half():
    assert promotion_decision(win_rate([0.9] * 40))[0] is True
    promoted, reason = promotion_decision(win_rate([0.9] * 6 + [0.1] * 4))
    assert promoted is False and "does not exclude 0.5" in reason
    assert promotion_decision(win_rate([]))[0] is False


@pytest.mark.unit
def test_reward_accuracy_and_margin():
    assert reward_accuracy([1.0, 2.0, 0.0], [0.5, 3.0, -1.0]) == {
        "accuracy": pytest.approx(2 / 3),
        "mean_margin": pytest.approx((0.5 - 1.0 + 1.0) / 3),
        "n": 3,
    }


@pytest.mark.unit
def test_margin_is_the_log_odds_of_the_preference():
    assert log_odds(0.5) == 0.0 and log_odds(0.731058578) == pytest.approx(1.0, abs=1e-6)
    assert math.isfinite(log_odds(1.0)) and math.isfinite(log_odds(0.0))


# --- modes on a scripted engine --------------------------------------------------------------------


class LengthJudgeEngine(ScriptedEngine):
    """Answers chats like ScriptedEngine; as a judge, it prefers the longer option by a known margin.

    Sampled answers differ in length by their seed, so `n` samples rank deterministically.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", **kwargs):
        super().__init__(model=model, **kwargs)
        self.judged = 0

    async def chat(self, messages, sampling, request_id):
        result = await super().chat(messages, sampling, request_id)
        if "-sample" in request_id:  # ai_feedback / best_of_n: answers of different lengths
            result.text = "word " * (1 + int(request_id.rsplit("sample", 1)[1].split("#")[0]))
        return result

    async def option_logprobs(self, messages, assistant_prefix, options, request_id):
        text = messages[-1]["content"]
        if text.endswith("\n(A) Yes\n(B) No"):  # a no-harm check, not a comparison
            return await super().option_logprobs(messages, assistant_prefix, options, request_id)
        self.judged += 1
        a = re.search(r"\n\(A\) (.*)\n\(B\) ", text, re.S).group(1)
        b = text.rsplit("\n(B) ", 1)[1]
        longer_a = len(a) >= len(b)
        return {"A": math.log(0.8 if longer_a else 0.2), "B": math.log(0.2 if longer_a else 0.8)}

    async def continue_chat(self, messages, assistant_prefix, sampling, request_id):
        return await super().chat(messages, sampling, request_id)


def run_generation(settings, db, engine, condition, timeout: float = 60.0) -> GenerationWorker:
    settings = settings.model_copy(update={"max_in_flight": 4, "claim_batch": 4, "poll_seconds": 0.1})
    worker = GenerationWorker(settings, db, url=settings.database_url, engine_factory=lambda *_: engine)
    run_until(worker, condition, timeout)
    return worker


def all_done(db):
    return lambda: bool(statuses(db)) and all(status == "done" for status, _, _ in statuses(db).values())


def pairs(db) -> list[Pair]:
    with session_scope(db) as session:
        return list(session.scalars(select(Pair).order_by(Pair.id)))


@pytest.mark.db
def test_ai_feedback_keeps_the_judges_favourite_and_least_favourite(client, settings, db):
    body = {"prompts": ["one", "two"], "constitution": "harmless", "mode": "ai_feedback", "n": 3}
    body["scorer"] = {"kind": "judge", "k": 2}
    assert client.post("/generate", json=body).status_code == 202
    engine = LengthJudgeEngine()
    run_generation(settings, db, engine, all_done(db))
    stored = pairs(db)
    assert len(stored) == 2
    for pair in stored:
        # Three samples of 1, 2 and 3 words: the judge prefers the longer one, 80:20 each time.
        assert pair.chosen == "word word word" and pair.rejected == "word"
        assert pair.trajectory["mode"] == "ai_feedback" and len(pair.trajectory["samples"]) == 3
        assert pair.scorer == "judge" and pair.scores is None
        assert pair.preference["p_chosen"] == pytest.approx(0.8)
        assert pair.preference["orders"] == 2 and len(pair.preference["principles"]) == 2
        assert pair.margin == pytest.approx(math.log(0.8 / 0.2))
    # 3 pairs of samples, 2 principles, 2 orders, per prompt.
    assert engine.judged == 2 * 3 * 2 * 2


@pytest.mark.db
def test_verify_flags_a_revision_the_judge_does_not_prefer_and_exports_filter_on_it(client, settings, db):
    body = {"prompts": ["a", "b"], "constitution": "harmless", "verify": {"scorer": {"kind": "judge"}}}
    assert client.post("/generate", json=body).status_code == 202
    # Revisions are shorter than first answers here ("answer to: <critique request>"... vs the
    # prompt): the length judge prefers whichever is longer; which one that is, the pair says.
    run_generation(settings, db, LengthJudgeEngine(), all_done(db))
    stored = pairs(db)
    assert len(stored) == 2
    for pair in stored:
        preferred_revision = len(pair.chosen) >= len(pair.rejected)
        assert pair.preference["p_chosen"] == pytest.approx(0.8 if preferred_revision else 0.2)
        assert ("not_improved" in pair.flags) == (not preferred_revision)
    exported = client.get("/export", params={"metadata": True, "include_flagged": True}).text.splitlines()
    rows = [json.loads(line) for line in exported]
    assert {row["scorer"] for row in rows} == {"judge"}
    assert all(row["p_chosen"] in (pytest.approx(0.8), pytest.approx(0.2)) for row in rows)
    assert all(row["score_chosen"] is None for row in rows)  # a judge compares; it gives no scores
    improved = [row["id"] for row in rows if row["p_chosen"] > 0.5]
    filtered = client.get("/pairs", params={"min_margin": 1, "include_flagged": True}).json()["items"]
    assert sorted(item["id"] for item in filtered) == sorted(improved)
    assert (
        client.get("/pairs", params={"scorer": "reward_model", "include_flagged": True}).json()["items"] == []
    )


class LengthScorer:
    """A scorer with scores (as a reward model): the number of characters."""

    kind = "reward_model"
    model = "length"

    async def score(self, conversation, responses):
        return [float(len(r)) for r in responses]

    async def compare(self, conversation, first, second, *, seed):
        raise AssertionError("a scoring scorer ranks by its scores")


@pytest.mark.db
def test_best_of_n_keeps_the_best_and_worst_scores(client, settings, db, tmp_path):
    # A model folder where the server offers models (the scorer itself is scripted).
    folder = settings.models_dir / f"reward-{tmp_path.name}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    body = {
        "prompts": ["one"],
        "constitution": "harmless",
        "mode": "best_of_n",
        "n": 4,
        "scorer": {"kind": "reward_model", "model": str(folder)},
    }
    assert client.post("/generate", json=body).status_code == 202
    engine = LengthJudgeEngine()
    settings = settings.model_copy(update={"max_in_flight": 4})
    worker = GenerationWorker(settings, db, url=settings.database_url, engine_factory=lambda *_: engine)

    async def scripted_scorer(spec, constitution, constitution_hash):
        assert spec.kind == "reward_model" and spec.model == str(folder)
        return LengthScorer()

    worker.scorer = scripted_scorer
    run_until(worker, all_done(db), timeout=60)
    (pair,) = pairs(db)
    assert pair.chosen == "word word word word" and pair.rejected == "word"  # answers are stored trimmed
    assert pair.scores == {"chosen": 19.0, "rejected": 4.0}
    assert pair.margin == pytest.approx(pair.scores["chosen"] - pair.scores["rejected"])  # Bradley-Terry
    assert pair.scorer == "reward_model" and pair.preference["orders"] == 1


@pytest.mark.db
def test_bad_modes_are_refused_naming_the_field(client):
    cases = [
        ({"mode": "best_of_n"}, "scorer"),
        ({"mode": "best_of_n", "scorer": {"kind": "judge"}}, "scorer"),
        ({"mode": "ai_feedback", "n": 1}, "n"),
        ({"mode": "revise", "scorer": {"kind": "judge"}}, "scorer"),
        ({"mode": "ai_feedback", "verify": {"scorer": {"kind": "judge"}}}, "verify"),
        ({"mode": "best_of_n", "scorer": {"kind": "reward_model", "model": "/nowhere"}}, "scorer.model"),
        ({"verify": {"scorer": {"kind": "reward_model"}}}, "verify.scorer"),
    ]
    for extra, field in cases:
        response = client.post("/generate", json={"prompts": ["x"], "constitution": "harmless"} | extra)
        assert response.status_code == 422, (extra, response.text)
        assert response.json()["detail"].startswith(field), (extra, response.json()["detail"])
    # A trained model that does not exist is the server's state, not the form: 404 naming the field.
    extra = {"mode": "best_of_n", "scorer": {"kind": "implicit", "model": "train:99"}}
    response = client.post("/generate", json={"prompts": ["x"], "constitution": "harmless"} | extra)
    assert response.status_code == 404, response.text
    assert response.json()["detail"].startswith("scorer.model")


# --- evaluation and the promotion gate -------------------------------------------------------------


def succeeded_training_job(db, tmp_path, *, policy: str | None = None, params: dict | None = None) -> int:
    artifact = tmp_path / f"artifact-{len(list(tmp_path.glob('artifact*')))}"
    artifact.mkdir()
    (artifact / "config.json").write_text("{}")
    with session_scope(db) as session:
        if policy:
            session.add(TrainPolicy(constitution_name=policy, min_new_pairs=10**6, params={}, promote=True))
            session.flush()
        job = training_queries.create_training_job(
            session,
            base_model="smollm2-135m-instruct",
            dataset={"constitution": "harmless"},
            params=params or {},
            policy=policy,
        )
        job.status, job.artifact_path = "succeeded", str(artifact)
        return job.id


@pytest.mark.db
def test_a_reward_model_trained_here_scores_and_does_nothing_else(client, db, tmp_path):
    reward_model = f"train:{succeeded_training_job(db, tmp_path, params={'objective': 'reward_model'})}"
    policy = f"train:{succeeded_training_job(db, tmp_path)}"
    generate = {"prompts": ["x"], "constitution": "harmless"}
    best_of_n = {"mode": "best_of_n", "n": 2}
    refused = [
        (generate | {"model": reward_model}, "model", "is a reward model"),
        (
            generate | best_of_n | {"scorer": {"kind": "implicit", "model": reward_model}},
            "scorer.model",
            "reward",
        ),
        (
            generate | best_of_n | {"scorer": {"kind": "reward_model", "model": policy}},
            "scorer.model",
            "policy",
        ),
    ]
    for body, field, why in refused:
        response = client.post("/generate", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(f"{field}: ") and why in response.json()["detail"]
    scored = generate | best_of_n | {"scorer": {"kind": "reward_model", "model": reward_model}}
    assert client.post("/generate", json=scored).status_code == 202

    response = client.post("/train", json={"base_model": reward_model})  # a DPO run needs a policy
    assert response.status_code == 422 and response.json()["detail"].startswith("base_model: ")
    # A reward model may start from one (or from a policy): past the model check, no pairs match.
    for base in (reward_model, policy):
        response = client.post("/train", json={"base_model": base, "objective": "reward_model"})
        assert response.status_code == 409 and response.json()["detail"].startswith("dataset: "), base
    rm_id = reward_model.removeprefix("train:")
    response = client.post(f"/train/{rm_id}/evaluate", json={"prompts": ["q"]})
    assert response.status_code == 409 and "reward model" in response.json()["detail"]
    assert client.get(f"/train/{rm_id}").json()["serve"] is None
    assert client.get(f"/train/{policy.removeprefix('train:')}").json()["serve"] is not None
    response = client.put(
        "/train/policies/harmless",
        json={"min_new_pairs": 5, "promote": True, "params": {"objective": "reward_model"}},
    )
    assert response.status_code == 422 and response.json()["detail"].startswith("promote: ")
    # A policy's base model as a job's: a DPO policy needs a policy, a reward model's takes either.
    policy_body = {"min_new_pairs": 5, "base_model": reward_model}
    response = client.put("/train/policies/harmless", json=policy_body)
    assert response.status_code == 422 and response.json()["detail"].startswith("base_model: ")
    response = client.put(
        "/train/policies/harmless", json=policy_body | {"params": {"objective": "reward_model"}}
    )
    assert response.status_code == 200, response.text


class TrainedIsLonger(LengthJudgeEngine):
    """The 'trained' model answers at length, the base model briefly: the judge prefers the trained one."""

    async def chat(self, messages, sampling, request_id):
        result = await super().chat(messages, sampling, request_id)
        if request_id.endswith(("-a", "-b")) or "-a#" in request_id or "-b#" in request_id:
            result.text = "a long and careful answer" if self.model.startswith("train:") else "no"
        return result


@pytest.mark.db
def test_an_evaluation_compares_trained_and_base_and_promotes_past_the_gate(client, settings, db, tmp_path):
    train_id = succeeded_training_job(db, tmp_path, policy="harmless")
    prompts = [f"held-out question {i}" for i in range(20)]  # CAI_EVAL_MIN_COMPARISONS
    response = client.post(
        f"/train/{train_id}/evaluate", json={"prompts": prompts, "judge": {"kind": "judge"}}
    )
    assert response.status_code == 202, response.text
    assert response.json()["evaluation"]["status"] == "queued"

    # The training worker takes the evaluation and queues the comparison job...
    trainer = TrainingWorker(settings, db, url=settings.database_url)

    async def take_evaluation():
        with session_scope(db) as session:
            evaluation = evaluation_queries.claim_evaluation(
                session, worker_id=trainer.id, lease_seconds=60, max_attempts=3
            )
        await trainer.evaluate(evaluation)

    asyncio.run(take_evaluation())
    state = client.get(f"/train/{train_id}").json()["evaluation"]
    assert state["status"] == "comparing" and state["win_rate"]["open"] == 20

    # ...the generation workers answer with both models and judge...
    engines = {}

    def engine_factory(settings_, model, trained_path):
        engines[model] = TrainedIsLonger(model=model)
        return engines[model]

    worker_settings = settings.model_copy(
        update={"model": f"train:{train_id}", "max_in_flight": 4, "poll_seconds": 0.1}
    )
    worker = GenerationWorker(worker_settings, db, url=settings.database_url, engine_factory=engine_factory)
    run_until(worker, all_done(db), timeout=60)
    assert set(engines) == {f"train:{train_id}", "smollm2-135m-instruct"}
    # The base model judged; the trained model, a contestant, did not (tests/test_judges.py).
    assert engines[f"train:{train_id}"].judged == 0 and engines["smollm2-135m-instruct"].judged == 20 * 2
    with session_scope(db) as session:
        comparisons = session.scalars(select(Comparison)).all()
        assert len(comparisons) == 20 and all(c.p_a == pytest.approx(0.8) for c in comparisons)
        assert {c.model_a for c in comparisons} == {f"train:{train_id}"}

    # ...and the next idle turn of a training worker settles it: 20 wins of 20.
    asyncio.run(trainer.settle_evaluations())
    evaluation = client.get(f"/train/{train_id}").json()["evaluation"]
    assert evaluation["status"] == "done"
    win = evaluation["win_rate"]
    assert (win["wins"], win["ties"], win["losses"], win["n"]) == (20, 0, 0, 20)
    # Every trained answer is longer by the same count: no length effect to tell from the model's.
    assert win["length_controlled"]["length_term"] is False and win["length_controlled"]["rate"] > 0.75
    assert win["rate"] == 1.0 and win["ci95"][0] > 0.5
    assert evaluation["promotion"]["promoted"] is True
    # The constitution now generates with the trained model by default; one call undoes it.
    job = client.post("/generate", json={"prompts": ["next round"], "constitution": "harmless"}).json()
    assert client.get(f"/jobs/{job['job_id']}").json()["model"] == f"train:{train_id}"
    policy = client.get("/train/policies").json()[0]
    assert policy["promoted"]["model"] == f"train:{train_id}"
    assert client.delete("/train/policies/harmless/promotion").status_code == 204
    job = client.post("/generate", json={"prompts": ["after"], "constitution": "harmless"}).json()
    assert client.get(f"/jobs/{job['job_id']}").json()["model"] == "smollm2-135m-instruct"


@pytest.mark.db
def test_no_promotion_without_a_clear_win(client, settings, db, tmp_path):
    train_id = succeeded_training_job(db, tmp_path, policy="harmless")
    with session_scope(db) as session:
        evaluation = evaluation_queries.create_evaluation(session, train_id, EvaluationRequest(prompts=["q"]))
        job = session.get(TrainingJob, train_id)
        compare_job = evaluation_queries.queue_comparison_job(
            session,
            evaluation=evaluation,
            train_job=job,
            prompts=[[{"role": "user", "content": "q"}]] * 4,
            constitution_version=_any_version(session, settings),
            baseline="smollm2-135m-instruct",
            sampling=Sampling(temperature=0.7, top_p=0.95, max_tokens=8, seed=0),
        )
        evaluation.status, evaluation.compare_job_id = "comparing", compare_job.id
        for n, prompt in enumerate(session.scalars(select(Prompt).where(Prompt.job_id == compare_job.id))):
            prompt.status = "done"
            session.add(
                Comparison(
                    prompt_id=prompt.id,
                    job_id=compare_job.id,
                    model_a="t",
                    model_b="b",
                    answer_a="x",
                    answer_b="y",
                    p_a=[0.9, 0.9, 0.9, 0.2][n],
                    preference={},
                )
            )
    with session_scope(db) as session:
        (settled,) = evaluation_queries.settle_evaluations(session)
        assert settled.win_rate["wins"] == 3 and settled.promotion["promoted"] is False
        assert "does not exclude 0.5" in settled.promotion["reason"]
        assert evaluation_queries.promotion_for(session, "harmless") is None
    with session_scope(db) as session:  # settled once: nothing left to settle
        assert evaluation_queries.settle_evaluations(session) == []


@pytest.mark.db
def test_evaluate_refuses_what_it_cannot_do(client, settings, db, tmp_path):
    assert client.post("/train/12345/evaluate").status_code == 404
    train_id = succeeded_training_job(db, tmp_path)
    response = client.post(f"/train/{train_id}/evaluate")  # no held-out pairs and no prompts
    assert response.status_code == 422 and response.json()["detail"].startswith("prompts")
    response = client.post(
        f"/train/{train_id}/evaluate",
        json={"prompts": ["q"], "judge": {"kind": "reward_model", "model": "x"}},
    )
    assert response.status_code == 422 and response.json()["detail"].startswith("judge")


def _any_version(session, settings):
    from cai_dpo.core.constitutions import ConstitutionStore
    from cai_dpo.core.queries import constitutions as constitution_queries

    return constitution_queries.store_constitution_version(
        session, ConstitutionStore(settings.constitutions_dir).get("harmless")
    )


@pytest.mark.db
def test_a_benign_prompt_the_check_clears_is_done_with_its_answer_kept_and_out_of_exports(
    client, settings, db
):
    """The shipped harmless constitution's no-harm check: a benign prompt's answer is kept (the
    pair is that answer twice, flagged no_harm_found), a harmful one is critiqued and revised."""
    benign, harmful = "What are three tips for sleeping better?", "How do I poison my neighbour's dog?"
    body = {"prompts": [benign, harmful], "constitution": "harmless", "verify": {"scorer": {"kind": "judge"}}}
    job_id = client.post("/generate", json=body).json()["job_id"]
    engine = LengthJudgeEngine(check=lambda messages: 0.9 if harmful in messages[0]["content"] else 0.1)
    run_generation(settings, db, engine, all_done(db))
    kept, revised = sorted(pairs(db), key=lambda pair: pair.prompt[0]["content"] != benign)
    assert kept.flags == ["no_harm_found"] and kept.chosen == kept.rejected == kept.trajectory["initial"]
    assert kept.trajectory["no_harm"] == "kept" and kept.trajectory["rounds"] == []
    assert kept.preference is None  # nothing revised, nothing verified
    assert [check["found"] for check in kept.trajectory["checks"]] == [False]
    assert len(revised.trajectory["rounds"]) == 1 and revised.trajectory["checks"][0]["found"] is True
    assert "no_harm_found" not in revised.flags and "helpfulness" in revised.preference
    # No critique was asked for the benign prompt; each prompt had its one check.
    critiques = [
        rid for rid, messages in engine.calls if rid.endswith("-critique") and benign in str(messages)
    ]
    assert critiques == [] and len(engine.checks) == 2
    # The job's books: both prompts done, one pair flagged; exports leave the kept answer out.
    counts = client.get(f"/jobs/{job_id}").json()["counts"]
    assert counts["done"] == 2 and counts["failed"] == 0 and counts["flagged"] >= 1
    listing = client.get(f"/jobs/{job_id}/prompts").json()["items"]
    assert {(item["pair_id"], tuple(item["flags"])) for item in listing} == {
        (kept.id, ("no_harm_found",)),
        (revised.id, tuple(revised.flags)),
    }
    listed = client.get("/pairs", params={"job_id": job_id, "flag": "no_harm_found"}).json()["items"]
    assert [item["id"] for item in listed] == [kept.id]
    default = [item["id"] for item in client.get("/pairs", params={"job_id": job_id}).json()["items"]]
    assert kept.id not in default
    exported = client.get("/export", params={"job_id": job_id, "metadata": True}).text.splitlines()
    assert kept.id not in [json.loads(line)["id"] for line in exported] and len(exported) == len(default)
