"""A judge measured against people (issue 19, item 6): agreement with human labels, its interval,
position bias and length bias, from the pure summary and through the service with a scripted judge
whose preferences are known."""

import json
import math
import re

import pytest
from sqlalchemy import select

from cai_dpo.core.calibration import CalibrationRequest, Judged, calibration_summary
from cai_dpo.core.db import session_scope
from cai_dpo.core.generation_modes import ScorerSpec
from cai_dpo.core.tables import Comparison, Pair
from tests.fake_engine import ScriptedEngine
from tests.helpers import run_until, statuses
from workers.generation.worker import GenerationWorker

BASE = "smollm2-135m-instruct"

# --- the summary, alone -------------------------------------------------------------------------------


@pytest.mark.unit
def test_a_judge_that_agrees_with_80_percent_of_labels_reports_0_8_within_its_interval():
    rows = [Judged(0.9, 0.8, 50, 40) if i % 5 else Judged(0.2, 0.1, 50, 40) for i in range(100)]
    summary = calibration_summary(rows)
    agreement = summary["agreement"]
    assert (agreement["agree"], agreement["disagree"], agreement["ties"], summary["n"]) == (80, 20, 0, 100)
    assert agreement["rate"] == pytest.approx(0.8)
    low, high = agreement["ci95"]
    assert low < 0.8 < high and low > 0.7 and high < 0.88  # Wilson, n = 100
    assert summary["mean_p_chosen"] == pytest.approx(0.8 * 0.85 + 0.2 * 0.15)
    assert summary["consistent"] == 1.0
    # Chosen is always the longer here, and the judge takes it 80% of the time: as people did (100%)
    # minus 0.2, so this judge does not favour length.
    length = summary["length_bias"]
    assert length["people_prefer_longer"] == 1.0 and length["judge_prefers_longer"] == pytest.approx(0.8)
    assert length["bias"] == pytest.approx(-0.2) and length["n"] == 100


@pytest.mark.unit
def test_position_and_length_bias():
    # A judge that always picks the answer shown first: no agreement either way, all position.
    first = calibration_summary([Judged(0.9, 0.1, 10, 10)] * 20)
    assert first["position_bias"]["rate"] == 1.0 and first["position_bias"]["n"] == 40
    assert first["position_bias"]["mean_p_first"] == pytest.approx(0.9)
    assert first["agreement"]["ties"] == 20 and first["agreement"]["rate"] == 0.5
    assert first["consistent"] == 0.0
    assert first["length_bias"]["n"] == 0 and first["length_bias"]["bias"] is None
    # A judge that always picks the longer answer, where people chose the longer one half the time.
    rows = [Judged(0.8, 0.8, 90, 30) if i % 2 else Judged(0.2, 0.2, 30, 90) for i in range(40)]
    longer = calibration_summary(rows)
    assert longer["length_bias"]["judge_prefers_longer"] == 1.0
    assert longer["length_bias"]["people_prefer_longer"] == 0.5 and longer["length_bias"]["bias"] == 0.5
    assert longer["agreement"]["rate"] == 0.5 and longer["position_bias"]["rate"] == 0.5
    empty = calibration_summary([])
    assert empty["n"] == 0 and empty["agreement"]["rate"] is None and empty["agreement"]["ci95"] == [0.0, 1.0]


@pytest.mark.unit
def test_the_request_takes_a_judge_or_a_panel_of_judges():
    assert CalibrationRequest().judge_fields() == [("judge.model", ScorerSpec(kind="judge", k=2))]
    one = CalibrationRequest(judge={"kind": "judge", "model": "a"})
    assert one.judge == [ScorerSpec(kind="judge", model="a")] and one.judge_fields()[0][0] == "judge.model"
    panel = CalibrationRequest(judge=[{"kind": "judge", "model": "a"}, {"kind": "judge"}])
    assert [field for field, _ in panel.judge_fields()] == ["judge.0.model", "judge.1.model"]
    assert CalibrationRequest.model_validate(panel.model_dump(mode="json")) == panel
    with pytest.raises(ValueError, match=r"judge\.1\.kind"):
        CalibrationRequest(judge=[{"kind": "judge"}, {"kind": "reward_model", "model": "/x"}])
    with pytest.raises(ValueError, match="judge"):
        CalibrationRequest(judge=[])


# --- through the service --------------------------------------------------------------------------------


