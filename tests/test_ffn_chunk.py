"""Chunked FFN forward: exactness, autograd, verification of token-locality, chunk sizing."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from support import ffn_replicas as R
from torch import nn

from noflash_core.ffn import chunk as ffn_chunk
from noflash_core.ffn.chunk import ENV_CHUNKS, chunked_forward, resolve_num_chunks

TOKENS = 300  # > VERIFY_TOKENS: verification uses a slice, the real call crosses several chunk boundaries


def _tolerance(ref: torch.Tensor) -> dict:
    """Test tolerance from the dtype: a few ulps of the values plus a few ulps of the output scale."""
    eps = torch.finfo(ref.dtype).eps
    return {"rtol": 4 * eps, "atol": 8 * eps * ref.float().abs().max().item()}


def _inputs(dtype: torch.dtype, batch: int = 2, tokens: int = TOKENS, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, R.D, generator=g).to(dtype)


def _install(module: nn.Module, num_chunks: int = 4) -> ffn_chunk.ChunkedForward:
    fn = chunked_forward(module, num_chunks, name="m")
    module.forward = fn  # what ComfyUI's add_object_patch(name + ".forward", fn) does on load
    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(R.ACCEPTED))
def test_exact_on_accepted_forms(name: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    module = R.ACCEPTED[name]().to(dtype).eval()
    x = _inputs(dtype)
    with torch.no_grad():
        ref = module(x)
        fn = _install(module)
        got = module(x)
    assert fn.chunked_calls == 1 and not fn.passthrough, fn.failure
    torch.testing.assert_close(got, ref, **_tolerance(ref))


def test_two_dim_input_chunks_dim0() -> None:
    module = R.SwiGLU().eval()
    x = torch.randn(TOKENS, R.D)
    with torch.no_grad():
        ref = module(x)
        fn = _install(module, 3)
        got = module(x)
    assert fn.chunked_calls == 1
    torch.testing.assert_close(got, ref, **_tolerance(ref))


def test_submodules_are_called_per_chunk() -> None:
    """ComfyUI Linear layers cast weights per call: the wrapper must call them, not F.linear on weights."""
    module = R.wan_ffn().eval()
    with torch.no_grad():
        _install(module, 5)
        module(_inputs(torch.float32, tokens=TOKENS))
    # verification: 1 unchunked + 3 chunks on a slice; then 5 real chunks
    assert module[0].calls == module[2].calls == 1 + 3 + 5


def test_gradients_equal_unchunked() -> None:
    torch.manual_seed(0)
    module = R.LlamaMLP()
    x = _inputs(torch.float32).requires_grad_()
    module(x).square().sum().backward()
    ref_x = x.grad.clone()
    ref_w = {n: p.grad.clone() for n, p in module.named_parameters()}
    x.grad = None
    module.zero_grad()
    fn = _install(module)
    module(x).square().sum().backward()
    assert fn.chunked_calls == 1
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-5, atol=1e-6)
    for n, p in module.named_parameters():
        torch.testing.assert_close(p.grad, ref_w[n], rtol=1e-5, atol=1e-5)


def test_no_grad_and_inference_mode() -> None:
    module = R.FeedForward(glu=True)  # parameters require grad
    x = _inputs(torch.float32)
    with torch.no_grad():
        ref = module(x)
    fn = _install(module)
    with torch.no_grad():
        got = module(x)
    assert not got.requires_grad
    with torch.inference_mode():
        got2 = module(x)
    assert fn.chunked_calls == 2
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got2, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls", [R.CumsumMlp, R.MeanMlp, R.LengthScaledMlp])
def test_token_mixing_caught_by_verification(cls: type, dtype: torch.dtype, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    module = cls().to(dtype).eval()
    from noflash_core.ffn.detect import classify_ffn

    assert classify_ffn(module).accepted  # structure alone cannot tell
    x = _inputs(dtype) + 1.0  # real activations rarely have zero mean
    with torch.no_grad():
        ref = module(x)
        fn = _install(module)
        with caplog.at_level(logging.WARNING, logger="noflash_core.ffn.chunk"):
            got = module(x)
            again = module(_inputs(dtype, tokens=500))
    assert fn.passthrough and fn.chunked_calls == 0
    assert torch.equal(got, ref)  # the unchunked result, bit for bit
    assert again.shape == (2, 500, R.D)
    warnings = [r for r in caplog.records if "not chunking m" in r.getMessage()]
    assert len(warnings) == 1 and "mixes tokens" in warnings[0].getMessage()


def test_verification_once_per_signature() -> None:
    module = R.wan_ffn().eval()
    fn = _install(module, 4)
    seen = []
    original = ffn_chunk.ChunkedForward._verify

    def spy(self, x, dim):  # type: ignore[no-untyped-def]
        seen.append((tuple(x.shape), x.dtype))
        return original(self, x, dim)

    ffn_chunk.ChunkedForward._verify = spy  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            module(_inputs(torch.float32, tokens=300))
            module(_inputs(torch.float32, tokens=400))  # token count is not part of the signature
            module(_inputs(torch.float32, batch=3))  # batch is
            module(_inputs(torch.float64))  # dtype is
        module(_inputs(torch.float32).requires_grad_())  # requires_grad is
    finally:
        ffn_chunk.ChunkedForward._verify = original  # type: ignore[method-assign]
    assert len(seen) == 4 and fn.chunked_calls == 5


def test_exception_in_chunked_path_means_passthrough() -> None:
    class SqueezeMlp(R.CumsumMlp):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-2] < 20:
                raise RuntimeError("needs at least 20 tokens")
            return self.fc2(self.act(self.fc1(x)))

    module = SqueezeMlp().eval()
    x = _inputs(torch.float32)
    with torch.no_grad():
        ref = module(x)
        fn = _install(module)
        got = module(x)
    assert fn.passthrough and "RuntimeError" in (fn.failure or "")
    assert torch.equal(got, ref)


def test_extra_arguments_and_1d_pass_through() -> None:
    module = R.ContextMlp().eval()
    fn = _install(module)
    x = _inputs(torch.float32)
    with torch.no_grad():
        out = module(x, torch.ones(()))
        kw = module(x, context=torch.zeros(()))
    assert out.shape == kw.shape == x.shape and fn.chunked_calls == 0
    mlp = R.wan_ffn()
    fn = _install(mlp)
    assert mlp(torch.randn(R.D)).shape == (R.D,) and fn.chunked_calls == 0


def test_active_dropout_runs_unchunked() -> None:
    module = R.GPT2MLP().train()
    fn = _install(module)
    module(_inputs(torch.float32))
    assert fn.chunked_calls == 0 and not fn.passthrough
    module.eval()
    with torch.no_grad():
        module(_inputs(torch.float32))
    assert fn.chunked_calls == 1


def test_non_finite_reference_defers_verification() -> None:
    module = R.wan_ffn().eval()
    fn = _install(module)
    x = _inputs(torch.float32)
    x[0, 3, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(module(x)).any()
        assert fn.chunked_calls == 0 and not fn.passthrough
        module(_inputs(torch.float32))
    assert fn.chunked_calls == 1


def test_env_var_sets_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_CHUNKS, "6")
    assert resolve_num_chunks(0) == 6 and resolve_num_chunks(3) == 3
    module = R.wan_ffn().eval()
    fn = _install(module, 0)
    assert fn.num_chunks == 6
    with torch.no_grad():
        module(_inputs(torch.float32))
    assert module[0].calls == 4 + 6
    monkeypatch.setenv(ENV_CHUNKS, "eight")
    with pytest.raises(ValueError, match=ENV_CHUNKS):
        resolve_num_chunks(0)
    with pytest.raises(ValueError, match="num_chunks"):
        resolve_num_chunks(-1)


def test_adaptive_chunks_fit_half_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CHUNKS, raising=False)
    module = R.wan_ffn().eval()  # width per token: H (fc1 out) + H (GELU out) = 192 floats
    per_token = 2 * (2 * R.H) * 4  # batch 2, fp32
    budgets = []

    def fake_budget(device: torch.device) -> int:
        budgets.append(device)
        return 2 * 50 * per_token  # half of it holds 50 tokens

    monkeypatch.setattr(ffn_chunk, "_budget_bytes", fake_budget)
    fn = _install(module, 0)
    with torch.no_grad():
        module(_inputs(torch.float32, tokens=300))  # 300 / 50 = 6 chunks
    assert module[0].calls == 4 + 6 and budgets == [torch.device("cpu")]
    monkeypatch.setattr(ffn_chunk, "_budget_bytes", lambda device: 10**12)
    with torch.no_grad():
        module(_inputs(torch.float32))  # fits: plain call
    assert module[0].calls == 4 + 6 + 1 and fn.chunked_calls == 1


def test_uses_class_forward_not_instance_attribute() -> None:
    """Installed as ``module.forward``, the callable must not recurse into itself or chain stale patches."""
    module = R.SwiGLU().eval()
    first = _install(module)
    second = chunked_forward(module, 4)  # e.g. a second clone while the first clone's patch is applied
    for fn in (first, second):
        assert fn.original.__func__ is R.SwiGLU.forward and fn.original.__self__ is module
    module.forward = second
    with torch.no_grad():
        x = _inputs(torch.float32)
        torch.testing.assert_close(module(x), R.SwiGLU.forward(module, x))
    assert first.chunked_calls == 0 and second.chunked_calls == 1


def test_adaptive_uses_the_budget_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_CHUNKS, raising=False)
    monkeypatch.setenv("NOFLASH_BUDGET_MB", "0.1")  # half: 52428 B; per token 2 x 192 x 4 = 1536 B -> 34 tokens
    module = R.wan_ffn().eval()
    fn = _install(module, 0)
    with torch.no_grad():
        module(_inputs(torch.float32, tokens=300))
    assert fn.chunked_calls == 1 and module[0].calls == 4 + 9


def test_deepcopy_rebinds_to_the_copy() -> None:
    model = nn.Sequential(R.wan_ffn())
    model[0].forward = chunked_forward(model[0], 4)
    clone = copy.deepcopy(model)
    wrapper = clone[0].__dict__["forward"]
    assert wrapper.module is clone[0] and wrapper.original.__self__ is clone[0]
    with torch.no_grad():
        clone[0][0].weight.zero_()
        clone[0][0].bias.zero_()
        out = clone(_inputs(torch.float32))
    expected = clone[0][2].bias.expand_as(out) + 0 * out  # zero hidden -> GELU(0)=0 -> bias only
    torch.testing.assert_close(out, expected)


def test_fake_tensors_chunk_without_verifying() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        module = R.wan_ffn().eval()
        fn = _install(module, 4)
        with torch.no_grad():
            out = module(torch.randn(1, 1000, R.D))
    assert out.shape == (1, 1000, R.D)
    assert fn.chunked_calls == 1 and module[0].calls == 4 and not fn._verified


def test_tolerance_scales_with_dtype_and_length() -> None:
    from noflash_core.ffn.detect import FFNInfo

    def tol(dtype: torch.dtype, hidden: int) -> float:
        info = FFNInfo(64, hidden, 64, False, (), 2 * hidden, 64 + hidden, 3)
        ref = torch.ones(8, dtype=torch.float32)
        return ffn_chunk._tolerance(ref, dtype, "cpu", info).max().item()

    assert tol(torch.float32, 256) < tol(torch.float32, 8960) < tol(torch.float16, 256) < tol(torch.bfloat16, 256)
    assert tol(torch.float32, 8960) < 1e-4  # ~5e-5: far below what token mixing does
    assert tol(torch.bfloat16, 8960) < 0.1


def test_chunked_fits_a_budget_the_unchunked_call_does_not() -> None:
    from noflash_core.memory.tracker import MemoryBudget

    module = nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 64)).eval()
    x = torch.randn(1, 4096, 64)  # unchunked: 2 x 16 MiB of hidden; 8 chunks: 2 x 2 MiB
    with torch.no_grad():
        with pytest.raises(torch.OutOfMemoryError), MemoryBudget(12 * 2**20):
            module(x)
        fn = _install(module, 8)
        with MemoryBudget(12 * 2**20):
            out = module(x)
        assert fn.chunked_calls == 1 and out.shape == x.shape

        small = nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 64)).eval()
        fn = _install(small, 8)
        with pytest.raises(torch.OutOfMemoryError), MemoryBudget(2**20):
            small(x)  # verification itself does not fit: an OOM, not a verdict against chunking
        assert not fn.passthrough
