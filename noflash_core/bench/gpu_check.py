"""One-command GPU check: ``python -m noflash_core.bench --gpu-check``.

On the first accelerator torch finds (CUDA/ROCm, XPU, MPS), within about 8 minutes:

1. runs the device test suite: ``pytest`` on the conformance, gradient, memory and compile tests with
   ``NOFLASH_TEST_DEVICE=<cuda|xpu|mps>`` (at most ``--tests-timeout`` seconds);
2. benchmarks the forward pass in fp16 and bf16 at N = 4k to 64k (B=1, H=16, D=64 unless given): torch's math SDPA,
   noflash tiers 1, 2, 3 and auto, and torch's fused kernels forced on (flash / memory-efficient / cuDNN: the
   upper bound on that GPU, "unsupported" where it has none). Cells predicted over the memory or time caps are
   skipped, and nothing new starts once the time budget is spent;
3. compares the planner's predicted peak of every noflash cell with the measured one (``max_memory_allocated``
   on CUDA/ROCm and XPU, the live-bytes tracker on MPS);
4. writes ``gpu_check.md``, ``gpu_check.json`` and ``device_tests.log`` to ``bench/results/<device>/`` (or ``--out``).

Without an accelerator it runs nothing: it says that no GPU was found and exits with status 2. ``--device cpu``
runs the same steps on the CPU (small sizes by default, ``--no-tests`` to skip the suite), which exercises the
check itself. Exit status 1 means device tests failed or a noflash cell errored.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..device import device_profile
from .device import describe_machine
from .measure import Inputs, first_call, timed_call
from .report import markdown_header
from .runners import Implementation, math_sdpa

__all__ = [
    "DEVICE_TESTS",
    "GPU_IMPLS",
    "GPU_SIZES",
    "GpuCheckConfig",
    "find_accelerator",
    "device_slug",
    "render_gpu_check_markdown",
    "run_gpu_check",
    "write_gpu_check",
]

logger = logging.getLogger(__name__)

DEVICE_TESTS: Tuple[str, ...] = (
    "tests/test_conformance.py",
    "tests/test_backward.py",
    "tests/test_memory.py",
    "tests/test_compile.py",
)
GPU_SIZES: Tuple[int, ...] = (4096, 8192, 16384, 32768, 65536)
CPU_SIZES: Tuple[int, ...] = (256, 512)
GPU_IMPLS: Tuple[str, ...] = ("math", "noflash-t1", "noflash-t2", "noflash-t3", "noflash-auto", "torch-fused")
EXIT_NO_GPU = 2
_MIB = 1024 * 1024


@dataclass
class GpuCheckConfig:
    """What ``--gpu-check`` runs.

    Attributes:
        device: the accelerator (``"cuda"``, ``"xpu"``, ``"mps"``; ``"cpu"`` for a plumbing run).
        sizes: N for the benchmark.
        dtypes: input dtypes.
        batch, heads, head_dim: ``(B, H, N, D)``.
        repeats: timed calls per cell (the median is reported).
        run_tests: run the device test suite first.
        tests_timeout_s: wall-clock limit of the suite.
        time_budget_s: the whole check (tests and benchmark); no cell starts after it.
        cell_cap_s: skip a cell predicted (from the previous N, O(N²)) to take longer than this per call.
        seed: input RNG seed.
    """

    device: str
    sizes: List[int] = field(default_factory=lambda: list(GPU_SIZES))
    dtypes: List[torch.dtype] = field(default_factory=lambda: [torch.float16, torch.bfloat16])
    batch: int = 1
    heads: int = 16
    head_dim: int = 64
    repeats: int = 3
    run_tests: bool = True
    tests_timeout_s: float = 240.0
    time_budget_s: float = 480.0
    cell_cap_s: float = 10.0
    seed: int = 0

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["dtypes"] = [str(t).replace("torch.", "") for t in self.dtypes]
        return d


def find_accelerator() -> Optional[torch.device]:
    """The first accelerator torch can use (CUDA/ROCm, XPU, MPS), or None."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return None


def device_slug(machine: Dict[str, object]) -> str:
    """A folder name for a device: ``"nvidia-h200"``, ``"amd-radeon-vii-gfx906"``, ``"cpu-<model>"``."""
    if machine.get("device", "cpu").startswith("cpu"):
        name = f"cpu-{machine.get('cpu', '')}"
    else:
        name = str(machine.get("gpu") or machine.get("device"))
        arch = str(machine.get("gpu_arch") or "").split(":")[0]
        if arch and arch.lower() not in name.lower():
            name = f"{name}-{arch}"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60] or "device"


