"""The mutation score (tests/mutation.py): a cheap sample in every run, 500 faults under
`make mutate` (marker `mutate`, excluded by default). QUALITY.md records the score."""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import pytest

from tests.faults import KINDS
from tests.mutation import FAMILIES, PROMPT, STEPS, k_of, mutation_score, report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def subjects(wide, reference):
    """Per family: the wide checkpoint (io.split cuts its reads), mlx-lm's trace, its K."""
    paths = {fam: wide(fam) for fam in FAMILIES}
    refs = {fam: reference(p, PROMPT, STEPS) for fam, p in paths.items()}
    return paths, refs, {fam: k_of(p) for fam, p in paths.items()}


async def test_mutation_sample_every_kind_and_family(subjects):
    """One fault per (kind, family): each fires, and the parity check catches them."""
    outcomes = await mutation_score(*subjects, n=len(KINDS) * len(FAMILIES), seed=1)
    rep = report(outcomes)
    assert rep["faults"] == len(KINDS) * len(FAMILIES) and set(rep["by_kind"]) == set(KINDS)
    assert rep["caught"] >= rep["faults"] - 1, rep  # one fault may touch nothing observable


@pytest.mark.mutate
async def test_mutation_score(subjects):
    """`make mutate`: FLASHMOE_MUTATE_N faults (500), at least 99 % caught; report in runs/,
    with a tenth as many placed in the dead zone (tests/mutation.py), reported apart."""
    n = int(os.environ.get("FLASHMOE_MUTATE_N", "500"))
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - make mutate is -s
    rep = report(await mutation_score(*subjects, n=n, seed=0, log=log))
    dead = report(await mutation_score(*subjects, n=n // 10, seed=0, log=log, dead_zone=True))
    rep["dead_zone"] = {k: dead[k] for k in ("faults", "caught", "score", "by_kind")}
    rep["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    out = REPO / "runs" / "mutation" / f"{rep['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep, indent=1), f"\nwritten to {out}")
    assert rep["score"] >= 0.99, rep
