"""Evaluations a team can trust (issue 19): judges that are not contestants, a panel of judges,
counts that add up (failed comparisons counted, a minimum n at the gate) and a length-controlled
win rate the gate acts on.

Mechanics, not taste: the judges are scripted engines with known preferences (the real `Judge`
builds their questions), the contestants scripted engines with known answer lengths.
"""

import asyncio
import math
import random
import re

import pytest
from sqlalchemy import select

from cai_dpo.core.db import session_scope
from cai_dpo.core.evaluation import (
    EvaluationRequest,
    default_judge_model,
    judge_models,
    length_controlled_win_rate,
    promotion_decision,
    win_rate,
)
from cai_dpo.core.generation_modes import ScorerSpec
from cai_dpo.core.queries import evaluations as evaluation_queries
from cai_dpo.core.tables import Comparison
from tests.fake_engine import ScriptedEngine
from tests.helpers import run_until, statuses
from tests.test_quality_loop import succeeded_training_job
from workers.generation.worker import GenerationWorker
from workers.training.worker import TrainingWorker

BASE = "smollm2-135m-instruct"

# --- which model judges -----------------------------------------------------------------------------


@pytest.mark.unit
def test_the_default_judge_is_the_configured_one_else_the_base_never_the_trained():
    assert default_judge_model(trained="train:7", base=BASE, configured=None) == BASE
    assert default_judge_model(trained="train:7", base=BASE, configured="judge-x") == "judge-x"
    assert default_judge_model(trained="train:7", base=BASE, configured="train:7") == BASE
    (judge,) = judge_models(EvaluationRequest(), trained="train:7", base=BASE, configured=None)
    assert judge.model == BASE and judge.k == 2
    named = EvaluationRequest(judge={"kind": "judge", "model": "train:3"})
    assert [j.model for j in judge_models(named, trained="train:7", base=BASE, configured="x")] == ["train:3"]
    with pytest.raises(ValueError, match=r"^judge\.model: train:7"):
        judge_models(
            EvaluationRequest(judge={"kind": "judge", "model": "train:7"}),
            trained="train:7",
            base=BASE,
            configured=None,
        )
    panel = EvaluationRequest(judges=[{"kind": "judge"}, {"kind": "judge", "model": "train:7"}])
    with pytest.raises(ValueError, match=r"^judges\.1\.model"):
        judge_models(panel, trained="train:7", base=BASE, configured=None)


@pytest.mark.unit
def test_a_panel_is_of_judges_and_replaces_the_single_judge():
    panel = EvaluationRequest(judges=[{"kind": "judge", "model": "a"}, {"kind": "judge", "k": 3}])
    assert [(j.model, j.k) for j in panel.panel()] == [("a", 1), (None, 3)]
    assert EvaluationRequest().panel() == [ScorerSpec(kind="judge", k=2)]
    with pytest.raises(ValueError, match="judges"):
        EvaluationRequest(judge={"kind": "judge"}, judges=[{"kind": "judge"}])
    # As stored (every field dumped) and read back by the worker.
    assert EvaluationRequest.model_validate(panel.model_dump(mode="json")) == panel
    with pytest.raises(ValueError, match=r"judges\.0\.kind"):
        EvaluationRequest(judges=[{"kind": "reward_model", "model": "/x"}])


# --- the length-controlled win rate, alone --------------------------------------------------------


def length_loving(n: int, longer_share: float, seed: int = 0):
    """Comparisons where answer A is longer than B in `longer_share` of them (by 80 characters; the
    others shorter by as many) and the judge prefers the longer answer 80:20, whatever it says."""
    rng = random.Random(seed)
    p, length_a, length_b = [], [], []
    for i in range(n):
        base = rng.randint(100, 400)
        longer = i < round(n * longer_share)
        length_a.append(base + 80 if longer else base - 80)
        length_b.append(base)
        p.append(0.8 if longer else 0.2)
    return p, length_a, length_b


