"""patch_ffn on whole models: what gets wrapped, exact results, and remove() restoring identity."""

from __future__ import annotations

import logging

import pytest
import torch
from support import ffn_replicas as R
from torch import nn

from noflash_core.ffn.chunk import ChunkedForward
from noflash_core.ffn.patch import FFNPatchHandle, patch_ffn


def _wan_input(tokens: int = 300) -> torch.Tensor:
    return torch.randn(1, tokens, R.D, generator=torch.Generator().manual_seed(1))


def _run_wan(model: R.WanLike, x: torch.Tensor) -> torch.Tensor:
    for block in model.blocks:
        x = block(x, None, None)
    return x


def test_patch_wan_like_model_is_exact_and_chunks() -> None:
    torch.manual_seed(0)
    model = R.WanLike().eval()
    x = _wan_input()
    with torch.no_grad():
        ref = _run_wan(model, x)
        handle = patch_ffn(model, num_chunks=4)
        got = _run_wan(model, x)
    assert isinstance(handle, FFNPatchHandle)
    assert handle.names == ("blocks.0.ffn", "blocks.1.ffn") and handle.num_wrapped == 2
    assert all(w.chunked_calls == 1 for w in handle.wrappers())
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    handle.remove()


def test_remove_restores_identity() -> None:
    model = R.WanLike()
    ffn = model.blocks[0].ffn
    custom = model.blocks[1].ffn
    sentinel = custom.forward  # a pre-existing instance forward (someone else's patch)
    custom.forward = sentinel
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}

    handle = patch_ffn(model, num_chunks=3)
    assert isinstance(ffn.__dict__["forward"], ChunkedForward)
    assert handle.wrappers()[1].original is sentinel  # chains the existing forward
    handle.remove()

    assert "forward" not in ffn.__dict__
    assert ffn.forward.__func__ is type(ffn).forward and ffn.forward.__self__ is ffn
    assert custom.__dict__["forward"] is sentinel
    after = {name: dict(m.__dict__) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys(), name
        assert all(after[name][k] is before[name][k] for k in before[name]), name
    assert not handle.active and handle.num_wrapped == 2
    handle.remove()  # idempotent


def test_context_manager_and_state_dict_unchanged() -> None:
    model = R.FluxLike()
    keys = list(model.state_dict())
    with patch_ffn(model, num_chunks=2) as handle:
        assert handle.names == ("double_blocks.0.img_mlp", "double_blocks.0.txt_mlp")
        assert list(model.state_dict()) == keys
    assert "forward" not in model.double_blocks[0].img_mlp.__dict__


def test_patching_twice_does_not_nest() -> None:
    model = nn.Sequential(R.LlamaMLP(), R.SwiGLU())
    first = patch_ffn(model, num_chunks=2)
    second = patch_ffn(model, num_chunks=2)
    assert first.num_wrapped == 2 and second.num_wrapped == 0
    first.remove()
    assert all("forward" not in m.__dict__ for m in model)


def test_model_itself_can_be_the_ffn() -> None:
    mlp = R.GPT2MLP().eval()
    x = torch.randn(2, 300, R.D)
    with torch.no_grad():
        ref = mlp(x)
        handle = patch_ffn(mlp, num_chunks=4)
        got = mlp(x)
    assert handle.names == ("",)
    torch.testing.assert_close(got, ref)
    handle.remove()
    assert "forward" not in mlp.__dict__


def test_verbose_logs_reasons(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Module()
    model.block = R.WanAttentionBlock()
    model.moe = R.SparseMoeBlock()
    model.bn = R.BatchNormMlp()
    model.proj = R.caption_projector()
    with caplog.at_level(logging.INFO, logger="noflash_core"):
        handle = patch_ffn(model, num_chunks=2, verbose=True)
    text = caplog.text
    assert "accept block.ffn (Sequential): feed-forward 32 -> 96 -> 32" in text
    assert "reject block.self_attn (WanSelfAttention): attention module" in text
    assert "reject moe (SparseMoeBlock): mixture-of-experts" in text
    assert "reject bn (BatchNormMlp): contains BatchNorm1d 'bn', which mixes tokens" in text
    assert "reject proj (Sequential): expansion 0.67x < 1.5x" in text
    assert "chunking 1 feed-forward module(s)" in text
    handle.remove()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="noflash_core"):
        patch_ffn(model, num_chunks=2).remove()
    assert caplog.text == ""  # quiet unless verbose


def test_env_var_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOFLASH_FFN_CHUNKS", "7")
    handle = patch_ffn(R.wan_ffn())
    assert handle.num_chunks == 7 and handle.wrappers()[0].num_chunks == 7
    handle.remove()
