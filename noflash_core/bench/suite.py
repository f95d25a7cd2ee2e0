"""The benchmark loop: every (N, mode, implementation) cell, with memory and time caps."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch

from ..device import device_profile
from .config import BenchConfig
from .device import describe_machine, load_average
from .measure import finish, first_call, make_inputs, timed_call_with_cpu
from .progress import ProgressBar
from .runners import Implementation, build_implementations, torch_default_sdpa

__all__ = ["BenchResult", "CellResult", "run_bench"]

logger = logging.getLogger(__name__)

_GIB = 1024**3


@dataclass
class CellResult:
    """One cell of the result table.

    Attributes:
        impl: implementation name.
        mode: ``"fwd"`` or ``"fwd+bwd"``.
        n: sequence length.
        status: ``"ok"``, ``"skipped"`` (cap reached), ``"unsupported"`` or ``"error"``.
        median_ms: median time of the timed calls.
        times_ms: every timed call.
        peak_bytes: peak bytes allocated inside the call (inputs excluded).
        memory_method: ``"tracker"`` or ``"allocator"``.
        max_abs_err: forward only: max |out - torch default SDPA out|.
        note: why a cell was skipped or failed.
        plan: noflash cells: the plan the planner makes for the cell and who chose it, e.g.
            ``"tier 3 128×2048 (tuned)"`` (``Plan.source``: ``model`` or ``tuned``).
    """

    impl: str
    mode: str
    n: int
    status: str
    median_ms: Optional[float] = None
    times_ms: List[float] = field(default_factory=list)
    peak_bytes: Optional[int] = None
    memory_method: str = ""
    max_abs_err: Optional[float] = None
    note: str = ""
    plan: str = ""


@dataclass
class BenchResult:
    """Everything a run produced, as written to ``results.json``."""

    config: Dict[str, object]
    machine: Dict[str, object]
    impls: Dict[str, str]
    missing: Dict[str, str]
    cells: List[CellResult]
    started: str = ""
    duration_s: float = 0.0

    def cell(self, impl: str, mode: str, n: int) -> Optional[CellResult]:
        """The cell for ``(impl, mode, n)``, or None."""
        for c in self.cells:
            if c.impl == impl and c.mode == mode and c.n == n:
                return c
        return None

    def to_dict(self) -> Dict[str, object]:
        """Plain-data form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> BenchResult:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"cells"}
        cells = [CellResult(**c) for c in data["cells"]]  # type: ignore[arg-type]
        return cls(cells=cells, **{k: v for k, v in data.items() if k in names})  # type: ignore[arg-type]


def _predicted_quadratic_bytes(cfg: BenchConfig, n: int, backward: bool, dtype: torch.dtype) -> int:
    """Math SDPA's peak at this size, from a fake-tensor run (no allocation); used for every O(N²) peer."""
    from ..memory.fake_peak import AttentionShape, predict_math_peak

    shape = AttentionShape(cfg.batch, cfg.heads, n, n, cfg.head_dim)
    return predict_math_peak(shape, dtype=dtype, requires_grad=backward).peak_bytes


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Skipper:
    """Decides which cells to skip, from caps and from what happened at smaller N."""

    def __init__(self, cfg: BenchConfig, mem_cap: Optional[int], dtype: torch.dtype) -> None:
        self.cfg = cfg
        self.mem_cap = mem_cap
        self.dtype = dtype
        self.last: Dict[tuple, CellResult] = {}
        self._quadratic_bytes: Dict[tuple, int] = {}

    def reason(self, impl: Implementation, mode: str, n: int) -> Optional[str]:
        backward = mode == "fwd+bwd"
        prev = self.last.get((impl.name, mode))
        if prev is not None and prev.status in ("skipped", "error"):
            return f"skipped after N={prev.n} ({prev.status})"
        if impl.quadratic and self.mem_cap is not None:
            predicted = self.quadratic_bytes(n, backward)
            if predicted > self.mem_cap:
                cap = self.mem_cap / _GIB
                return f"math SDPA would need {predicted / _GIB:.1f} GiB > memory cap {cap:.1f} GiB"
        if prev is not None and prev.median_ms is not None:
            predicted_s = prev.median_ms / 1000 * (n / prev.n) ** 2
            if predicted_s > self.cfg.time_cap_s:
                return f"predicted {predicted_s:.0f} s per call > time cap {self.cfg.time_cap_s:.0f} s"
        return None

    def quadratic_bytes(self, n: int, backward: bool) -> int:
        key = (n, backward)
        if key not in self._quadratic_bytes:
            self._quadratic_bytes[key] = _predicted_quadratic_bytes(self.cfg, n, backward, self.dtype)
        return self._quadratic_bytes[key]

    def record(self, cell: CellResult) -> None:
        self.last[(cell.impl, cell.mode)] = cell


