"""Status identity and the non-attention monitors (noflash_core.comfy.telemetry / op_telemetry), without ComfyUI:
every status names its kind, the nodes that produced it and the prompt/workflow it ran in; the FFN monitor counts
chunks and the intermediate bytes chunking saved; the encode monitor gives one status per encode/decode and adds up
the calls of one executing node (a tiled decode's tiles)."""

from __future__ import annotations

import json

import pytest
import torch

from noflash_core.comfy.op_telemetry import EncodeMonitor, FFNMonitor, ffn_intermediate_bytes
from noflash_core.comfy.telemetry import RunHistory, RunMonitor, read_origin
from noflash_core.telemetry import CallRecord


def _call(tier=2, q_len=4096, path="noflash"):
    return CallRecord(path, tier, 128, 256, 1, 8, q_len, q_len, 64, "float16", "cpu", "test")


class _Origin:
    """A context callable whose answer the test changes (the executing prompt and node)."""

    def __init__(self, **origin):
        self.origin = origin

    def __call__(self):
        return dict(self.origin)


def test_status_names_its_producers_and_origin():
    origin = _Origin(prompt_id="p-1", workflow_id="wf-a", exec_node_id=8)
    mon = RunMonitor("SD3", node_id=4, node_ids=[4, 3], history=RunHistory(), context=origin)
    mon.start()
    origin.origin = {"prompt_id": "p-2"}  # read at the start of the run, not later
    mon.record(_call())
    final = mon.finish()
    assert final["kind"] == "attention" and final["node_id"] == "4" and final["node_ids"] == ["4", "3"]
    assert (final["prompt_id"], final["workflow_id"], final["exec_node_id"]) == ("p-1", "wf-a", "8")
    json.dumps(final)


def test_origin_is_empty_without_context_or_when_it_fails():
    def broken():
        raise RuntimeError("no server")

    assert read_origin(None) == {"prompt_id": None, "workflow_id": None, "exec_node_id": None}
    assert read_origin(broken) == read_origin(None)
    status = RunMonitor("x", history=RunHistory()).status()
    assert status["node_ids"] == [] and status["node_id"] is None and status["prompt_id"] is None


def test_plan_source_is_kept_per_tier_when_records_carry_it():
    class Tuned:
        def __init__(self, call, source):
            self.__dict__.update(call.__dict__)
            self.plan_source = source

    mon = RunMonitor("x", history=RunHistory())
    mon.record(Tuned(_call(tier=2), "tuned"))
    mon.record(_call(tier=1))
    assert mon.finish()["plan_source"] == {"2": "tuned"}
    plain = RunMonitor("y", history=RunHistory())
    plain.record(_call())
    assert "plan_source" not in plain.finish()


def test_ffn_monitor_counts_chunks_and_saved_intermediate():
    x = torch.zeros(2, 1000, 64, dtype=torch.float16)  # 2 rows of 1000 tokens
    full = ffn_intermediate_bytes(x, 512, 1000)
    assert full == 2 * 512 * 2 * 1000
    published = []
    history = RunHistory()
    mon = FFNMonitor("WAN", publish=published.append, node_id=5, history=history, modules=30, num_chunks=4)
    mon.start(torch.device("cpu"))
    mon.record("cpu", 1000, 250, full, ffn_intermediate_bytes(x, 512, 250))
    mon.record("cpu", 77, None, ffn_intermediate_bytes(x[:, :77], 512, 77), 0)  # a short call, unchunked
    final = mon.finish()
    assert final["kind"] == "ffn" and final["node_ids"] == ["5"] and final["modules"] == 30
    assert (final["calls"], final["chunked_calls"], final["chunks"], final["max_tokens"]) == (2, 1, 4, 1000)
    assert final["saved_bytes"] == full * 3 // 4 and final["intermediate_bytes"] == full
    assert published[-1] is final and history.latest() is None and history.latest(kind="ffn") == final


def test_encode_monitor_one_status_per_encode_and_one_per_node_execution():
    origin = _Origin(prompt_id="p-1", exec_node_id="12")
    history = RunHistory()
    mon = EncodeMonitor("WanVAE", node_id=7, history=history, context=origin, kind="vae")
    # A tiled decode: decode_tiled brackets, calls the (bracketed) decode per tile; all one operation.
    mon.begin("decode")
    for _ in range(3):
        mon.begin("decode")
        mon.record(_call(tier=1, q_len=1024))
        mon.end()
    first = mon.end()
    assert first["kind"] == "vae" and first["op"] == "decode" and first["calls"] == 3 and first["state"] == "done"
    # The same node of the same prompt decodes again (a second batch): the calls add up, same run.
    mon.begin("decode")
    mon.record(_call(tier=1, q_len=2048))
    again = mon.end()
    assert again["run_id"] == first["run_id"] and again["calls"] == 4 and again["max_q_len"] == 2048
    # Another prompt: a new status, counted from zero; the history keeps one entry per run.
    origin.origin = {"prompt_id": "p-2", "exec_node_id": "12"}
    mon.begin("decode")
    mon.record(_call(tier=2, q_len=64))
    new = mon.end()
    assert new["run_id"] != first["run_id"] and new["calls"] == 1 and new["prompt_id"] == "p-2"
    assert [r["run_id"] for r in history.runs()] == [first["run_id"], new["run_id"]]
    assert history.runs()[0]["calls"] == 4
    assert history.latest() is None  # the probe's "last run" is the last attention run only


def test_encode_monitor_ends_after_an_error_and_checks_its_kind():
    mon = EncodeMonitor("CLIP", history=RunHistory(), kind="clip")
    with pytest.raises(RuntimeError):
        mon.begin("encode")
        try:
            raise RuntimeError("OOM")
        finally:
            mon.end()
    assert mon.status()["state"] == "idle" and mon.status()["op"] == "encode"
    with pytest.raises(ValueError, match="kind"):
        EncodeMonitor("x", kind="attention")
