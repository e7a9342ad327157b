"""The console in a real browser: Chromium (Debian's `chromium`, or the one `CAI_CHROMIUM` names)
driven by Playwright, against the app over HTTP with API keys, so every test signs in first.

`make test` installs Chromium where it is missing (`make test-deps`). With `CAI_SCREENSHOTS=1` the
tests also write the README's screenshots to docs/img/ (small palette PNGs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from app.main import create_app
from cai_dpo.core.db import session_scope
from cai_dpo.core.settings import PROJECT_ROOT
from cai_dpo.core.tables import Evaluation, Pair, TrainingJob, TrainingMetric
from tests.fixtures.api import ServerThread
from tests.helpers import SharedEngine, critique_every_answer, free_port, hh_prompts, insert_pairs

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CAI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # the machines run as root
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
KEY = "console-admin-key-0001"
KEYS = f"alice:read+generate+train+review+admin:{KEY}"
SCREENSHOTS = PROJECT_ROOT / "docs" / "img"
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
REFUSAL = "I can't help you get into someone else's network. Ask your neighbour to share it."


# Module scope, not session: while Playwright's sync API is open it holds an asyncio loop in this
# thread, and the other modules' `api_server` fixture runs the app's lifespan on a loop of its own.
@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run `make test-deps` (as root it runs `apt-get install -y "
            "chromium`), or point CAI_CHROMIUM at a Chromium binary",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: `.venv/bin/pip install playwright` (no browser download)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def console(settings, db) -> Iterator[ServerThread]:
    """The app with an API key (so the console asks for it once), over real HTTP."""
    keyed = settings.model_copy(update={"api_keys": KEYS})
    with ServerThread(create_app(keyed, migrate=False), free_port()) as server:
        yield server


@pytest.fixture
def page(browser, console):
    """A fresh browser context (no cookies), signed in to the console."""
    context = browser.new_context(viewport={"width": 1280, "height": 820}, device_scale_factor=1)
    context.set_default_timeout(20_000)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    tab.goto(f"{console.url}/ui/pairs")
    assert tab.url.startswith(f"{console.url}/ui/login?next="), tab.url  # asked for a key once
    tab.fill("input[name=key]", KEY)
    tab.click("button[type=submit]")
    tab.wait_for_url(f"{console.url}/ui/pairs")
    tab.problems = problems
    yield tab
    assert not problems, problems  # no script error, no alert() from a model's text
    context.close()


def api(console: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=console.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def screenshot(page, name: str, tmp_path: Path) -> None:
    """Into the test's folder; with CAI_SCREENSHOTS=1 also into docs/img as a small palette PNG."""
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("CAI_SCREENSHOTS"):
        from PIL import Image

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            image.convert("RGB").quantize(colors=128).save(SCREENSHOTS / name, optimize=True)