def _reference(inputs, impls: Dict[str, Implementation], skipper: _Skipper, n: int) -> Optional[torch.Tensor]:
    """torch's default SDPA output for the accuracy column (None when it would not fit)."""
    ref_impl = impls.get("torch")
    if ref_impl is None:
        ref_impl = Implementation(
            "torch",
            torch_default_sdpa,
            True,
            not device_profile(inputs.q.device).efficient_sdpa,
            "",
        )
    if ref_impl.quadratic and skipper.mem_cap is not None and skipper.quadratic_bytes(n, False) > skipper.mem_cap:
        return None
    with torch.no_grad():
        return ref_impl.fn(inputs.q, inputs.k, inputs.v)


def run_bench(cfg: BenchConfig, progress: bool = True) -> BenchResult:
    """Run every cell of ``cfg`` and return the results (nothing is written; see ``report``)."""
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype()
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, device, dtype, progress)
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, progress: bool) -> BenchResult:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.monotonic()
    impls, missing = build_implementations(cfg.impls, device, cfg.comfy_path)
    for name, why in missing.items():
        logger.info("%s not run: %s", name, why)
    mem_cap = cfg.mem_cap_bytes
    if mem_cap is None:
        free = device_profile(device).free_memory()
        mem_cap = free // 2 if free else None
    skipper = _Skipper(cfg, mem_cap, dtype)
    machine = describe_machine(device)
    config = cfg.to_dict()
    config["mem_cap_bytes"] = mem_cap
    from .comfy import comfy_version

    machine["comfyui"] = comfy_version()
    cells: List[CellResult] = []
    bar = ProgressBar(len(cfg.sizes) * len(cfg.modes) * len(impls), enabled=progress)
    for n in cfg.sizes:
        for mode in cfg.modes:
            row = _run_row(cfg, list(impls.values()), mode, n, skipper, device, dtype, bar)
            cells.extend(row)
            for cell in row:
                skipper.record(cell)
            _free(device)
    bar.close()
    machine["load_at_end"] = load_average()
    return BenchResult(
        config=config,
        machine=machine,
        impls={name: impl.label for name, impl in impls.items()},
        missing=missing,
        cells=cells,
        started=started,
        duration_s=round(time.monotonic() - t0, 2),
    )


def _summary(cell: CellResult) -> str:
    if cell.status != "ok":
        return f"{cell.impl} {cell.mode} N={cell.n}: {cell.status}"
    mib = (cell.peak_bytes or 0) / 2**20
    return f"{cell.impl} {cell.mode} N={cell.n}: {cell.median_ms:.1f} ms, {mib:.0f} MiB"


