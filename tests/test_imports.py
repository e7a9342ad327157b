"""`POST /datasets/import`: TRL standard and conversational rows and HH-RLHF transcripts, all or nothing."""

import json

import pytest
from sqlalchemy import func, select

from cai_dpo.core.db import session_scope
from cai_dpo.core.pair_import import RowError, parse_pair, parse_pairs
from cai_dpo.core.tables import Pair
from tests.helpers import hh_lines


@pytest.mark.unit
def test_parse_each_format():
    standard = parse_pair({"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert standard.prompt == [{"role": "user", "content": "Q?"}] and standard.format == "standard"
    conversational = parse_pair(
        {
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    )
    assert conversational.prompt[0]["role"] == "system" and conversational.chosen == "good"
    hh = parse_pair(
        {
            "chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: good",
            "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: bad",
        }
    )
    assert hh.prompt == [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
    ]
    assert (hh.chosen, hh.rejected, hh.format) == ("good", "bad", "hh-rlhf")
    # The standard export of a multi-turn prompt comes back as the same messages.
    roundtrip = parse_pair(
        {"prompt": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:", "chosen": "x", "rejected": "y"}
    )
    assert roundtrip.prompt == hh.prompt


@pytest.mark.unit
@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([1, 2], "JSON object"),
        ({"chosen": "a", "rejected": "b"}, "transcript must start"),
        ({"prompt": "Q"}, "chosen: missing"),
        ({"prompt": "Q", "chosen": ["x"], "rejected": "y"}, "string answers"),
        ({"prompt": [{"role": "bot", "content": "Q"}], "chosen": [], "rejected": []}, "prompt.0"),
        (
            {
                "prompt": [{"role": "user", "content": "Q"}],
                "chosen": [{"role": "user", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "y"}],
            },
            "chosen: expected exactly one assistant",
        ),
        (
            {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: Z\n\nAssistant: y"},
            "different prompts",
        ),
        ({"prompt": "Q", "chosen": " ", "rejected": "y"}, "empty answer"),
        (
            {
                "prompt": [{"role": "user", "content": "Q\x00"}],
                "chosen": [{"role": "assistant", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "y"}],
            },
            r"prompt\.0\.content: contains a NUL",
        ),
        ({"prompt": "Q", "chosen": "x\ud800", "rejected": "y"}, "chosen: contains a lone surrogate"),
    ],
)
def test_parse_errors(row, message):
    with pytest.raises(RowError, match=message):
        parse_pair(row)


@pytest.mark.unit
def test_columns_the_import_ignores_may_hold_anything():
    pair = parse_pair({"prompt": "Q", "chosen": "x", "rejected": "y", "score": float("nan"), "id": "\x00"})
    assert (pair.chosen, pair.rejected) == ("x", "y")


@pytest.mark.unit
def test_errors_carry_line_numbers():
    pairs, errors = parse_pairs(
        ['{"prompt": "Q", "chosen": "a", "rejected": "b"}', "", "{oops", '{"prompt": "Q"}']
    )
    assert len(pairs) == 1
    assert [e["line"] for e in errors] == [3, 4]


# A browser page cannot send this header to another origin: multipart uploads need it (any value).
MULTIPART_TOKEN = {"X-Requested-By": "tests"}


def pair_count(db) -> int:
    with session_scope(db) as session:
        return session.scalar(select(func.count(Pair.id)))


@pytest.mark.db
def test_import_hh_as_ndjson_then_export_and_filter(client, db):
    body = "".join(hh_lines(30))
    response = client.post(
        "/datasets/import",
        content=body,
        headers={"content-type": "application/x-ndjson"},
        params={"source": "hh-test", "constitution": "harmless"},
    )
    assert response.status_code == 201, response.text
    result = response.json()
    assert result["n_pairs"] == 30 and result["formats"] == ["hh-rlhf"]
    exported = (
        client.get("/export", params={"source": "hh-test", "metadata": True}).content.decode().splitlines()
    )
    assert len(exported) == 30
    first = json.loads(exported[0])
    assert first["source"] == "hh-test" and first["constitution"] == "harmless"
    assert first["prompt"][-1]["role"] == "user"


@pytest.mark.db
def test_import_multipart_file(client, db):
    rows = [{"prompt": f"Q{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    files = {"file": ("mine.jsonl", "\n".join(json.dumps(r) for r in rows).encode(), "application/x-ndjson")}
    response = client.post("/datasets/import", files=files, headers=MULTIPART_TOKEN)
    assert response.status_code == 201, response.text
    assert response.json()["source"] == "import:mine.jsonl" and pair_count(db) == 5


@pytest.mark.db
def test_a_file_with_one_bad_row_imports_nothing(client, db):
    lines = hh_lines(10)
    lines[6] = '{"prompt": "only a prompt"}\n'
    response = client.post(
        "/datasets/import", content="".join(lines), headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 422
    assert response.json()["detail"].startswith("line 7: chosen: missing")
    assert response.json()["errors"][0]["line"] == 7
    assert pair_count(db) == 0


@pytest.mark.db
def test_empty_and_undecodable_uploads(client, db):
    empty = client.post("/datasets/import", content=b"\n\n", headers={"content-type": "application/x-ndjson"})
    assert empty.json()["detail"].startswith("body:")
    response = client.post(
        "/datasets/import", content=b"\xff\xfe", headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 400 and response.json()["detail"].startswith("body:")
    no_file = client.post("/datasets/import", files={"other": ("x", b"{}")}, headers=MULTIPART_TOKEN)
    assert no_file.json()["detail"].startswith("file:")
    assert pair_count(db) == 0