class LabelledJudge(ScriptedEngine):
    """Agrees with the human label of pair i unless i % 5 == 0 (80%): P(preferred option) is 0.8
    when it is shown as (A), 0.7 when shown as (B) (a slight pull to the first position)."""

    def __init__(self, model: str, **kwargs):
        super().__init__(model=model, **kwargs)
        self.judged = 0

    async def option_logprobs(self, messages, assistant_prefix, options, request_id):
        self.judged += 1
        text = messages[-1]["content"]
        a = re.search(r"\n\(A\) (.*)\n\(B\) ", text, re.S).group(1)
        i = int(re.search(r"\d+", a).group())
        a_is_chosen = a.startswith("chosen")
        prefers_chosen = i % 5 != 0 or "perfect" in self.model  # a judge named *perfect* always agrees
        p_a = 0.8 if a_is_chosen == prefers_chosen else 0.3
        return {"A": math.log(p_a), "B": math.log(1 - p_a)}


def insert_human_pairs(db, n: int) -> None:
    """Pairs 0..n-1 imported from "hh": chosen is longer than rejected for even i."""
    with session_scope(db) as session:
        session.execute(
            Pair.__table__.insert(),
            [
                {
                    "source": "hh",
                    "prompt": [{"role": "user", "content": f"human question {i}"}],
                    "chosen": f"chosen {i}" + ("!" * 20 if i % 2 == 0 else ""),
                    "rejected": f"rejected {i}",
                    "trajectory": {},
                    "flags": [],
                }
                for i in range(n)
            ],
        )


@pytest.mark.db
def test_calibrate_over_http_with_a_judge_that_agrees_with_80_percent(client, settings, db):
    insert_human_pairs(db, 40)
    response = client.post("/judges/calibrate", json={"pairs": {"source": "hh"}, "max_pairs": 30})
    assert response.status_code == 202, response.text
    calibration = response.json()
    assert calibration["status"] == "running" and calibration["pairs"] == 30 and calibration["n"] == 0
    assert calibration["judge"] == BASE and calibration["judges"][0]["k"] == 2
    engines: dict[str, LabelledJudge] = {}

    def engine_factory(settings_, model, trained_path):
        engines[model] = LabelledJudge(model)
        return engines[model]

    worker_settings = settings.model_copy(update={"model": BASE, "max_in_flight": 8, "poll_seconds": 0.1})
    worker = GenerationWorker(worker_settings, db, url=settings.database_url, engine_factory=engine_factory)
    run_until(worker, lambda: all(s == "done" for s, _, _ in statuses(db).values()), timeout=60)
    assert engines[BASE].judged == 30 * 2 * 2  # 2 principles, both orders

    result = client.get(f"/judges/calibrations/{calibration['id']}").json()
    assert result["status"] == "done" and result["n"] == 30 and result["open"] == 0
    agreement = result["agreement"]
    assert (agreement["agree"], agreement["disagree"]) == (24, 6)
    assert agreement["rate"] == pytest.approx(0.8)
    assert agreement["ci95"][0] < 0.8 < agreement["ci95"][1]
    # Each pair: the preferred answer shown first wins at 0.8, shown second at 0.7.
    assert result["position_bias"]["mean_p_first"] == pytest.approx(0.55)
    assert result["consistent"] == 1.0
    assert result["length_bias"]["people_prefer_longer"] == 0.5 and result["length_bias"]["n"] == 30
    with session_scope(db) as session:
        rows = list(session.scalars(select(Comparison)))
    assert len(rows) == 30 and {row.model_a for row in rows} == {"human:chosen"}
    assert all(row.preference["judge"] == BASE for row in rows)
    assert [c["id"] for c in client.get("/judges/calibrations", params={"judge": BASE}).json()] == [
        calibration["id"]
    ]
    assert client.get(f"/jobs/{calibration['id']}").json()["options"]["mode"] == "calibrate"


def run_calibration(client, settings, db, body) -> dict:
    """Queue a calibration over HTTP, let a worker serving the judge's model (a `LabelledJudge`)
    judge it, and return it."""
    response = client.post("/judges/calibrate", json=body)
    assert response.status_code == 202, response.text
    worker_settings = settings.model_copy(update={"model": BASE, "max_in_flight": 8, "poll_seconds": 0.1})
    worker = GenerationWorker(
        worker_settings,
        db,
        url=settings.database_url,
        engine_factory=lambda s, model, path: LabelledJudge(model),
    )
    run_until(worker, lambda: all(s in ("done", "failed") for s, _, _ in statuses(db).values()), timeout=60)
    return client.get(f"/judges/calibrations/{response.json()['id']}").json()


