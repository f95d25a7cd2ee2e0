"""Exact sequence-parallel attention on ``torch.distributed``, with noflash's O(N)-memory tiles on each rank.

Two ways to split one long sequence across ``P`` processes (GPUs), with one shard contract: rank ``r`` passes the
contiguous tokens ``[r*N/P, (r+1)*N/P)`` of query, key and value on dim -2 and gets back the same tokens of the
output of full-sequence attention; forward and backward are exact.

* :func:`ring_attention`: Ring Attention (Liu, Zaharia & Abbeel 2023, arXiv:2310.01889). K/V blocks travel the
  ring with ``isend``/``irecv`` while the current block is attended; partial results merge through their
  log-sum-exp (``lse = logaddexp(lse_a, lse_b)``, ``out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b``, the
  online-softmax merge of FlashAttention, Dao et al. 2022). Works for any head count; per-rank memory O(N/P).
* :func:`ulysses_attention`: DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509). ``all_to_all`` from sequence
  shards to head shards, local noflash attention, and back. Head counts must divide by ``P``.

Both work on any backend (NCCL/RCCL on Linux GPUs; gloo on CPU, and on Windows, which has no NCCL) and check
every rank's arguments with one small ``all_gather`` first, so bad input raises the same error on every rank
instead of hanging. Importing this package does not touch ``torch.distributed``.
"""

from .ring import merge_partials, ring_attention
from .ulysses import ulysses_attention

__all__ = ["merge_partials", "ring_attention", "ulysses_attention"]
