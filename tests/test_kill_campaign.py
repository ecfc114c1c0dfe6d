"""bench/kill_campaign.py in small: compare, tune and a cache build SIGKILLed at seeded moments and
run again end equal to an uninterrupted run (the full campaign: 20 kills each, bench/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench" / "kill_campaign.py"


def campaign_module():
    spec = importlib.util.spec_from_file_location("kill_campaign", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.parametrize("name", ["compare", "tune", "cache"])
def test_a_killed_run_rerun_ends_as_an_uninterrupted_one(name, tmp_path):
    kc = campaign_module()
    res = kc.campaign(name, kills=2, rng=random.Random(1), work=tmp_path, log=lambda m: None)
    assert res["equal"] == res["kills"] == 2, res["rows"]
    assert all(r["rerun_rc"] == 0 for r in res["rows"])
