"""Peak memory of a chunked Wan-size FFN, measured with the live-bytes tracker.

"Intermediate" = peak live bytes allocated inside the forward (the input and weights exist before the tracker
starts) minus the output's bytes. For the unchunked run that understates its intermediates (its output is not
yet alive at its peak), so the ratio is conservative.

The unchunked run is measured on fake tensors: the tracker counts exactly the bytes real storages would have
(checked here for the chunked run, which runs for real), and a real unchunked run would cost 1.2 GB and
another ~10 s of CPU. This is the only large test (about 460 MB live).
"""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from noflash_core.ffn.chunk import ChunkedForward, chunked_forward
from noflash_core.memory.tracker import LiveBytesTracker

DIM, HIDDEN, TOKENS, CHUNKS = 1536, 8960, 16384, 8


def _wan_ffn() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(approximate="tanh"), nn.Linear(HIDDEN, DIM))


def _intermediate_peak(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    with torch.no_grad(), LiveBytesTracker() as tracker:
        out = module(x)
    assert out.shape == x.shape
    return tracker.peak_bytes - out.nbytes, out


def test_wan_ffn_chunked_peak_is_at_most_a_sixth() -> None:
    with FakeTensorMode():
        module = _wan_ffn()
        x = torch.randn(1, TOKENS, DIM)
        unchunked, _ = _intermediate_peak(module, x)
        module.forward = chunked_forward(module, CHUNKS)
        chunked_fake, _ = _intermediate_peak(module, x)

    torch.manual_seed(0)
    module = _wan_ffn()
    x = torch.randn(1, TOKENS, DIM)
    wrapper = chunked_forward(module, CHUNKS)
    module.forward = wrapper
    chunked, out = _intermediate_peak(module, x)  # real tensors, with verification on 256 tokens
    assert isinstance(wrapper, ChunkedForward) and wrapper.chunked_calls == 1 and not wrapper.passthrough
    with torch.no_grad():  # the last chunk's tokens, against the unchunked module on them
        tail = wrapper.original(x[:, -100:])
    torch.testing.assert_close(out[:, -100:], tail, rtol=1e-5, atol=1e-5)

    hidden_bytes = TOKENS * HIDDEN * 4  # one full fc1 output
    assert unchunked >= 2 * hidden_bytes - x.nbytes  # fc1 output and GELU output, both alive
    assert chunked == chunked_fake  # fake accounting is the real one
    # one chunk: fc1 output + GELU output + the chunk's fc2 output
    assert chunked <= 2 * hidden_bytes // CHUNKS + x.nbytes // CHUNKS
    assert chunked * 6 <= unchunked, f"chunked {chunked / 2**20:.0f} MiB vs unchunked {unchunked / 2**20:.0f} MiB"
