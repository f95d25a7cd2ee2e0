"""PNG plots of a benchmark run: time vs N, memory vs N (log-log) and speed-up over math SDPA.

matplotlib is optional (the ``bench`` extra); without it :func:`write_plots` returns no files and says why.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

from .suite import BenchResult

__all__ = ["matplotlib_available", "write_plots"]

logger = logging.getLogger(__name__)

_MODE_TITLES = {"fwd": "forward", "fwd+bwd": "forward + backward"}
# Peers in greys/blues, ours in warm colours, so "which line is us" needs no legend lookup.
_STYLE: Dict[str, Tuple[str, str]] = {
    "math": ("#555555", "o"),
    "torch": ("#1f77b4", "s"),
    "noflash-t1": ("#ff9f40", "v"),
    "noflash-t2": ("#e4572e", "^"),
    "noflash-t3": ("#a23b72", "D"),
    "noflash-auto": ("#c00000", "*"),
    "comfy-subquad": ("#2ca02c", "x"),
    "comfy-split": ("#17becf", "+"),
}


def matplotlib_available() -> bool:
    """Whether matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _series(result: BenchResult, impl: str, mode: str, what: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for n in result.config["sizes"]:
        c = result.cell(impl, mode, n)
        if c is None or c.status != "ok":
            continue
        if what == "time":
            value: Optional[float] = c.median_ms
        elif what == "memory":
            value = (c.peak_bytes or 0) / 2**20
        else:
            base = result.cell("math", mode, n)
            value = base.median_ms / c.median_ms if base and base.status == "ok" and c.median_ms else None
        if value:
            xs.append(n)
            ys.append(value)
    return xs, ys


def _title(result: BenchResult) -> str:
    cfg, m = result.config, result.machine
    where = m.get("gpu") or f"{m.get('cpu')}, {cfg.get('threads') or m.get('torch_threads')} threads"
    return f"B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']} {cfg['dtype']} — {where}"


def _plot(result: BenchResult, what: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - used through the matplotlib namespace

    modes = list(result.config["modes"])
    fig, axes = plt.subplots(1, len(modes), figsize=(6.4 * len(modes), 4.8), squeeze=False)
    ylabel = {
        "time": "median time (ms)",
        "memory": "peak memory (MiB)",
        "speedup": "speed-up over math SDPA (×)",
    }
    for ax, mode in zip(axes[0], modes):
        for impl in result.impls:
            if what == "speedup" and impl == "math":
                continue
            xs, ys = _series(result, impl, mode, what)
            if not xs:
                continue
            color, marker = _STYLE.get(impl, ("#000000", "."))
            lw = 2.4 if impl == "noflash-auto" else 1.4
            ax.plot(xs, ys, marker=marker, color=color, linewidth=lw, label=impl)
        ax.set_xscale("log", base=2)
        sizes = list(result.config["sizes"])
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if what == "speedup":
            ax.axhline(1.0, color="#888888", linestyle="--", linewidth=1)
        else:
            ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel[what])
        ax.set_title(_MODE_TITLES.get(mode, mode))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(result: BenchResult, out_dir: str) -> List[str]:
    """Write ``time.png``, ``memory.png`` and ``speedup.png`` to ``out_dir``; returns the paths written."""
    if not matplotlib_available():
        logger.warning("matplotlib is not installed: no plots (pip install 'noflash-comfyui[bench]')")
        return []
    paths = []
    for what in ("time", "memory", "speedup"):
        if what == "speedup" and "math" not in result.impls:
            continue
        paths.append(_plot(result, what, os.path.join(out_dir, f"{what}.png")))
    return paths