@pytest.mark.db
def test_a_panel_averages_its_judges_each_on_its_own_engine(client, settings, db, tmp_path):
    perfect = settings.models_dir / f"judge-perfect-{tmp_path.name}"  # a model folder the server offers
    perfect.mkdir(parents=True)
    (perfect / "config.json").write_text("{}")
    insert_human_pairs(db, 10)
    panel = [{"kind": "judge", "k": 1}, {"kind": "judge", "k": 1, "model": str(perfect)}]
    calibration = run_calibration(client, settings, db, {"judge": panel})
    assert calibration["judge"] == f"{BASE} + {perfect}" and len(calibration["judges"]) == 2
    # 8 pairs both judges agree on; 2 where one agrees and the other does not: ties (P = 0.5).
    agreement = calibration["agreement"]
    assert (agreement["agree"], agreement["disagree"], agreement["ties"]) == (8, 0, 2)
    assert agreement["rate"] == pytest.approx(0.9)
    with session_scope(db) as session:
        rows = list(session.scalars(select(Comparison)))
    assert all(row.preference["judge"] == [BASE, str(perfect)] for row in rows)
    for row in rows:
        by_judge = {j["model"]: j["p_a"] for j in row.judges}
        assert by_judge[str(perfect)] == pytest.approx(0.75)
        assert row.p_a == pytest.approx((by_judge[BASE] + by_judge[str(perfect)]) / 2)
    # Listed under its first judge's model; the console's figure for a judge takes single-judge ones only.
    assert client.get("/judges/calibrations", params={"judge": BASE}).json()[0]["id"] == calibration["id"]


@pytest.mark.db
def test_the_run_page_shows_each_judges_latest_calibration(client, settings, db, tmp_path):
    from tests.test_judges import evaluate

    train_id, _, evaluation = evaluate(client, settings, db, tmp_path, {"prompts": ["q1", "q2"]})
    assert [j["model"] for j in evaluation["win_rate"]["judges"]] == [BASE]
    page = client.get(f"/ui/train/{train_id}").text
    assert f"{BASE} against human labels: not calibrated" in page
    insert_human_pairs(db, 10)
    calibration = run_calibration(client, settings, db, {"pairs": {"source": "hh"}})
    assert calibration["agreement"]["rate"] == pytest.approx(0.8)
    page = client.get(f"/ui/train/{train_id}").text
    assert f"{BASE} against human labels: agreement <strong>0.8</strong> (95% CI" in page
    assert (
        "n 10) · shown-first wins 0.5 · length bias" in page and f"calibration #{calibration['id']}" in page
    )


@pytest.mark.db
def test_calibrate_refuses_what_it_cannot_measure(client, settings, db):
    response = client.post("/judges/calibrate", json={"pairs": {"source": "hh"}})
    assert response.status_code == 409 and response.json()["detail"].startswith("pairs: no pairs match")
    insert_human_pairs(db, 2)
    response = client.post("/judges/calibrate", json={"judge": {"kind": "judge", "model": "train:987654"}})
    assert response.status_code == 404 and response.json()["detail"].startswith("judge.model: ")
    panel = [{"kind": "judge"}, {"kind": "judge", "model": "train:987654"}]
    response = client.post("/judges/calibrate", json={"judge": panel})
    assert response.status_code == 404 and response.json()["detail"].startswith("judge.1.model: ")
    response = client.post("/judges/calibrate", json={"judge": {"kind": "reward_model", "model": "/x"}})
    assert response.status_code == 422
    assert client.get("/judges/calibrations/987654").status_code == 404


# --- the CLI ------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_cli_queues_a_calibration_waits_and_prints_its_numbers(monkeypatch):
    from tests.test_cli import InTurn, api, cli

    fake = api.__wrapped__(monkeypatch)
    summary = calibration_summary(
        [Judged(0.8, 0.7, 30, 10) if i % 5 else Judged(0.3, 0.2, 10, 30) for i in range(30)]
    )
    state = {"id": 9, "judge": "judge-x", "pairs": 30, "failed": 0} | summary
    fake.routes[("POST", "/judges/calibrate")] = state | {"status": "running", "n": 0}
    fake.routes[("GET", "/judges/calibrations/9")] = InTurn(
        [state | {"status": "running", "n": 10}, state | {"status": "done"}]
    )
    result = cli("calibrate", "--judge", "judge-x", "--source", "hh", "--max-pairs", "30", "--wait")
    assert result.exit_code == 0, result.output
    body = json.loads(fake.requests[0].content)
    assert body == {
        "judge": {"kind": "judge", "model": "judge-x", "k": 2},
        "pairs": {"source": "hh"},
        "max_pairs": 30,
    }
    assert "calibration 9 of judge judge-x: 30 pairs" in result.stdout
    assert "agreement with human labels 0.800 (95% interval" in result.stdout
    assert "over 30 pairs: 24 agree, 6 disagree, 0 ties, 0 failed" in result.stdout
    assert "position bias: the answer shown first wins 0.500 of 60 verdicts" in result.stdout
    assert (
        "length bias +0.200: the judge prefers the longer answer in 1.000 of 30 pairs, people in 0.800"
        in result.stdout
    )
    panel = cli("calibrate", "--judge", "a", "--judge", "b", "--k", "1")
    assert panel.exit_code == 0, panel.output
    assert [j["model"] for j in json.loads(fake.requests[-1].content)["judge"]] == ["a", "b"]
