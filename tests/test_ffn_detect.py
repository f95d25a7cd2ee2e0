"""Structural FFN detection: which modules are chunk candidates, and why the others are not."""

from __future__ import annotations

import pytest
import torch
from support import ffn_replicas as R
from torch import nn

from noflash_core.ffn.detect import classify_ffn, estimate_ffn_info, find_ffn_modules, scan_ffn_modules


@pytest.mark.parametrize("name", sorted(R.ACCEPTED))
def test_accepted_forms(name: str) -> None:
    v = classify_ffn(R.ACCEPTED[name]())
    assert v.accepted, v.reason
    assert v.info is not None and v.info.expansion >= 1.5
    assert find_ffn_modules(R.ACCEPTED[name]()) == [""]  # the model itself


@pytest.mark.parametrize("name", sorted(R.REJECTED))
def test_rejected_forms(name: str) -> None:
    factory, reason = R.REJECTED[name]
    v = classify_ffn(factory())
    assert not v.accepted
    assert reason in v.reason, v.reason


def test_shapes_of_gated_forms() -> None:
    geglu = classify_ffn(R.FeedForward(glu=True)).info
    assert geglu is not None and geglu.gated and (geglu.in_features, geglu.hidden) == (R.D, 4 * R.D)
    assert geglu.linears == ("net.0.proj", "net.2")
    swiglu = classify_ffn(R.SwiGLU()).info
    assert swiglu is not None and swiglu.gated and swiglu.linears == ("w1", "w3", "w2")  # w2 found as the down
    gpt2 = classify_ffn(R.GPT2MLP()).info
    assert gpt2 is not None and (gpt2.in_features, gpt2.hidden, gpt2.out_features) == (R.D, 4 * R.D, R.D)


def test_wan_like_model_finds_each_block_ffn_only() -> None:
    model = R.WanLike()
    assert find_ffn_modules(model) == ["blocks.0.ffn", "blocks.1.ffn"]
    rejected = {v.name: v.reason for v in scan_ffn_modules(model) if not v.accepted}
    assert "expansion" in rejected["text_embedding"]
    assert "attention" in rejected["blocks.0.self_attn"]


def test_flux_like_model() -> None:
    assert find_ffn_modules(R.FluxLike()) == ["double_blocks.0.img_mlp", "double_blocks.0.txt_mlp"]


def test_sd_unet_like_block_finds_feedforward_not_its_parts() -> None:
    block = nn.Module()
    block.attn1 = R.CrossAttention()
    block.ff = R.FeedForward(glu=True)
    block.norm3 = nn.LayerNorm(R.D)
    assert find_ffn_modules(block) == ["ff"]


def test_moe_is_not_descended_into() -> None:
    model = nn.Sequential(R.SparseMoeBlock(), R.MOEFeedForwardSwiGLU(), R.Block(), R.LlamaMLP())
    assert find_ffn_modules(model) == ["3"]  # no experts, no shared expert
    reasons = {v.name: v.reason for v in scan_ffn_modules(model) if not v.accepted}
    assert all("mixture-of-experts" in reasons[k] for k in "012")


def test_hf_conv1d_is_linear_but_torch_conv1d_is_not() -> None:
    assert classify_ffn(R.GPT2MLP()).accepted
    mlp = R.GPT2MLP()
    mlp.c_fc = nn.Conv1d(R.D, 4 * R.D, 1)  # same name, a real convolution
    v = classify_ffn(mlp)
    assert not v.accepted and "Conv1d" in v.reason


def test_shared_module_reported_once() -> None:
    ffn = R.wan_ffn()
    model = nn.Module()
    model.a, model.b = ffn, ffn
    assert find_ffn_modules(model) == ["a"]


def test_unknown_layers_and_raw_parameters_are_rejected() -> None:
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    v = classify_ffn(nn.Sequential(nn.Linear(8, 32), Scale(), nn.Linear(32, 8)))
    assert not v.accepted and "unrecognised layer Scale" in v.reason

    class PosMlp(R.NormedMlp):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 16, R.D))

    v = classify_ffn(PosMlp())
    assert not v.accepted and "raw (1, 16, 32) tensor 'pos'" in v.reason

    class LayerScaleMlp(R.NormedMlp):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(R.D))  # per-feature: fine

    assert classify_ffn(LayerScaleMlp()).accepted


def test_three_layer_and_chain_mismatch() -> None:
    v = classify_ffn(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)))
    assert not v.accepted and "gated" in v.reason
    v = classify_ffn(nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(24, 6)))
    assert not v.accepted and "chain" in v.reason


def test_estimate_for_unaccepted_module_is_conservative() -> None:
    info = estimate_ffn_info(R.ConvMlp())
    assert info.width_per_token >= R.H + R.D
    assert info.reduction_length >= R.D + R.H


def test_moe_family_names_alone_are_no_evidence() -> None:
    """MoE model families name their dense MLPs and whole models *Moe*: those are still searched."""

    class Qwen2MoeMLP(R.LlamaMLP):
        pass

    class Qwen2MoeTopKRouter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, R.D))

    class Qwen2MoeSparseMoeBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = Qwen2MoeTopKRouter()  # the router class gives it away
            self.shared_expert = Qwen2MoeMLP()

    class Qwen2MoeModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = Qwen2MoeMLP()
            self.sparse = Qwen2MoeSparseMoeBlock()

    assert find_ffn_modules(Qwen2MoeModel()) == ["dense"]
    mlp = R.LlamaMLP()
    mlp.num_experts = 4  # MoE settings on the module itself: not an FFN
    assert "mixture-of-experts settings" in classify_ffn(mlp).reason
