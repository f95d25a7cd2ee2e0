"""ComfyUI's first-run tuning, in pure torch: the bound on the extra time (a scripted clock), the planner hook, the
status callbacks, one tuning per signature; and the CLI and workflow shapes that feed the cache."""

from __future__ import annotations

import json
import os

import pytest
import torch

import noflash_core as nc
from noflash_core.planner import plan_problem
from noflash_core.tune import lookup
from noflash_core.tune.candidates import plan_key, tuning_candidates
from noflash_core.tune.cli import main as tune_main
from noflash_core.tune.firstrun import FirstRunPolicy, FirstRunTuner, bounded_tune
from noflash_core.tune.session import tuning_hook
from noflash_core.tune.signature import Signature
from noflash_core.tune.tuner import random_problem
from noflash_core.tune.workflow import workflow_signatures
from tests.test_tune import Script

SIG = Signature("float32", 4, 1, 1024, 1024, 32, 32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("NOFLASH_TUNE_CACHE", str(path))
    lookup.clear_memory_cache()
    yield str(path)
    lookup.clear_memory_cache()


def _setup(times_after_model, model_s=0.1, multiple=4.0, max_candidates=6):
    problem = random_problem(SIG)
    model = plan_problem(problem, use_tuning=False)
    cands = tuning_candidates(problem, model, max_candidates)
    times = {plan_key(model, 4): model_s}
    times.update({plan_key(c, 4): t for c, t in zip(cands[1:], times_after_model)})
    return problem, model, Script(times), FirstRunPolicy(multiple, max_candidates)


@pytest.mark.parametrize("others", [[0.15, 0.15, 0.15, 0.15, 0.15], [0.05] * 5, [0.09, 0.1, 0.08, 0.1, 0.07],
                                    [0.1, 0.02, 0.1, 0.02, 0.1]])
def test_tuning_stays_within_the_stated_multiple_of_an_untuned_call(others):
    problem, model, script, policy = _setup(others)
    result = bounded_tune(problem, model, policy, clock=script.clock, make_runner=script.make_runner)
    spent = script.now
    winner = result.winner
    call = winner.median_ms / 1000  # the call itself then runs the winner
    assert spent <= (policy.step_multiple - 1) * 0.1 + 1e-9
    assert spent + call <= policy.step_multiple * 0.1 + 1e-9  # the tuned call vs one untuned call
    assert len(result.measured) <= policy.max_candidates
    assert result.measured[0].plan == model and result.mode == "first-run" and result.repeats == 1
    ran = [m for m in result.measured if m.ok]
    assert winner.median_ms == min(m.median_ms for m in ran)


def test_a_candidate_slower_than_all_before_it_overruns_by_its_excess_once():
    # The documented limit of the bound: a kernel cannot be stopped half-way. The model takes 0.1 s; the first
    # candidate takes 0.3 s, 0.2 s more than anything seen before it; nothing runs after it.
    problem, model, script, policy = _setup([0.3, 0.01, 0.01, 0.01, 0.01])
    result = bounded_tune(problem, model, policy, clock=script.clock, make_runner=script.make_runner)
    assert len(result.measured) == 2
    assert script.now == pytest.approx((policy.step_multiple - 1) * 0.1 + (0.3 - 0.1) - 0.1)
    assert script.now <= (policy.step_multiple - 1) * 0.1 + (0.3 - 0.1)


def test_the_bound_stops_early_and_the_candidate_cap_holds():
    problem, model, script, policy = _setup([0.15] * 5)  # 0.1 + 0.15 = 0.25; a third would pass 0.3
    result = bounded_tune(problem, model, policy, clock=script.clock, make_runner=script.make_runner)
    assert len(result.measured) == 2
    problem, model, script, policy = _setup([0.001] * 5, max_candidates=4)
    result = bounded_tune(problem, model, policy, clock=script.clock, make_runner=script.make_runner)
    assert len(result.measured) == 4  # cheap candidates: the count cap decides
    problem, model, script, policy = _setup([0.001] * 5, multiple=1.0)
    result = bounded_tune(problem, model, policy, clock=script.clock, make_runner=script.make_runner)
    assert len(result.measured) == 1  # multiple 1: no tuning beyond the call itself


def test_the_planner_hook_tunes_each_signature_once_and_reports_states(cache):
    problem, model, script, policy = _setup([0.08, 0.05, 0.2])
    states, saved = [], []
    tuner = FirstRunTuner(policy, clock=script.clock, make_runner=script.make_runner, save=saved.extend,
                          on_state=lambda state, key: states.append((state, key)))
    q = torch.randn(1, 4, 1024, 32)
    assert nc.plan(q, q, q).source == "model"  # no hook: nothing is measured
    with tuning_hook(tuner):
        first = nc.plan(q, q, q)
        calls = len(script.calls)
        second = nc.plan(q, q, q)
        small = nc.plan(*(torch.randn(1, 4, 64, 32),) * 3)  # torch's SDPA runs it: nothing to tune
    assert first.source == second.source == "tuned" and first == second
    assert plan_key(first, 4) == plan_key(tuning_candidates(problem, model, 6)[2], 4)  # the 0.05 s one
    assert len(script.calls) == calls  # the second request was not measured again
    assert states == [("tuning", SIG.key()), ("tuned", SIG.key())]
    assert len(saved) == 1 and saved[0].mode == "first-run"
    assert small.tier == 0 and small.source == "model"


def test_first_run_results_reach_the_cache_and_later_processes(cache):
    problem, model, script, policy = _setup([0.05])
    tuner = FirstRunTuner(policy, clock=script.clock, make_runner=script.make_runner)
    q = torch.randn(1, 4, 1024, 32)
    with tuning_hook(tuner):
        tuned = nc.plan(q, q, q)
    lookup.clear_memory_cache()
    with open(cache) as f:
        [dev] = json.load(f)["devices"].values()
    assert dev["entries"][SIG.key()]["mode"] == "first-run"
    later = nc.plan(q, q, q)  # as a later process would: from the file
    assert later.source == "tuned" and plan_key(later, 4) == plan_key(tuned, 4)


def test_training_calls_are_not_tuned_on_the_first_run(cache):
    problem, model, script, policy = _setup([0.05])
    tuner = FirstRunTuner(policy, clock=script.clock, make_runner=script.make_runner, save=lambda r: None)
    q = torch.randn(1, 4, 1024, 32, requires_grad=True)
    with tuning_hook(tuner):
        assert nc.plan(q, q, q).source == "model"
    assert script.calls == []


def test_cli_tunes_shows_exports_and_resets(cache, tmp_path, capsys):
    args = ["--heads", "4", "--tokens", "1024", "--head-dim", "16", "--candidates", "3", "--repeats", "1",
            "--warmup", "0", "--device", "cpu"]
    assert tune_main(args) == 0
    out = capsys.readouterr().out
    assert "chosen" in out and "| rank | plan |" in out
    q = torch.randn(1, 4, 1024, 16)
    lookup.clear_memory_cache()
    assert nc.plan(q, q, q).source == "tuned"
    verify_out = tmp_path / "verify"
    tune_main(args + ["--verify", "--grid", "3", "--out", str(verify_out)])  # its verdict is a timing: not asserted
    row = json.loads((verify_out / "results.json").read_text())["rows"][0]
    assert row["source"] == "tuned" and row["auto_median_ms"] > 0 and len(row["grid"]) >= 3
    assert "| tuned |" in (verify_out / "results.md").read_text()
    capsys.readouterr()
    export = str(tmp_path / "export.json")
    assert tune_main(["--export", export, "--device", "cpu"]) == 0
    with open(export) as f:
        text = f.read()
    data = json.loads(text)
    assert data["format"] == "noflash-tune-export" and len(data["entries"]) == 1
    assert str(tmp_path) not in text and os.path.expanduser("~") not in text  # no personal paths
    assert tune_main(["--show", "--device", "cpu"]) == 0
    assert "L~1024" in capsys.readouterr().out
    assert tune_main(["--reset", "--device", "cpu"]) == 0
    lookup.clear_memory_cache()
    assert nc.plan(q, q, q).source == "model"


def test_workflow_signatures_are_the_video_planners_calls():
    sigs = dict(workflow_signatures("wan2.2-5b", 1280, 704, 121))
    self_attn = sigs["wan2.2-5b self"]
    assert (self_attn.l, self_attn.s, self_attn.pairs, self_attn.e, self_attn.dtype) == (27280, 27280, 24, 128,
                                                                                          "float16")
    cross = sigs["wan2.2-5b cross"]
    assert (cross.l, cross.s) == (27280, 512)
    encoder = sigs["umt5-xxl text encoder"]
    assert (encoder.dtype, encoder.l, encoder.pairs, encoder.e, encoder.mask) == ("float32", 512, 64, 64, "float")
    vae = next(s for label, s in sigs.items() if label.endswith("VAE"))
    assert vae.pairs == 1 and vae.l == vae.s > 1000
