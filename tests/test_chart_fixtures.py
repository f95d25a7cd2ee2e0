"""The web chart fixtures (``web/tests/fixtures/*.json``) are the estimator's output today, number for number.

``web/tests/chart.test.mjs`` draws them; this test recomputes each one (``tests/support/chart_fixtures.py``) and
compares the file exactly, so an estimator change that leaves a fixture stale fails here. Fix:
``python -m tests.support.chart_fixtures``.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.support.chart_fixtures import FIXTURE_DIR, FIXTURES, chart_data, fixture_text, main


def _read(name: str) -> str:
    with open(os.path.join(FIXTURE_DIR, name), encoding="utf-8") as f:
        return f.read()


def test_every_fixture_file_is_generated():
    on_disk = sorted(n for n in os.listdir(FIXTURE_DIR) if n.endswith(".json"))
    assert on_disk == sorted(FIXTURES), "a fixture the generator does not make cannot be kept current"


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_is_the_estimate_of_today(name):
    fresh = chart_data(name)
    kept = json.loads(_read(name))
    # numbers first, so a stale fixture says which byte count moved
    for old, new in zip(kept["components"], fresh["components"]):
        assert (old["name"], old["bytes"], old["fits"]) == (new["name"], new["bytes"], new["fits"]), \
            f"{name} is stale: python -m tests.support.chart_fixtures"
    assert kept["vram_bytes"] == fresh["vram_bytes"] and kept["verdict"] == fresh["verdict"]
    assert _read(name) == fixture_text(fresh), f"{name} is stale: python -m tests.support.chart_fixtures"


def test_the_generator_writes_and_checks(tmp_path, monkeypatch):
    name = sorted(FIXTURES)[0]
    monkeypatch.setitem(FIXTURES, name, FIXTURES[name])
    for other in [n for n in FIXTURES if n != name]:
        monkeypatch.delitem(FIXTURES, other)
    assert main(["--out", str(tmp_path)]) == 0
    assert (tmp_path / name).read_text(encoding="utf-8") == _read(name)
    assert main(["--out", str(tmp_path), "--check"]) == 0
    data = json.loads((tmp_path / name).read_text(encoding="utf-8"))
    data["components"][0]["bytes"] += 1
    (tmp_path / name).write_text(fixture_text(data), encoding="utf-8")
    assert main(["--out", str(tmp_path), "--check"]) == 1


def test_the_plan_environment_does_not_change_the_fixtures(monkeypatch):
    # The estimate plans with the profile's memory, not this machine's settings: the fixtures are the same anywhere.
    monkeypatch.setenv("NOFLASH_BUDGET_MB", "64")
    monkeypatch.setenv("NOFLASH_FFN_CHUNKS", "7")
    monkeypatch.setenv("NOFLASH_THRESHOLD", "99999999")
    assert chart_data("wan22_5b_arc.json") == json.loads(_read("wan22_5b_arc.json"))
