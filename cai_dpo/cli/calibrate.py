"""`cai-dpo calibrate`: measure a judge against human-labelled pairs (`POST /judges/calibrate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cai_dpo.cli.client import ApiKey, Client, Url, follow


def calibrate(
    judge: Annotated[
        list[str] | None,
        typer.Option(
            help="The judge's model (default: CAI_JUDGE_MODEL, else the server's model); repeat for a panel."
        ),
    ] = None,
    k: Annotated[int, typer.Option(min=1, max=16, help="Comparison principles per comparison.")] = 2,
    source: Annotated[
        str | None, typer.Option(help="Pairs of this source, e.g. hh (an import's tag).")
    ] = None,
    max_pairs: Annotated[int, typer.Option(min=1, max=5000, help="At most this many pairs.")] = 256,
    config: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="The POST /judges/calibrate body (--judge and --source override it).",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress, then agreement and biases.")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Measure a judge against people: its agreement with human-labelled pairs (chosen preferred),
    with its 95% interval, position bias and length bias."""
    client = Client(url, api_key)
    body: dict[str, Any] = json.loads(config.read_text()) if config else {}
    if judge:
        specs = [{"kind": "judge", "model": model, "k": k} for model in judge]
        body["judge"] = specs[0] if len(specs) == 1 else specs
    elif "judge" not in body:
        body["judge"] = {"kind": "judge", "k": k}
    if source is not None:
        body.setdefault("pairs", {})["source"] = source
    body.setdefault("max_pairs", max_pairs)
    calibration = client.call("POST", "/judges/calibrate", json=body)
    print(f"calibration {calibration['id']} of judge {calibration['judge']}: {calibration['pairs']} pairs")
    if not wait:
        return
    (state,) = follow(
        client, {f"calibrate {calibration['id']}": f"/judges/calibrations/{calibration['id']}"}, view
    )
    for line in describe(state):
        print(line)


def view(state: dict) -> dict:
    done = state["n"] + state["failed"]
    agreement = state["agreement"]
    return dict(
        completed=done,
        total=state["pairs"],
        what="pairs",
        rate=None,
        unit="pairs",
        eta=None,
        note=f"agreement {agreement['rate']:.2f}" if agreement["rate"] is not None else state["status"],
        over=state["status"] == "done",
    )


def describe(state: dict) -> list[str]:
    """A finished calibration's numbers, one line each."""
    agreement, position, length = state["agreement"], state["position_bias"], state["length_bias"]
    if not state["n"]:
        return [f"no pair was judged ({state['failed']} failed)"]
    low, high = agreement["ci95"]
    lines = [
        f"agreement with human labels {agreement['rate']:.3f} (95% interval {low:.3f}..{high:.3f}) over "
        f"{state['n']} pairs: {agreement['agree']} agree, {agreement['disagree']} disagree, "
        f"{agreement['ties']} ties, {state['failed']} failed"
    ]
    low, high = position["ci95"]
    lines.append(
        f"position bias: the answer shown first wins {position['rate']:.3f} of {position['n']} verdicts "
        f"(95% interval {low:.3f}..{high:.3f}; 0.5 is none); both orders agree on {state['consistent']:.3f} "
        "of pairs"
    )
    if length["n"]:
        lines.append(
            f"length bias {length['bias']:+.3f}: the judge prefers the longer answer in "
            f"{length['judge_prefers_longer']:.3f} of {length['n']} pairs, people in "
            f"{length['people_prefer_longer']:.3f}"
        )
    return lines
