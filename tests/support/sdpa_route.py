"""Route torch's SDPA through noflash inside a ``with`` block and count the calls by tier (for library tests).

Modes:

* ``"auto"``: the real global patch, ``noflash_core.patched(threshold=0)``, with ``NOFLASH_BUDGET_MB`` set to a
  small budget so that small test problems are not "trivially small" for the planner and take the tiled path.
  Decode-sized queries (L <= 16) whose math peak fits the budget still go to torch's SDPA (tier 0).
* ``1``, ``2`` or ``3``: the public ``noflash_core.scaled_dot_product_attention(tier=..., block_m=, block_n=)``
  installed in place of ``torch.nn.functional.scaled_dot_product_attention``, so that every call runs that tier
  with several blocks.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Iterator, List, Optional, Union

import torch

import noflash_core

from .tiers import TierLog

__all__ = ["AUTO_BUDGET_MB", "MODES", "RouteThrough", "assert_close_to_float64"]

AUTO_BUDGET_MB = "0.03"
"""About 31 KB: below the math-SDPA peak of the test models' prefills, above that of a decode step."""

MODES = ("auto", 1, 2, 3)

_EPS32 = torch.finfo(torch.float32).eps


class RouteThrough:
    """Context manager: torch's SDPA goes through noflash in ``mode``; ``records`` collects the telemetry records."""

    def __init__(self, mode: Union[str, int], block: int = 16) -> None:
        self.mode = mode
        self.block = block
        self._log = TierLog()
        self.records: List[Any] = self._log.records
        self._saved_env: Optional[str] = None

    def __enter__(self) -> RouteThrough:
        self._log.__enter__()
        if self.mode == "auto":
            self._saved_env = os.environ.get("NOFLASH_BUDGET_MB")
            os.environ["NOFLASH_BUDGET_MB"] = AUTO_BUDGET_MB
            self._ctx = noflash_core.patched(threshold=0)
            self._ctx.__enter__()
            assert noflash_core.is_enabled()
        else:
            self._saved_sdpa = torch.nn.functional.scaled_dot_product_attention
            torch.nn.functional.scaled_dot_product_attention = functools.partial(
                noflash_core.scaled_dot_product_attention, tier=self.mode, block_m=self.block, block_n=self.block
            )
        return self

    def __exit__(self, *exc) -> None:
        self._log.__exit__(*exc)
        if self.mode == "auto":
            self._ctx.__exit__(*exc)
            if self._saved_env is None:
                os.environ.pop("NOFLASH_BUDGET_MB", None)
            else:
                os.environ["NOFLASH_BUDGET_MB"] = self._saved_env
        else:
            torch.nn.functional.scaled_dot_product_attention = self._saved_sdpa

    def by_tier(self) -> Dict[int, int]:
        """Number of calls per tier (0 = torch's own SDPA)."""
        return self._log.by_tier()

    def tiled(self) -> List[Any]:
        """The records of calls that ran a noflash tier."""
        return [r for r in self.records if r.tier != 0]


def assert_close_to_float64(name: str, ours: torch.Tensor, torch32: torch.Tensor, ref64: torch.Tensor) -> None:
    """noflash's fp32 error against float64 may be at most 4x torch's own fp32 error, plus 8 ulps of the scale."""
    ref = ref64.float()
    torch_err = (torch32 - ref).abs().max().item()
    ours_err = (ours - ref).abs().max().item()
    tol = 4 * torch_err + 8 * _EPS32 * ref.abs().max().item()
    assert ours_err <= tol, f"{name}: noflash fp32 error {ours_err:.3g} > {tol:.3g} (torch's {torch_err:.3g})"


def isolate_hub(monkeypatch) -> Iterator[None]:
    """Fixture body: no Hugging Face downloads, default noflash settings, and the global patch off (restored after)."""
    import pytest

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.delenv("NOFLASH_THRESHOLD", raising=False)
    monkeypatch.delenv("NOFLASH_BUDGET_MB", raising=False)
    was_enabled = noflash_core.is_enabled()
    noflash_core.disable()
    yield
    if was_enabled:
        noflash_core.enable()