def _run_row(
    cfg: BenchConfig,
    impls: List[Implementation],
    mode: str,
    n: int,
    skipper: _Skipper,
    device: torch.device,
    dtype: torch.dtype,
    bar: ProgressBar,
) -> List[CellResult]:
    """All implementations at one (N, mode), timed in interleaved rounds.

    Every implementation is warmed up first (its first call measures memory); then each round times one call
    of each, so a change in machine load during the row hits every implementation alike.
    """
    backward = mode == "fwd+bwd"
    inputs = make_inputs(
        cfg.batch, cfg.heads, n, cfg.head_dim, dtype=dtype, device=device, backward=backward, seed=cfg.seed
    )
    ref = _reference(inputs, {i.name: i for i in impls}, skipper, n) if (cfg.check and not backward) else None
    cells: Dict[str, CellResult] = {}
    active: Dict[str, tuple] = {}
    for impl in impls:
        if backward and not impl.backward:
            cells[impl.name] = CellResult(impl.name, mode, n, "unsupported", note="forward only")
            continue
        why = skipper.reason(impl, mode, n)
        if why:
            cells[impl.name] = CellResult(impl.name, mode, n, "skipped", note=why)
            continue
        bar.show(f"{impl.name} {mode} N={n}: warm-up")
        try:
            m = first_call(
                impl, inputs, backward=backward, device=device, warmup=cfg.warmup, keep_output=ref is not None
            )
        except Exception as exc:  # noqa: BLE001 - a failing implementation is a result, not a crash
            cells[impl.name] = _error(impl, mode, n, exc)
            _free(device)
            continue
        err = None
        if ref is not None and m.output is not None:
            err = float((m.output.float() - ref.float()).abs().max())
        m.output = None
        active[impl.name] = (impl, m, err)
    discarded: Dict[str, int] = {}
    for round_index in range(max(1, cfg.repeats)):
        for name, (impl, m, _) in list(active.items()):
            if round_index >= cfg.min_repeats and sum(m.times_s) >= cfg.time_cap_s:
                continue
            bar.show(f"{name} {mode} N={n}: call {round_index + 1}/{cfg.repeats}")
            try:
                m.times_s.append(_timed_sample(cfg, impl, inputs, backward, device, discarded, name))
            except Exception as exc:  # noqa: BLE001
                cells[name] = _error(impl, mode, n, exc)
                del active[name]
    for name, (_, m, err) in active.items():
        finish(m)
        cells[name] = CellResult(
            name,
            mode,
            n,
            "ok",
            median_ms=round(m.median_s * 1000, 4),
            times_ms=[round(t * 1000, 4) for t in m.times_s],
            peak_bytes=m.peak_bytes,
            memory_method=m.memory_method,
            max_abs_err=err,
            note=f"{discarded[name]} call(s) re-timed: they got under {cfg.min_cpu_share:.0%} of the CPU"
            if discarded.get(name)
            else "",
            plan=_plan_text(name, inputs, backward),
        )
    ordered = [cells[i.name] for i in impls]
    for cell in ordered:
        bar.step(_summary(cell))
    return ordered


def _timed_sample(
    cfg: BenchConfig,
    impl: Implementation,
    inputs,
    backward: bool,
    device: torch.device,
    discarded: Dict[str, int],
    name: str,
) -> float:
    """One timed call. On CPU a call of 50 ms or more that got less than ``cfg.min_cpu_share`` of its threads'
    time (another process ran) is re-timed, up to ``cfg.contention_retries`` times per cell; the last try is
    kept."""
    threads = torch.get_num_threads()
    while True:
        wall, cpu = timed_call_with_cpu(impl, inputs, backward=backward, device=device)
        share = cpu / max(wall * threads, 1e-9)
        # Short calls have serial parts and say little about contention; only calls of 50 ms or more are checked.
        if (
            device.type != "cpu"
            or wall < 0.05
            or share >= cfg.min_cpu_share
            or discarded.get(name, 0) >= cfg.contention_retries
        ):
            return wall
        discarded[name] = discarded.get(name, 0) + 1
        logger.debug("%s: CPU share %.2f < %.2f, re-timing", name, share, cfg.min_cpu_share)


def _plan_text(name: str, inputs, backward: bool) -> str:
    """``"tier 3 128×2048 (tuned)"``: what the planner picks for a noflash cell and its ``Plan.source``."""
    if not name.startswith("noflash-"):
        return ""
    from ..planner import plan

    tier_text = name.split("-", 1)[1]
    tier = "auto" if tier_text == "auto" else int(tier_text.lstrip("t"))
    p = plan(inputs.q, inputs.k, inputs.v, tier=tier, requires_grad=backward)
    return f"tier {p.tier} {p.block_m}×{p.block_n} ({p.source})"


def _error(impl: Implementation, mode: str, n: int, exc: BaseException) -> CellResult:
    logger.warning("%s %s N=%d failed: %s", impl.name, mode, n, exc)
    return CellResult(impl.name, mode, n, "error", note=f"{type(exc).__name__}: {str(exc)[:200]}")
