"""Filters of `/pairs`, `/export` and the console added with the content flags: on one quality
flag (`flag`)."""

import json

import pytest

from cai_dpo.core.db import session_scope
from cai_dpo.core.tables import Pair

pytestmark = pytest.mark.db


def test_the_flag_filter_lists_the_pairs_carrying_that_flag(client, db):
    with session_scope(db) as session:
        session.execute(
            Pair.__table__.insert(),
            [
                {"source": "test", "prompt": [], "chosen": "c", "rejected": "r", "flags": flags}
                for flags in ([], ["copies_example"], ["meta_revision", "copies_example"], ["truncated"])
            ],
        )
    listed = client.get("/pairs", params={"flag": "copies_example"}).json()["items"]
    assert [item["id"] for item in listed] == [2, 3]
    exported = client.get("/export", params={"flag": "copies_example", "metadata": True}).text.splitlines()
    assert [json.loads(row)["id"] for row in exported] == [2, 3]
    assert [item["id"] for item in client.get("/pairs").json()["items"]] == [1]
    assert [
        item["id"] for item in client.get("/pairs", params={"flag": "inconsistent"}).json()["items"]
    ] == []
    refused = client.get("/pairs", params={"flag": "made_up"})
    assert refused.status_code == 422 and refused.json()["detail"].startswith("flag:")
    page = client.get("/ui/pairs", params={"flag": "meta_revision"}).text
    assert 'data-pair="3"' in page and 'data-pair="2"' not in page
    assert " selected>meta_revision</option>" in page
