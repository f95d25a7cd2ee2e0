"""The VRAM Probe's "Last run" is its own workflow's (issue 17.2): a run another workflow produced is not shown.

Runs are recorded by real monitors into a real history, each with the origin ComfyUI's executor gives it (prompt,
workflow); the probe keys on its own origin as the badges do. Without ComfyUI.
"""

from __future__ import annotations

from noflash_core.comfy.op_telemetry import FFNMonitor
from noflash_core.comfy.probe import NO_RUN, format_last_run, probe_text, run_of_workflow
from noflash_core.comfy.telemetry import RunHistory, RunMonitor
from noflash_core.telemetry import CallRecord

REPORT = {"name": "cpu", "vendor": "cpu", "arch": None, "total_bytes": 1 << 30, "free_bytes": 1 << 29}


def _call(tier: int, q_len: int) -> CallRecord:
    return CallRecord("noflash", tier, 128, 256, 1, 8, q_len, q_len, 64, "float16", "cpu", "test")


def _run(history: RunHistory, label: str, tier: int, q_len: int, **origin) -> dict:
    """One finished sampling run of a patched model, started in ``origin`` (prompt_id, workflow_id)."""
    monitor = RunMonitor(label, history=history, context=lambda: dict(origin))
    monitor.start()
    monitor.record(_call(tier, q_len))
    return monitor.finish()


def _history() -> RunHistory:
    history = RunHistory()
    _run(history, "WAN22", 2, 27280, prompt_id="p1", workflow_id="wan")
    _run(history, "FLUX", 1, 9472, prompt_id="p2", workflow_id="flux")
    ffn = FFNMonitor("FLUX", history=history, context=lambda: {"prompt_id": "p3", "workflow_id": "wan"})
    ffn.start()
    ffn.record("cpu", 1000, 250, 4096, 1024)
    ffn.finish()  # newer, same workflow as the Wan runs, but not an attention run
    return history


def test_the_run_of_the_probes_workflow_not_the_newest():
    history = _history()
    wan = run_of_workflow(history.runs(), {"prompt_id": "p9", "workflow_id": "wan"})
    assert (wan["label"], wan["max_q_len"], wan["tiers"]) == ("WAN22", 27280, {"2": 1})
    flux = run_of_workflow(history.runs(), {"prompt_id": "p9", "workflow_id": "flux"})
    assert flux["label"] == "FLUX"
    assert history.latest()["label"] == "FLUX"  # what the probe showed before, in every workflow


def test_a_workflow_without_runs_says_so():
    history = _history()
    assert run_of_workflow(history.runs(), {"prompt_id": "p9", "workflow_id": "sdxl"}) is None
    text = probe_text(REPORT, "ESTIMATE", run_of_workflow(history.runs(), {"prompt_id": "p9", "workflow_id": "sdxl"}))
    assert text.endswith(NO_RUN) and "no run of this workflow yet" in text and "Last run #" not in text


def test_same_prompt_matches_when_the_workflow_is_unknown():
    # Queued through the API: no workflow in extra_pnginfo, so only a run of the same prompt is this prompt's.
    history = _history()
    _run(history, "SD3", 3, 4096, prompt_id="api-1", workflow_id=None)
    assert run_of_workflow(history.runs(), {"prompt_id": "api-1", "workflow_id": None})["label"] == "SD3"
    assert run_of_workflow(history.runs(), {"prompt_id": "api-2", "workflow_id": None}) is None
    # a run of unknown origin belongs to no workflow
    assert run_of_workflow([{"run_id": 1, "label": "X", "prompt_id": None, "workflow_id": None}],
                           {"prompt_id": "p1", "workflow_id": "wan"}) is None


def test_the_newest_run_of_the_workflow_wins():
    history = _history()
    _run(history, "WAN22", 1, 30000, prompt_id="p4", workflow_id="wan")
    _run(history, "FLUX", 1, 9472, prompt_id="p5", workflow_id="flux")
    run = run_of_workflow(history.runs(), {"prompt_id": "p6", "workflow_id": "wan"})
    assert run["max_q_len"] == 30000
    assert format_last_run(run)[0].startswith(f"Last run #{run['run_id']} (WAN22): 1 attention calls [T1: 1]")


def test_outside_the_executor_the_newest_run():
    # Called from a script or a test, the probe has no prompt or workflow to key on.
    history = _history()
    assert run_of_workflow(history.runs(), {})["label"] == "FLUX"
    assert run_of_workflow(history.runs(), {"prompt_id": None, "workflow_id": None})["label"] == "FLUX"
    assert run_of_workflow([], {}) is None