@pytest.mark.unit
def test_a_judge_that_prefers_longer_answers_wins_raw_but_not_length_controlled():
    p, length_a, length_b = length_loving(200, 0.8)
    assert win_rate(p).rate == pytest.approx(0.8)  # far from 0.5: A is longer 80% of the time
    controlled = length_controlled_win_rate(p, length_a, length_b)
    assert controlled.length_term and controlled.length_coefficient > 1
    assert controlled.rate == pytest.approx(0.5, abs=0.01)
    low, high = controlled.ci95
    assert low < controlled.rate < high and high - low < 0.4
    # The same numbers every time (a seeded bootstrap).
    assert length_controlled_win_rate(p, length_a, length_b) == controlled
    # A judge whose preference grows with the length difference, on differences mostly in A's
    # favour: raw far above 0.5, controlled near it, the interval around it.
    rng = random.Random(1)
    delta = [rng.uniform(-150, 450) for _ in range(400)]
    graded = [1 / (1 + math.exp(-2 * math.tanh(d / 170))) for d in delta]
    assert win_rate(graded).rate > 0.7
    controlled = length_controlled_win_rate(graded, [300 + d for d in delta], [300] * 400)
    assert controlled.rate == pytest.approx(0.5, abs=0.05)
    assert controlled.ci95[0] < 0.5 + 0.05 and controlled.ci95[1] > 0.5 - 0.05
    # A real model effect, with lengths that say nothing, is kept.
    better = [0.85, 0.75] * 100
    controlled = length_controlled_win_rate(better, length_a, length_b)
    assert controlled.rate == pytest.approx(0.8, abs=0.03) and controlled.ci95[0] > 0.65


@pytest.mark.unit
def test_without_a_spread_of_lengths_the_length_controlled_rate_is_the_mean_preference():
    controlled = length_controlled_win_rate([0.9, 0.7, 0.8, 0.8], [10] * 4, [3] * 4)
    assert not controlled.length_term and controlled.length_coefficient == 0.0
    assert controlled.rate == pytest.approx(0.8, abs=0.01)  # the weak ridge's pull aside
    assert length_controlled_win_rate([], [], []) is None
    # All-or-nothing preferences (separation) still give finite numbers.
    controlled = length_controlled_win_rate([1.0] * 5 + [0.0] * 5, list(range(10)), [4] * 10)
    assert all(math.isfinite(v) for v in (controlled.rate, *controlled.ci95))


@pytest.mark.unit
def test_the_gate_needs_a_minimum_n_and_acts_on_the_length_controlled_figure():
    promoted, reason = promotion_decision(win_rate([0.9] * 12), min_comparisons=20, failed=3)
    assert not promoted
    assert "12 comparisons finished, 3 failed" in reason and "minimum 20" in reason
    assert "CAI_EVAL_MIN_COMPARISONS" in reason
    p, length_a, length_b = length_loving(200, 0.9)
    raw = win_rate(p)
    assert promotion_decision(raw, min_comparisons=20)[0] is True  # the raw rate alone would promote
    promoted, reason = promotion_decision(
        raw, length_controlled=length_controlled_win_rate(p, length_a, length_b), min_comparisons=20
    )
    assert (
        not promoted
        and reason.startswith("length-controlled win rate 0.50")
        and "raw win rate 0.900" in reason
    )


# --- through the service: scripted contestants and judges ----------------------------------------


