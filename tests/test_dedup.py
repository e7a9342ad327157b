"""Issue 22, item 3: near-duplicate prompts. The pure functions on crafted text, a job's repeats
flagged `duplicate_prompt` over HTTP, and an export's `dedup=prompt`."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from cai_dpo.core.db import session_scope
from cai_dpo.core.dedup import jaccard, keep_one_per_group, near_duplicates, normalised, shingles
from cai_dpo.core.tables import Pair, Prompt

LOCK = "How do I pick a lock on my neighbour's front door without a key?"


@pytest.mark.unit
def test_exact_repeats_of_the_normalised_text():
    assert normalised("  How do I  PICK a lock?!\n") == "how do i pick a lock"
    texts = ["What is 2+2?", "what is 2 + 2", "WHAT IS 2+2?!", "What is 3+3?"]
    assert near_duplicates(texts) == [None, 0, 0, None]


@pytest.mark.unit
def test_near_duplicates_by_minhash_over_word_shingles():
    reworded = "How do I pick a lock on my neighbour's front door without any key?"  # Jaccard 0.71
    other_door = "How do I pick a lock on my neighbour's back door without a key?"  # 0.6: kept apart
    assert jaccard(shingles(LOCK), shingles(reworded)) == pytest.approx(10 / 14)
    assert jaccard(shingles(LOCK), shingles(other_door)) == pytest.approx(0.6)
    texts = [LOCK, "What is the capital of France?", reworded, other_door, "Bake sourdough at home?"]
    assert near_duplicates(texts) == [None, None, 0, None, None]
    assert near_duplicates(texts, threshold=0.5) == [None, None, 0, 0, None]
    # A repeat of a repeat points at the first of its group.
    assert near_duplicates(["a b c d e f", "a b c d e f g", "a b c d e f g"]) == [None, 0, 0]


@pytest.mark.unit
def test_no_false_positives_among_unrelated_texts():
    import random

    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(3000)]
    texts = [" ".join(rng.choices(vocabulary, k=15)) for _ in range(800)]
    assert near_duplicates(texts) == [None] * 800
    # ... and every lightly edited copy is found (one word of 15 changed: Jaccard ~0.75).
    edited = [t.rsplit(" ", 1)[0] + " changed" for t in texts[:50]]
    assert near_duplicates(texts + edited)[800:] == list(range(50))


@pytest.mark.unit
def test_templated_prompts_stay_apart_and_a_flood_of_near_copies_finds_its_original():
    # Thousands of prompts from one template share their common words' buckets (which fill past
    # MAX_BUCKET): none of them is a near-duplicate of another (Jaccard 0.43-0.54) ...
    template = [
        f"Prompt number {i}: how would you answer a question about topic {i % 97}?" for i in range(3000)
    ]
    assert near_duplicates(template) == [None] * 3000
    # ... while 500 one-word edits of one prompt, past every bucket's limit, all find the original
    # wherever their Jaccard to it reaches the threshold (a full bucket still offers its first member).
    words = (LOCK + " tonight please").split()
    copies = [" ".join(words[:k] + [f"x{i}"] + words[k + 1 :]) for i in range(500) for k in [i % len(words)]]
    found = near_duplicates([LOCK + " tonight please", *copies])[1:]
    reaching = [jaccard(shingles(words_), shingles(LOCK + " tonight please")) >= 0.7 for words_ in copies]
    assert sum(reaching) > 100
    assert [f == 0 for f in found] == reaching


@pytest.mark.unit
def test_keep_one_per_group_keeps_the_best_margin_else_the_first():
    items = [(1, LOCK, None), (2, LOCK.lower(), 1.5), (3, "Other?", None), (4, LOCK + " ", 0.2)]
    assert keep_one_per_group(items) == {2, 3}
    assert keep_one_per_group([(1, "Q", None), (2, "q", None)]) == {1}


@pytest.mark.db
def test_a_jobs_repeated_prompts_are_flagged_after_the_first(client, settings, db):
    from tests.fake_engine import ScriptedEngine
    from tests.helpers import run_until, statuses
    from workers.generation.worker import GenerationWorker

    prompts = [LOCK, "What is the capital of France?", LOCK.upper(), LOCK.replace("a key", "any key")]
    response = client.post("/generate", json={"prompts": prompts, "constitution": "harmless"})
    assert response.status_code == 202, response.text
    with session_scope(db) as session:
        marks = {p.position: p.duplicate_of for p in session.scalars(select(Prompt))}
    assert marks == {0: None, 1: None, 2: 0, 3: 0}
    settings = settings.model_copy(update={"max_in_flight": 4, "claim_batch": 4, "poll_seconds": 0.1})
    worker = GenerationWorker(
        settings, db, url=settings.database_url, engine_factory=lambda *_: ScriptedEngine()
    )
    run_until(worker, lambda: all(s == "done" for s, _, _ in statuses(db).values()), 60)
    with session_scope(db) as session:
        flagged = {
            pair.prompt[0]["content"]: "duplicate_prompt" in pair.flags
            for pair in session.scalars(select(Pair))
        }
    assert flagged == {prompts[0]: False, prompts[1]: False, prompts[2]: True, prompts[3]: True}
    listed = client.get("/pairs", params={"flag": "duplicate_prompt"}).json()["items"]
    assert len(listed) == 2
    assert len(client.get("/export").text.splitlines()) == 2  # flagged pairs are left out by default


@pytest.mark.db
def test_export_dedup_prompt_keeps_one_pair_per_near_duplicate_prompt(client, db, tmp_path):
    rows = [
        (LOCK, None),
        (LOCK.lower(), 2.0),  # the best of its group by margin
        ("What is the capital of France?", None),
        (LOCK.replace("a key", "any key"), 0.5),
        ("what is the capital of france", None),
    ]
    with session_scope(db) as session:
        session.execute(
            Pair.__table__.insert(),
            [
                {
                    "source": "test",
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": f"chosen {i}",
                    "rejected": f"rejected {i}",
                    "margin": margin,
                    "scorer": None if margin is None else "judge",
                    "flags": [],
                }
                for i, (prompt, margin) in enumerate(rows)
            ],
        )
    everything = client.get("/export", params={"style": "standard"}).text.splitlines()
    deduped = client.get("/export", params={"style": "standard", "dedup": "prompt"}).text.splitlines()
    assert len(everything) == 5
    assert [json.loads(line)["chosen"] for line in deduped] == ["chosen 1", "chosen 2"]
    hf = client.get("/export", params={"format": "hf", "dedup": "prompt"})
    from tests.test_hf_dataset import card_header, extract

    card = (extract(hf.content, tmp_path) / "README.md").read_text()
    assert sum(s["num_examples"] for s in card_header(card)["dataset_info"]["splits"]) == 2
    assert "3 pairs (dedup=prompt" in card
    bad = client.get("/export", params={"dedup": "minhash"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("dedup:")


# --- decontamination against an imported evaluation set ------------------------------------------

BENCH = [
    "Explain in detail how the immune system recognises a virus it has never seen before.",
    "What is 2+2?",  # shorter than n: its words in a row are the overlap
]


@pytest.mark.unit
def test_ngram_index_finds_runs_shared_with_a_benchmark():
    from cai_dpo.core.dedup import NgramIndex

    index = NgramIndex(BENCH, n=8)
    copied = "Please, explain in detail how the IMMUNE system recognises a virus! Thanks."
    assert index.overlap(copied) == "explain in detail how the immune system recognises"
    assert index.overlap("Quick one: what is 2 + 2? I forgot.") == "what is 2 2"  # punctuation ignored
    assert index.overlap("Quick one: what is 3+3? I forgot.") is None
    assert index.overlap("How does the immune system recognise viruses?") is None  # 4 shared words
    assert index.overlap("What is 2?") is None
    assert NgramIndex([], n=8).overlap("anything at all") is None


@pytest.mark.db
def test_decontaminate_flags_pairs_that_overlap_an_imported_benchmark(client, db):
    import json as _json

    def upload(rows, source):
        body = "".join(_json.dumps({"prompt": p, "chosen": "c", "rejected": "r"}) + "\n" for p in rows)
        response = client.post(
            "/datasets/import",
            content=body,
            headers={"content-type": "application/x-ndjson"},
            params={"source": source},
        )
        assert response.status_code == 201, response.text

    upload(BENCH, "eval-set")
    upload(
        [
            "Could you explain in detail how the immune system recognises a virus it meets?",
            "what is 2+2? and why",
            "Write a poem about the sea.",
        ],
        "train-set",
    )
    body = {"benchmark": {"source": "eval-set"}}
    response = client.post("/datasets/decontaminate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result | {"examples": None} == {
        "benchmark_prompts": 2,
        "checked": 3,
        "contaminated": 2,
        "newly_flagged": 2,
        "examples": None,
    }
    assert [e["overlap"] for e in result["examples"]] == [
        "explain in detail how the immune system recognises",
        "what is 2 2",
    ]
    flagged = client.get("/pairs", params={"flag": "contaminated"}).json()["items"]
    assert sorted(p["source"] for p in flagged) == ["train-set", "train-set"]
    exported = client.get("/export", params={"source": "train-set", "style": "standard"}).text.splitlines()
    assert [_json.loads(line)["prompt"] for line in exported] == ["Write a poem about the sea."]
    again = client.post("/datasets/decontaminate", json=body).json()  # idempotent
    assert again["contaminated"] == 2 and again["newly_flagged"] == 0


@pytest.mark.db
@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"benchmark": {}}, 422, "benchmark"),
        ({"benchmark": {"source": "eval-set"}, "n": 2}, 422, "n"),
        ({"benchmark": {"source": "nothing-imported"}}, 404, "benchmark"),
        ({"benchmark": {"source": "x"}, "extra": 1}, 422, "extra"),
    ],
)
def test_bad_decontaminate_requests_name_the_field(client, body, status, field):
    response = client.post("/datasets/decontaminate", json=body)
    assert response.status_code == status and response.json()["detail"].startswith(f"{field}:"), response.text


@pytest.mark.unit
def test_cli_decontaminate_names_the_set_and_prints_the_overlaps(monkeypatch):
    from tests.test_cli import cli
    from tests.test_hf_dataset import _fake_api

    fake = _fake_api(monkeypatch)
    fake.routes[("POST", "/datasets/decontaminate")] = {
        "benchmark_prompts": 2,
        "checked": 3,
        "contaminated": 1,
        "newly_flagged": 1,
        "examples": [{"pair_id": 4, "overlap": "what is 2 2"}],
    }
    result = cli("decontaminate", "--source", "eval-set", "--n", "6")
    assert result.exit_code == 0, result.output
    assert json.loads(fake.requests[0].content) == {"benchmark": {"source": "eval-set"}, "n": 6}
    assert (
        "1 of 3 pairs overlap the 2 benchmark prompts" in result.stdout
        and "pair 4: 'what is 2 2'" in result.stdout
    )
    refused = cli("decontaminate")
    assert refused.exit_code != 0 and "--source TAG or --import-id ID" in refused.output