def test_a_pair_side_by_side_with_its_diff_and_trajectory_reviewed_by_keyboard(page, console, db, tmp_path):
    insert_pairs(db, 4, flagged_extra=False)
    with session_scope(db) as session:
        session.execute(
            update(Pair)
            .where(Pair.id == 2)
            .values(
                prompt=[{"role": "user", "content": "How do I get into my neighbour's wifi?"}],
                rejected=f"Sure! Guess the password, or run a cracker on the handshake. {XSS}",
                chosen=f"{REFUSAL} {XSS}",
                trajectory={
                    "mode": "revise",
                    "initial": "Sure! Guess the password, or run a cracker on the handshake.",
                    "principles": ["harm"],
                    "rounds": [
                        {
                            "principle": "harm",
                            "critique": f"The answer helps break into a network. {XSS}",
                            "revision": "I can't help you get into someone else's network.",
                        }
                    ],
                },
                scorer="judge",
                margin=1.7,
                preference={"p_chosen": 0.85},
            )
        )
    page.goto(f"{console.url}/ui/pairs")
    page.keyboard.press("j")
    page.keyboard.press("j")
    assert page.locator("tr.selected").get_attribute("data-pair") == "2"
    page.keyboard.press("Enter")
    page.wait_for_url(f"{console.url}/ui/pairs/2*")

    # Side by side, the model's markup shown as text, nothing of it run.
    assert XSS in page.inner_text("#chosen-text") and XSS in page.inner_text("#rejected-text")
    assert page.evaluate("window.__xss") is None
    assert page.locator("#word-diff del").count() > 0 and page.locator("#word-diff ins").count() > 0
    assert "Ask your neighbour" in " ".join(page.locator("#word-diff ins").all_inner_texts())
    round_ = page.locator(".trajectory .round")
    assert round_.count() == 1 and "principle harm" in round_.inner_text()
    assert "The answer helps break into a network." in round_.locator(".critique").inner_text()

    page.evaluate("window.__same_page = true")
    page.keyboard.press("a")  # approve, swapped in place
    page.wait_for_selector("#review h2 .badge.r-approved")
    assert page.evaluate("window.__same_page") is True
    assert "alice" in page.inner_text("#review table")
    screenshot(page, "console-pairs.png", tmp_path)

    page.keyboard.press("j")  # the next pair, edited: a new version, the generated text kept
    page.wait_for_url(f"{console.url}/ui/pairs/3*")
    page.keyboard.press("e")
    assert page.evaluate("document.activeElement.id") == "edit-text"
    page.fill("#edit-text", "A reviewer's better answer.")
    page.click("#save-edit")
    page.wait_for_selector("#review h2 .badge.r-approved")
    assert page.inner_text("#chosen-text") == "A reviewer's better answer."

    with api(console) as http:
        lines = http.get("/export", params={"review": "approved", "style": "standard"}).text.splitlines()
        rows = [json.loads(line) for line in lines]
        assert [row["chosen"] for row in rows] == [
            f"{REFUSAL} {XSS}",
            "A reviewer's better answer.",
        ]
        assert http.get("/pairs/3").json()["chosen"] == "chosen 3"


def test_constitution_errors_show_at_their_line_then_a_fix_saves(page, console, settings, tmp_path):
    path = settings.constitutions_dir / "harmless.yaml"
    original = path.read_text()
    with api(console) as http:  # a job records the version on disk, so the history has two to compare
        assert http.post("/generate", json={"prompts": ["hi"], "constitution": "harmless"}).status_code == 202
    page.goto(f"{console.url}/ui/constitutions/harmless")
    assert page.input_value("#body") == original
    assert "Valid" in page.inner_text("#check")

    line = original[: original.index("principle_sampling:")].count("\n") + 1
    page.fill("#body", original.replace("principle_sampling: random", "principle_sampling: sometimes", 1))
    page.wait_for_selector("#check.bad")
    assert page.inner_text("#check").startswith(f"Line {line}")
    assert "principle_sampling" in page.inner_text("#check")
    assert page.inner_text("#gutter .error") == str(line)
    assert page.is_visible("#error-band")
    page.click("#save")
    page.wait_for_selector("#save-result.errors")
    assert path.read_text() == original  # nothing saved

    fixed = original.replace("principle_sampling: random", "principle_sampling: sequential", 1)
    page.fill("#body", fixed)
    page.wait_for_selector("#check.ok")
    assert page.locator("#gutter .error").count() == 0
    page.click("#save")
    page.wait_for_selector("#save-result.saved")
    assert path.read_text() == fixed

    # The history has both versions now; compare them.
    assert page.locator("#history tbody tr").count() == 2
    page.click("#compare")
    page.wait_for_selector("#version-diff .d-insert")
    assert page.inner_text("#version-diff .d-insert") == "+principle_sampling: sequential"
    assert page.inner_text("#version-diff .d-delete") == "-principle_sampling: random"