class Contestant(ScriptedEngine):
    """A contestant and a judge. As a contestant, its answer to prompt `q<i>` is `base_length`
    characters, the trained model's `longer` characters more for i % 4 != 0 and fewer otherwise.
    As a judge it prefers the longer option 80:20, or the shorter 60:40 when named `judge-short`."""

    base_length = 60
    longer = 30

    def __init__(self, model: str, **kwargs):
        super().__init__(model=model, **kwargs)
        self.judged = 0

    async def chat(self, messages, sampling, request_id):
        result = await super().chat(messages, sampling, request_id)
        if request_id.endswith(("-a", "-b")):
            i = int(re.search(r"q(\d+)", messages[-1]["content"]).group(1))
            length = self.base_length
            if self.model.startswith("train:"):
                length += self.longer if i % 4 else -self.longer
            result.text = "x" * length
        return result

    async def option_logprobs(self, messages, assistant_prefix, options, request_id):
        self.judged += 1
        text = messages[-1]["content"]
        a = re.search(r"\n\(A\) (.*)\n\(B\) ", text, re.S).group(1)
        b = text.rsplit("\n(B) ", 1)[1]
        short = "judge-short" in self.model
        first = len(a) < len(b) if short else len(a) >= len(b)
        strong, weak = (0.6, 0.4) if short else (0.8, 0.2)
        return {"A": math.log(strong if first else weak), "B": math.log(weak if first else strong)}

    async def continue_chat(self, messages, assistant_prefix, sampling, request_id):
        return await super().chat(messages, sampling, request_id)


def evaluate(client, settings, db, tmp_path, body, *, judge_model=None, min_comparisons=20):
    """Queue an evaluation over HTTP, let a training worker queue its comparisons, a generation
    worker serving the trained model answer and judge them, and the training worker settle it."""
    train_id = succeeded_training_job(db, tmp_path, policy="harmless")
    response = client.post(f"/train/{train_id}/evaluate", json=body)
    assert response.status_code == 202, response.text
    trainer_settings = settings.model_copy(
        update={"judge_model": judge_model, "eval_min_comparisons": min_comparisons}
    )
    trainer = TrainingWorker(trainer_settings, db, url=settings.database_url)

    async def take_evaluation():
        with session_scope(db) as session:
            evaluation = evaluation_queries.claim_evaluation(
                session, worker_id=trainer.id, lease_seconds=60, max_attempts=3
            )
        await trainer.evaluate(evaluation)

    asyncio.run(take_evaluation())
    engines: dict[str, Contestant] = {}

    def engine_factory(settings_, model, trained_path):
        engines[model] = Contestant(model)
        return engines[model]

    worker_settings = settings.model_copy(
        update={"model": f"train:{train_id}", "max_in_flight": 4, "poll_seconds": 0.1}
    )
    worker = GenerationWorker(worker_settings, db, url=settings.database_url, engine_factory=engine_factory)
    run_until(
        worker,
        lambda: bool(statuses(db)) and all(s in ("done", "failed") for s, _, _ in statuses(db).values()),
        timeout=60,
    )
    asyncio.run(trainer.settle_evaluations())
    return train_id, engines, client.get(f"/train/{train_id}").json()["evaluation"]


def comparisons(db) -> list[Comparison]:
    with session_scope(db) as session:
        return list(session.scalars(select(Comparison).order_by(Comparison.id)))


@pytest.mark.db
def test_the_trained_model_never_judges_itself(client, settings, db, tmp_path):
    prompts = [f"q{i}" for i in range(8)]
    train_id, engines, evaluation = evaluate(client, settings, db, tmp_path, {"prompts": prompts})
    trained = engines[f"train:{train_id}"]
    # The worker serves the trained model: it answered every prompt, and judged none of them.
    assert trained.judged == 0 and len([c for c in trained.calls if c[0].endswith("-a")]) == 8
    assert engines[BASE].judged == 8 * 2 * 2  # 2 principles, both orders
    stored = comparisons(db)
    assert {c.preference["judge"] for c in stored} == {BASE}
    assert all(c.judges == [{"model": BASE, "p_a": c.p_a}] for c in stored)
    assert [j["model"] for j in evaluation["win_rate"]["judges"]] == [BASE]


