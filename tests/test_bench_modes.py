"""The bench's ``--variants`` and ``--gpu-check`` modes: parsing, the no-GPU exit, result files (tiny CPU runs)."""

from __future__ import annotations

import json

import pytest

from noflash_core.bench import gpu_check
from noflash_core.bench.__main__ import main
from noflash_core.bench.variants import ALL_VARIANTS, VariantCell, parse_variants


def test_parse_variants():
    assert parse_variants("none, causal,pad") == ["none", "causal", "pad"]
    assert parse_variants("all") == list(ALL_VARIANTS)
    with pytest.raises(ValueError, match="choose from"):
        parse_variants("none,sliding")


def test_variant_targets():
    cell = VariantCell(2048, "pad", {"ours": [10.0, 12.0], "fused": [7.0], "math": [20.0]})
    assert cell.ratios() == {"ours/fused": 10 / 7, "math/ours": 2.0}
    assert cell.meets_targets()
    assert not VariantCell(2048, "pad", {"ours": [10.0], "fused": [5.0], "math": [20.0]}).meets_targets()


def test_variants_cli_writes_one_row_per_size_and_variant(tmp_path, capsys):
    out = tmp_path / "variants"
    code = main(["--variants", "all", "--sizes", "64,96", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert [(c["n"], c["variant"]) for c in data["cells"]] == [(n, v) for n in (64, 96) for v in ALL_VARIANTS]
    for c in data["cells"]:
        assert set(c["times_ms"]) == {"ours", "fused", "math"} and c["max_abs_err"] < 1e-5
        assert c["tier"] is not None  # which plan noflash ran is recorded
    md = (out / "results.md").read_text()
    assert md.count("| 96 |") == 4 and "ours / fused" in md and "--variants all" in md
    assert md.strip() in capsys.readouterr().out


def test_variants_cli_rejects_unknown_variant(tmp_path):
    with pytest.raises(SystemExit, match="--variants"):
        main(["--variants", "sliding", "--out", str(tmp_path)])


def test_gpu_check_without_gpu_says_so_and_exits_2(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(gpu_check, "find_accelerator", lambda: None)
    with caplog.at_level("ERROR"):
        code = main(["--gpu-check", "--out", str(tmp_path / "none")])
    assert code == gpu_check.EXIT_NO_GPU == 2
    assert "no GPU found" in caplog.text
    assert not (tmp_path / "none").exists()


def test_gpu_check_on_cpu_writes_report(tmp_path):
    out = tmp_path / "check"
    code = main(["--gpu-check", "--device", "cpu", "--no-tests", "--sizes", "64", "--dtype", "fp16",
                 "--repeats", "1", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["tests"]["status"] == "not run"
    assert {c["impl"] for c in data["cells"]} == set(gpu_check.GPU_IMPLS)
    tiers = [c for c in data["cells"] if c["impl"].startswith("noflash") and c["status"] == "ok"]
    assert len(tiers) == 4 and all(c["predicted_over_measured"] > 0 for c in tiers)
    md = (out / "gpu_check.md").read_text()
    assert "Planner prediction vs measured peak" in md and "noflash-t2" in md


def test_device_tests_get_the_device_in_the_environment(monkeypatch, tmp_path):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_conformance.py").write_text(
        "import os\n\ndef test_device():\n    assert os.environ['NOFLASH_TEST_DEVICE'] == 'cpu'\n"
    )
    monkeypatch.setattr(gpu_check, "_repo_root", lambda: tmp_path)
    result = gpu_check.run_device_tests("cpu", 120, str(tmp_path / "log.txt"))
    assert result["status"] == "passed" and result["counts"].get("passed") == 1
    assert "NOFLASH_TEST_DEVICE=cpu" in result["command"]
    assert "1 passed" in (tmp_path / "log.txt").read_text()


def test_device_slug_and_verdict():
    assert gpu_check.device_slug({"device": "cuda", "gpu": "AMD Radeon VII", "gpu_arch": "gfx906:sramecc+:xnack-"}) \
        == "amd-radeon-vii-gfx906"
    assert gpu_check.device_slug({"device": "cuda", "gpu": "NVIDIA H200"}) == "nvidia-h200"
    ok = {"tests": {"status": "passed"}, "cells": [{"impl": "noflash-t1", "status": "ok"}]}
    assert gpu_check.check_passed(ok)
    assert not gpu_check.check_passed({**ok, "tests": {"status": "failed"}})
    assert not gpu_check.check_passed({**ok, "cells": [{"impl": "noflash-t2", "status": "error"}]})