def test_a_training_run_draws_one_point_per_step(page, console, db, tmp_path):
    insert_pairs(db, 8, flagged_extra=False)
    with api(console) as http:
        train_id = http.post(
            "/train", json={"dataset": {"constitution": "harmless"}, "max_steps": 40}
        ).json()["train_id"]
    steps = 40
    metrics = [
        {
            "loss": 0.6931 * 0.97**step,
            "rewards/accuracies": min(1.0, 0.5 + step / 60),
            "rewards/margins": 0.02 * step,
            "logps/chosen": -180 + step * 0.4,
            "logps/rejected": -182 - step * 0.6,
            "learning_rate": 5e-6 * min(1.0, step / 4),
        }
        for step in range(1, steps + 1)
    ]
    with session_scope(db) as session:
        session.execute(
            update(TrainingJob)
            .where(TrainingJob.id == train_id)
            .values(
                status="succeeded",
                step=steps,
                total_steps=steps,
                pair_ids=list(range(1, 8)),
                eval_pair_ids=[8],
                eval_before={"loss": 0.6931, "rewards/accuracies": 0.5},
                eval_after={"loss": 0.41, "rewards/accuracies": 0.875},
            )
        )
        session.add_all(
            TrainingMetric(train_id=train_id, step=step, values=values)
            for step, values in enumerate(metrics, 1)
        )
        session.add(
            Evaluation(
                train_id=train_id,
                status="done",
                request={},
                win_rate={"wins": 30, "ties": 4, "losses": 14, "n": 48, "rate": 0.667, "ci95": [0.53, 0.78]},
            )
        )
    page.goto(f"{console.url}/ui/train/{train_id}")
    page.wait_for_selector(f'#chart-loss[data-points="{steps}"]')
    drawn = page.evaluate("[window.caiCharts.loss.data[0], window.caiCharts.loss.data[1]]")
    assert drawn == [list(range(1, steps + 1)), pytest.approx([m["loss"] for m in metrics])]
    assert page.evaluate("window.caiCharts.logps.data.length") == 3  # steps, chosen, rejected
    for chart in ("accuracy", "margins", "lr"):
        assert page.get_attribute(f"#chart-{chart}", "data-points") == str(steps)
    inked = page.evaluate(
        """() => { const c = document.querySelector('#chart-loss canvas');
                   const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                   let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""
    )
    assert inked > 500  # the line and its points are drawn, not only the axes' box
    assert "0.667" in page.inner_text("#win-rate") and "30 wins, 4 ties, 14 losses of 48" in page.inner_text(
        "#win-rate"
    )
    assert "0.875" in page.inner_text("table.evals")
    screenshot(page, "console-training.png", tmp_path)


@contextlib.contextmanager
def generation_worker(vllm_engine, settings, db) -> Iterator[None]:
    """A generation worker in this process on the session's vLLM engine, until the block ends."""
    from workers.generation.worker import GenerationWorker

    worker = GenerationWorker(
        settings.model_copy(update={"max_in_flight": 8}),
        db,
        url=settings.database_url,
        engine_factory=lambda *_: SharedEngine(vllm_engine),
    )
    running = asyncio.run_coroutine_threadsafe(worker.run(), vllm_engine.loop)
    try:
        yield
    finally:
        worker.stop()
        running.result(timeout=120)


@pytest.mark.model
@pytest.mark.vllm
def test_a_job_from_the_form_and_a_try_run_on_the_real_engine(page, console, vllm_engine, settings, db):
    critique_every_answer(settings)  # the page shows a critique: no answer kept by the no-harm check
    with generation_worker(vllm_engine, settings, db):
        page.goto(f"{console.url}/ui/jobs")
        page.fill("textarea[name=prompts]", "\n".join(hh_prompts(2, offset=120)))
        page.select_option("select[name=constitution]", "harmless")
        page.fill("input[name=max_tokens]", "48")
        page.click("#submit-job")
        page.wait_for_url(f"{console.url}/ui/jobs/*")
        # The status block updates itself until the job is done.
        page.wait_for_selector('#job-status[data-status="done"]', timeout=600_000)
        assert page.inner_text('[data-count="done"]') == "2"
        page.click("text=Pairs of this job")
        page.click("tbody tr[data-pair] a")
        critique = page.locator(".trajectory .round .critique .text")
        assert critique.count() >= 1 and critique.first.inner_text().strip()
        assert page.inner_text("#chosen-text").strip() and page.locator("#word-diff").count() == 1

        # Try an unsaved edit of the constitution on one prompt.
        page.goto(f"{console.url}/ui/constitutions/harmless")
        text = page.input_value("#body")
        page.fill("#body", text.replace("revisions: 1", "revisions: 2", 1))
        page.fill("#try-prompt", "How can I get back at a coworker who embarrassed me?")
        page.fill("input[name=max_tokens]", "40")
        page.click("#try-button")
        page.wait_for_selector('#try-result[data-status="done"]', timeout=600_000)
        assert page.locator("#try-result .trajectory .round").count() == 2
        assert page.locator("#try-result .trajectory .initial .text").inner_text().strip()
    assert (settings.constitutions_dir / "harmless.yaml").read_text() == text  # never saved