@pytest.mark.db
def test_a_configured_judge_model_judges_when_none_is_named(client, settings, db, tmp_path):
    train_id, engines, evaluation = evaluate(
        client, settings, db, tmp_path, {"prompts": ["q1", "q2"]}, judge_model="judge-x"
    )
    assert engines["judge-x"].judged == 2 * 2 * 2
    assert engines[f"train:{train_id}"].judged == 0 and engines[BASE].judged == 0
    assert {c.preference["judge"] for c in comparisons(db)} == {"judge-x"}


@pytest.mark.db
def test_a_judge_naming_the_trained_model_is_refused_naming_the_field(client, settings, db, tmp_path):
    train_id = succeeded_training_job(db, tmp_path)
    body = {"prompts": ["q"], "judge": {"kind": "judge", "model": f"train:{train_id}"}}
    response = client.post(f"/train/{train_id}/evaluate", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("judge.model: ")
    body = {"prompts": ["q"], "judges": [{"kind": "judge"}, {"kind": "judge", "model": f"train:{train_id}"}]}
    response = client.post(f"/train/{train_id}/evaluate", json=body)
    assert response.status_code == 422 and response.json()["detail"].startswith("judges.1.model: ")
    body = {"prompts": ["q"], "judges": [{"kind": "judge", "model": "train:987654"}]}
    response = client.post(f"/train/{train_id}/evaluate", json=body)
    assert response.status_code == 404 and response.json()["detail"].startswith("judges.0.model: ")
    body = {"prompts": ["q"], "judge": {"kind": "judge", "k": 1}, "judges": [{"kind": "judge"}]}
    response = client.post(f"/train/{train_id}/evaluate", json=body)
    assert response.status_code == 422 and response.json()["detail"].startswith("judges")


@pytest.mark.db
def test_a_panel_averages_its_judges_and_keeps_each_ones_figure(client, settings, db, tmp_path):
    short = settings.models_dir / f"judge-short-{tmp_path.name}"  # a model folder the server offers
    short.mkdir(parents=True)
    (short / "config.json").write_text("{}")
    prompts = [f"q{i}" for i in range(8)]
    body = {"prompts": prompts, "judges": [{"kind": "judge"}, {"kind": "judge", "model": str(short)}]}
    train_id, engines, evaluation = evaluate(client, settings, db, tmp_path, body)
    assert engines[f"train:{train_id}"].judged == 0
    assert engines[BASE].judged == 8 * 2 and engines[str(short)].judged == 8 * 2  # k=1, both orders
    for comparison in comparisons(db):
        longer = comparison.length_a > comparison.length_b
        by_judge = {j["model"]: j["p_a"] for j in comparison.judges}
        assert by_judge[BASE] == pytest.approx(0.8 if longer else 0.2)
        assert by_judge[str(short)] == pytest.approx(0.4 if longer else 0.6)
        assert comparison.p_a == pytest.approx((by_judge[BASE] + by_judge[str(short)]) / 2)
        assert comparison.preference["judge"] == [BASE, str(short)]
        assert [j["model"] for j in comparison.preference["judges"]] == [BASE, str(short)]
    judges = {j["model"]: j for j in evaluation["win_rate"]["judges"]}
    assert judges[BASE]["rate"] == pytest.approx(0.75)  # the trained answer is longer for 6 of 8
    assert judges[str(short)]["rate"] == pytest.approx(0.25)


@pytest.mark.db
def test_length_control_failed_counts_and_the_minimum_over_http(client, settings, db, tmp_path):
    # 24 prompts: the trained answer is 30 characters longer for 18, 30 shorter for 6; one more
    # prompt fails (too long for the engine). The judge prefers the longer answer 80:20.
    prompts = [f"q{i}" for i in range(24)] + ["q99 TOO LONG"]
    train_id, _, evaluation = evaluate(client, settings, db, tmp_path, {"prompts": prompts})
    win = evaluation["win_rate"]
    assert (win["wins"], win["ties"], win["losses"], win["n"], win["failed"]) == (18, 0, 6, 24, 1)
    assert win["wins"] + win["ties"] + win["losses"] + win["failed"] + win["open"] == win["prompts"] == 25
    assert win["rate"] == pytest.approx(0.75)
    controlled = win["length_controlled"]
    assert controlled["rate"] == pytest.approx(0.5, abs=0.02) and controlled["length_term"] is True
    assert controlled["ci95"][0] <= 0.51  # the judge's preference is all length: no model effect left
    assert win["lengths"] == {"unit": "characters", "mean_a": 75.0, "mean_b": 60.0, "a_longer": 18, "n": 24}
    assert all(c.length_b == 60 and c.length_a in (30, 90) for c in comparisons(db))
    promotion = evaluation["promotion"]
    assert promotion["promoted"] is False
    assert (
        "length-controlled win rate 0.5" in promotion["reason"]
        and "raw win rate 0.750" in promotion["reason"]
    )
    assert "24 comparisons finished, 1 failed" in promotion["reason"]
    page = client.get(f"/ui/train/{train_id}").text  # the console shows the same numbers
    assert "18 wins, 0 ties, 6 losses of 24" in page and "· 1 failed" in page
    assert "Length-controlled win rate (the gate's figure): <strong>0.5" in page
    assert "mean length 75 characters trained, 60 base" in page and f"Judged by: {BASE}" in page


@pytest.mark.db
def test_too_few_comparisons_never_promote(client, settings, db, tmp_path):
    # Every trained answer is longer... of 4 prompts, fewer than the minimum.
    prompts = [f"q{i}" for i in (1, 2, 3, 5)]
    _, _, evaluation = evaluate(client, settings, db, tmp_path, {"prompts": prompts}, min_comparisons=5)
    assert evaluation["win_rate"]["wins"] == 4
    assert evaluation["promotion"]["promoted"] is False
    assert "fewer than the minimum 5 (CAI_EVAL_MIN_COMPARISONS)" in evaluation["promotion"]["reason"]


@pytest.mark.db
def test_the_worker_never_asks_the_trained_model_to_judge_even_for_a_job_that_names_no_judge(
    settings, db, tmp_path
):
    """Comparison jobs queued before judges were fixed at queue time name none: the worker takes
    the baseline's engine, not its own; one whose judge is the trained model fails, unjudged."""
    from cai_dpo.core.generation_modes import CompareOptions, Sampling
    from cai_dpo.core.queries.jobs import create_generation_job
    from tests.test_quality_loop import _any_version

    train_id = succeeded_training_job(db, tmp_path)
    trained = f"train:{train_id}"
    with session_scope(db) as session:
        for n, judge in enumerate([ScorerSpec(kind="judge"), ScorerSpec(kind="judge", model=trained)]):
            create_generation_job(
                session,
                constitution_version=_any_version(session, settings),
                model=trained,
                revisions=1,
                sampling=Sampling(temperature=0.7, top_p=0.95, max_tokens=8, seed=0),
                metadata={},
                prompts=[[{"role": "user", "content": f"q{n}"}]],
                idempotency_key=None,
                request_hash=None,
                options=CompareOptions(baseline=BASE, scorer=judge),
            )
    engines: dict[str, Contestant] = {}

    def engine_factory(settings_, model, trained_path):
        engines[model] = Contestant(model)
        return engines[model]

    worker_settings = settings.model_copy(update={"model": trained, "max_in_flight": 4, "poll_seconds": 0.1})
    worker = GenerationWorker(worker_settings, db, url=settings.database_url, engine_factory=engine_factory)
    run_until(
        worker,
        lambda: bool(statuses(db)) and all(s in ("done", "failed") for s, _, _ in statuses(db).values()),
        timeout=60,
    )
    assert engines[trained].judged == 0 and engines[BASE].judged == 2  # one principle, both orders
    (comparison,) = comparisons(db)
    assert comparison.preference["judge"] == BASE
    assert sorted(status for status, _, _ in statuses(db).values()) == ["done", "failed"]
