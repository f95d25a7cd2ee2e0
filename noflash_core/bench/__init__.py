"""Side-by-side attention benchmark: ``python -m noflash_core.bench``.

Times forward and forward+backward (median after warm-up) and measures peak memory of torch's math SDPA,
torch's default SDPA, noflash tiers 1, 2, 3 and auto, and ComfyUI's sub-quadratic and split attention when
ComfyUI imports. Writes ``results.md``, ``results.json`` and PNG plots (when matplotlib is installed) to
``--out``.

Modules: ``config`` (settings and CLI parsing), ``runners`` (one callable per implementation), ``comfy``
(ComfyUI's implementations), ``device`` (synchronisation and memory counters), ``measure`` (timing and peak
memory of one cell), ``suite`` (the loop over cells, with skipping), ``progress`` (stderr bar), ``report``
(markdown/JSON) and ``plots`` (PNG).
"""

from .config import BenchConfig
from .suite import BenchResult, CellResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "CellResult", "run_bench"]