# ---------------------------------------------------------------------------------------------- device tests


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def run_device_tests(device: str, timeout_s: float, log_path: Optional[str] = None) -> Dict[str, object]:
    """``pytest`` on :data:`DEVICE_TESTS` with ``NOFLASH_TEST_DEVICE=device``; the summary as a dict."""
    root = _repo_root()
    files = [f for f in DEVICE_TESTS if (root / f).exists()]
    if not files:
        return {"status": "skipped", "note": f"no tests/ next to the package ({root}): an installed copy"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    env = {**os.environ, "NOFLASH_TEST_DEVICE": device}
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code = None
    if log_path:
        with open(log_path, "w") as f:
            f.write(output)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", output)}
    status = "timeout" if code is None else ("passed" if code == 0 else "failed")
    return {
        "status": status,
        "returncode": code,
        "counts": counts,
        "seconds": round(time.monotonic() - start, 1),
        "command": f"NOFLASH_TEST_DEVICE={device} " + " ".join(cmd[1:]),
        "summary": output.strip().splitlines()[-1] if output.strip() else "",
    }


# ---------------------------------------------------------------------------------------------- benchmark


def _fused_forced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..sdpa import original_sdpa

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.append(SDPBackend.CUDNN_ATTENTION)
    with sdpa_kernel(backends):
        return original_sdpa(q, k, v)


def _implementation(name: str) -> Implementation:
    from ..sdpa import scaled_dot_product_attention

    if name == "math":
        return Implementation(name, math_sdpa, True, True, "torch SDPA, math backend")
    if name == "torch-fused":
        return Implementation(name, _fused_forced, True, False, "torch SDPA, fused kernels forced on")
    tier = "auto" if name.endswith("auto") else int(name[-1])

    def fn(q, k, v):
        return scaled_dot_product_attention(q, k, v, tier=tier)

    return Implementation(name, fn, tier != 3, False, f"noflash {'auto plan' if tier == 'auto' else f'tier {tier}'}")


def _predicted_peak(name: str, q: torch.Tensor) -> Optional[Tuple[int, int, int, int, str]]:
    """``(predicted bytes, tier, block_m, block_n, plan source)`` of a noflash cell from the planner."""
    if not name.startswith("noflash"):
        return None
    from ..planner import plan

    tier = "auto" if name.endswith("auto") else int(name[-1])
    p = plan(q, q, q, tier=tier, requires_grad=False)
    return p.peak_bytes, p.tier, p.block_m, p.block_n, p.source


def _math_bytes(cfg: GpuCheckConfig, n: int, dtype: torch.dtype) -> int:
    return cfg.batch * cfg.heads * n * n * (4 + dtype.itemsize)


def _cell(cfg: GpuCheckConfig, name: str, dtype: torch.dtype, n: int, status: str, **kw) -> Dict[str, object]:
    return {"impl": name, "dtype": str(dtype).replace("torch.", ""), "n": n, "status": status, **kw}


def run_benchmark(cfg: GpuCheckConfig, deadline: float) -> List[Dict[str, object]]:
    """Every (dtype, N, implementation) cell, forward, with caps and the time budget."""
    device = torch.device(cfg.device)
    cells: List[Dict[str, object]] = []
    free = device_profile(device).free_memory()
    for dtype in cfg.dtypes:
        last_ms: Dict[str, Tuple[int, float]] = {}
        for n in cfg.sizes:
            gen = torch.Generator().manual_seed(cfg.seed + n)
            shape = (cfg.batch, cfg.heads, n, cfg.head_dim)
            q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
            inputs = Inputs(q, k, v, None)
            for name in GPU_IMPLS:
                impl = _implementation(name)
                why = None
                if time.monotonic() > deadline:
                    why = "time budget spent"
                elif name in last_ms and last_ms[name][1] / 1000 * (n / last_ms[name][0]) ** 2 > cfg.cell_cap_s:
                    why = f"predicted over {cfg.cell_cap_s:.0f} s per call"
                elif impl.quadratic and free is not None and _math_bytes(cfg, n, dtype) > 0.8 * free:
                    why = f"math needs about {_math_bytes(cfg, n, dtype) / 2**30:.1f} GiB"
                if why:
                    cells.append(_cell(cfg, name, dtype, n, "skipped", note=why))
                    continue
                cells.append(_measure(cfg, impl, inputs, dtype, n, device))
                if cells[-1]["status"] == "ok":
                    last_ms[name] = (n, cells[-1]["median_ms"])
            del q, k, v, inputs
    return cells


def _measure(cfg, impl: Implementation, inputs: Inputs, dtype, n: int, device) -> Dict[str, object]:
    predicted = _predicted_peak(impl.name, inputs.q)
    try:
        m = first_call(impl, inputs, backward=False, device=device)
        times = [timed_call(impl, inputs, backward=False, device=device) * 1000 for _ in range(max(1, cfg.repeats))]
    except torch.OutOfMemoryError as exc:
        return _cell(cfg, impl.name, dtype, n, "oom", note=str(exc)[:160])
    except (RuntimeError, NotImplementedError) as exc:
        status = "unsupported" if impl.name == "torch-fused" else "error"
        return _cell(cfg, impl.name, dtype, n, status, note=f"{type(exc).__name__}: {str(exc)[:160]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    times.sort()
    out = _cell(cfg, impl.name, dtype, n, "ok", median_ms=round(times[len(times) // 2], 3),
                times_ms=[round(t, 3) for t in times], peak_bytes=m.peak_bytes, memory_method=m.memory_method)
    if predicted is not None:
        out.update(predicted_bytes=predicted[0], tier=predicted[1], blocks=[predicted[2], predicted[3]],
                   plan_source=predicted[4],
                   predicted_over_measured=round(predicted[0] / max(1, m.peak_bytes), 3))
    return out


# ---------------------------------------------------------------------------------------------- driver and report


def run_gpu_check(cfg: GpuCheckConfig, out_dir: str) -> Dict[str, object]:
    """Run the check (tests, benchmark) and return its result; ``out_dir`` receives the test log."""
    start = time.monotonic()
    deadline = start + cfg.time_budget_s
    device = torch.device(cfg.device)
    machine = describe_machine(device)
    os.makedirs(out_dir, exist_ok=True)
    tests: Dict[str, object] = {"status": "not run"}
    if cfg.run_tests:
        budget = max(30.0, min(cfg.tests_timeout_s, cfg.time_budget_s / 2))
        logger.info("device tests on %s (at most %.0f s) ...", device.type, budget)
        tests = run_device_tests(device.type, budget, os.path.join(out_dir, "device_tests.log"))
        logger.info("device tests: %s %s", tests["status"], tests.get("summary", ""))
    logger.info("benchmark: %s, N=%s ...", [str(d).replace("torch.", "") for d in cfg.dtypes], cfg.sizes)
    cells = run_benchmark(cfg, deadline)
    return {
        "config": cfg.to_dict(),
        "machine": machine,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - (time.monotonic() - start))),
        "duration_s": round(time.monotonic() - start, 1),
        "tests": tests,
        "cells": cells,
        "tuned": _tuned_entries(device),
    }


def _tuned_entries(device: torch.device) -> Dict[str, object]:
    """This device's entries in the tuning cache (``python -m noflash_core.tune``), in the export format."""
    from ..tune.share import device_entries

    return device_entries(device)


def _tuned_lines(result: Dict[str, object]) -> List[str]:
    entries = (result.get("tuned") or {}).get("entries") or {}  # type: ignore[union-attr]
    lines = ["", "## Tuned plans on this device", "",
             f"{len(entries)} entries in the tuning cache (`python -m noflash_core.tune`; the JSON holds them in "
             "full, in the `--export` format)."]
    if entries:
        lines += ["", "| signature | fastest plan | median | model's plan | median | mode |",
                  "|---|---|---|---|---|---|"]
    for key, e in sorted(entries.items()):
        best, model = (e.get("plans") or [{}])[0], e.get("model") or {}
        lines.append(f"| {key} | tier {best.get('tier')} {best.get('block_m')}×{best.get('block_n')} h"
                     f"{best.get('block_h')} | {best.get('median_ms')} ms | tier {model.get('tier')} "
                     f"{model.get('block_m')}×{model.get('block_n')} h{model.get('block_h')} | "
                     f"{model.get('median_ms')} ms | {e.get('mode')} |")
    return lines


def check_passed(result: Dict[str, object]) -> bool:
    """True when the device tests passed (or were not run) and no noflash cell errored."""
    tests_ok = result["tests"].get("status") in ("passed", "not run", "skipped")  # type: ignore[union-attr]
    cells_ok = all(c["status"] != "error" for c in result["cells"] if str(c["impl"]).startswith("noflash"))
    return bool(tests_ok and cells_ok)


def _fmt_ms(cell: Optional[Dict[str, object]]) -> str:
    if cell is None:
        return ""
    if cell["status"] != "ok":
        return str(cell["status"])
    return f"{cell['median_ms']:.2f} ms / {cell['peak_bytes'] / _MIB:.0f} MiB"


def render_gpu_check_markdown(result: Dict[str, object], command: str = "") -> str:
    """The check's report as markdown."""
    m, cfg, tests = result["machine"], result["config"], result["tests"]
    cells: List[Dict[str, object]] = result["cells"]  # type: ignore[assignment]
    about = (
        f"{m.get('gpu_arch') or ''} torch {m.get('torch')} (HIP {m.get('hip')}, CUDA {m.get('cuda')}), "
        f"B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, forward, median of {cfg['repeats']} calls; "
        f"{result['duration_s']} s in all."
    )
    lines = markdown_header(f"GPU check: {m.get('gpu') or m.get('device')}", [about], command)
    lines += ["## Device tests", "", f"- status: **{tests.get('status')}** {tests.get('summary', '')}"]
    if tests.get("command"):
        lines.append(f"- command: `{tests['command']}` ({tests.get('seconds')} s; log in `device_tests.log`)")
    lines += ["", "## Time / peak memory", ""]
    for dtype in cfg["dtypes"]:
        rows = [c for c in cells if c["dtype"] == dtype]
        sizes = sorted({int(c["n"]) for c in rows})
        lines += [f"### {dtype}", "", "| impl | " + " | ".join(f"N={n}" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for name in GPU_IMPLS:
            by_n = {int(c["n"]): c for c in rows if c["impl"] == name}
            lines.append(f"| {name} | " + " | ".join(_fmt_ms(by_n.get(n)) for n in sizes) + " |")
        lines.append("")
    lines += ["## Planner prediction vs measured peak", "",
              "| dtype | N | impl | plan | predicted | measured | predicted / measured |",
              "|---|---|---|---|---|---|---|"]
    for c in cells:
        if c["status"] == "ok" and "predicted_bytes" in c:
            lines.append(
                f"| {c['dtype']} | {c['n']} | {c['impl']} | tier {c['tier']} {tuple(c['blocks'])} "
                f"({c.get('plan_source', 'model')}) | "
                f"{c['predicted_bytes'] / _MIB:.0f} MiB | {c['peak_bytes'] / _MIB:.0f} MiB ({c['memory_method']}) | "
                f"{c['predicted_over_measured']:.2f} |"
            )
    lines += _tuned_lines(result)
    skipped = [c for c in cells if c["status"] != "ok"]
    if skipped:
        lines += ["", "## Not run or failed", ""]
        lines += [f"- {c['dtype']} N={c['n']} {c['impl']}: {c['status']} ({c.get('note', '')})" for c in skipped]
    lines.append("")
    return "\n".join(lines)


def write_gpu_check(result: Dict[str, object], out_dir: str, command: str = "") -> List[str]:
    """Write ``gpu_check.md`` and ``gpu_check.json`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, "gpu_check.md"), os.path.join(out_dir, "gpu_check.json")
    with open(md, "w") as f:
        f.write(render_gpu_check_markdown(result, command))
    with open(js, "w") as f:
        json.dump({**result, "command": command}, f, indent=1)
    return [md, js]


def gpu_check_main(args, sizes: Optional[Sequence[int]], command: str, default_out: str) -> int:
    """The ``--gpu-check`` entry point of the bench CLI; returns the exit status."""
    device = torch.device(args.device) if args.device else find_accelerator()
    if device is None:
        logger.error(
            "noflash --gpu-check: no GPU found (torch sees no CUDA/ROCm, XPU or MPS device; torch %s). Nothing was "
            "run. Run it on a machine with a GPU, or add --device cpu to exercise the check on the CPU.",
            torch.__version__,
        )
        return EXIT_NO_GPU
    cpu = device.type == "cpu"
    cfg = GpuCheckConfig(
        device=str(device),
        sizes=list(sizes or (CPU_SIZES if cpu else GPU_SIZES)),
        dtypes=[args.dtype] if args.dtype else [torch.float16, torch.bfloat16],
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.repeats or 3,
        run_tests=not args.no_tests,
        time_budget_s=args.time_budget,
        seed=args.seed,
    )
    out_dir = args.out if args.out != default_out else os.path.join("bench", "results",
                                                                    device_slug(describe_machine(device)))
    result = run_gpu_check(cfg, out_dir)
    paths = write_gpu_check(result, out_dir, command)
    sys.stdout.write(render_gpu_check_markdown(result, command) + "\n")
    logger.info("wrote %s", ", ".join(paths))
    return 0 if check_passed(result) else 1
