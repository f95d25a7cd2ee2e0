"""Small stand-ins for the feed-forward (and not feed-forward) modules of real models, for the FFN tests.

Written from the modules' published structure (class names, child names, shapes); ComfyUI and transformers
are not imported. Widths are tiny so every test runs in milliseconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D = 32  # model width used by default
H = 96  # hidden width (3x)


class CastLinear(nn.Linear):
    """Like ``comfy.ops`` Linear: casts its weight to the input per call and counts calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


# -- accepted forms ----------------------------------------------------------------------------------------


def wan_ffn(dim: int = D, ffn_dim: int = H) -> nn.Sequential:
    """Wan ``blocks[i].ffn``."""
    return nn.Sequential(CastLinear(dim, ffn_dim), nn.GELU(approximate="tanh"), CastLinear(ffn_dim, dim))


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim), nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        q, k, v = self.norm_q(self.q(x)), self.norm_k(self.k(x)), self.v(x)
        return self.o(F.scaled_dot_product_attention(q, k, v))


class WanAttentionBlock(nn.Module):
    def __init__(self, dim: int = D, ffn_dim: int = H) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.ffn = wan_ffn(dim, ffn_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), freqs)
        return x + self.ffn(self.norm2(x))


class WanLike(nn.Module):
    """Two Wan blocks plus the (rejected) text embedding projector."""

    def __init__(self, dim: int = D, ffn_dim: int = H, text_dim: int = 40) -> None:
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(dim, ffn_dim) for _ in range(2))


class GEGLU(nn.Module):
    """ComfyUI ``attention.GEGLU``: one fused projection, split into value and gate."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = CastLinear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """ComfyUI ``attention.FeedForward`` (``glu=True``: GEGLU; else Linear + GELU)."""

    def __init__(self, dim: int = D, mult: int = 4, glu: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(CastLinear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), CastLinear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GELU_approx(nn.Module):  # noqa: N801 - LTXV's class name
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = CastLinear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class LTXVFeedForward(nn.Module):
    def __init__(self, dim: int = D, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GELU_approx(dim, dim * mult), nn.Dropout(0.0), CastLinear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SwiGLU(nn.Module):
    """Lumina2/SD3-style ``w2(silu(w1 x) * w3 x)``; note ``w2`` is registered between the input projections.
    ``linear`` makes the three projections (``comfy.ops``-like :class:`CastLinear` by default)."""

    def __init__(self, dim: int = D, hidden: int = H, linear: type = CastLinear) -> None:
        super().__init__()
        self.w1 = linear(dim, hidden, bias=False)
        self.w2 = linear(hidden, dim, bias=False)
        self.w3 = linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int = D, intermediate_size: int = H) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D``: a per-token linear with weight (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * nx**-0.5)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)  # view: needs a contiguous input
        return x.view(size_out)


class NewGELUActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x.pow(3))))


class GPT2MLP(nn.Module):
    def __init__(self, embed_dim: int = D, intermediate_size: int = 4 * D) -> None:
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, embed_dim)
        self.c_proj = Conv1D(embed_dim, intermediate_size)
        self.act = NewGELUActivation()
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class SiLUActivation(nn.Module):
    """Flux2-style gate inside a Sequential: split the fused projection and gate one half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return F.silu(x1) * x2


def flux2_mlp(dim: int = D, hidden: int = H) -> nn.Sequential:
    return nn.Sequential(CastLinear(dim, 2 * hidden, bias=False), SiLUActivation(), CastLinear(hidden, dim))


class QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)


class SelfAttention(nn.Module):
    """Flux ``SelfAttention`` (fused qkv)."""

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim)
        self.proj = nn.Linear(dim, dim)


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int = D, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_attn = SelfAttention(dim)
        self.img_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.txt_attn = SelfAttention(dim)
        self.txt_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class SingleStreamBlock(nn.Module):
    """Flux single block: the MLP is fused into linear1/linear2 with the attention, so it is not chunkable."""

    def __init__(self, dim: int = D, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + hidden)
        self.linear2 = nn.Linear(dim + hidden, dim)
        self.norm = QKNorm(dim)
        self.pre_norm = nn.LayerNorm(dim)
        self.mlp_act = nn.GELU(approximate="tanh")

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FluxLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.double_blocks = nn.ModuleList([DoubleStreamBlock()])
        self.single_blocks = nn.ModuleList([SingleStreamBlock()])


class T5DenseGatedActDense(nn.Module):
    def __init__(self, d_model: int = D, d_ff: int = H) -> None:
        super().__init__()
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(0.1)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        return self.wo(self.dropout(h))


class NormedMlp(nn.Module):
    """timm/SD3-style ``Mlp`` with a LayerNorm on the hidden features."""

    def __init__(self, dim: int = D, hidden: int = H) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class GELU(nn.Module):
    """diffusers/Qwen-Image ``GELU``: projection then GELU."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class ListFeedForward(nn.Module):
    """diffusers/Qwen-Image ``FeedForward``: ``net`` is a ModuleList run in order."""

    def __init__(self, dim: int = D, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult, "tanh"), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


ACCEPTED = {
    "diffusers_list_feedforward": ListFeedForward,
    "wan_ffn": wan_ffn,
    "comfy_feedforward_geglu": lambda: FeedForward(glu=True),
    "comfy_feedforward_gelu": lambda: FeedForward(glu=False),
    "ltxv_feedforward": LTXVFeedForward,
    "swiglu": SwiGLU,
    "llama_mlp": LlamaMLP,
    "gpt2_mlp": GPT2MLP,
    "flux_img_mlp": lambda: DoubleStreamBlock().img_mlp,
    "flux2_gated_mlp": flux2_mlp,
    "t5_gated": T5DenseGatedActDense,
    "normed_mlp": NormedMlp,
}


# -- rejected forms ----------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """ComfyUI ``CrossAttention``: only linear layers, but an attention."""

    def __init__(self, dim: int = D, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.to_out(F.scaled_dot_product_attention(q, k, v))


class Expert(SwiGLU):
    """Mixtral-style expert: the same ``w2(silu(w1 x) * w3 x)`` with plain ``nn.Linear`` children."""

    def __init__(self, dim: int = D, hidden: int = H) -> None:
        super().__init__(dim, hidden, linear=nn.Linear)


class SparseMoeBlock(nn.Module):
    """Mixtral-style: a router ``gate`` and an ``experts`` list with top-k routing."""

    def __init__(self, dim: int = D, num_experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(dim) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w = (weights * (chosen == e)).sum(-1, keepdim=True)
            out = out + w * expert(x)
        return out


class MoEGate(nn.Module):
    def __init__(self, dim: int = D, n: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dim))


class MOEFeedForwardSwiGLU(nn.Module):
    """HiDream-style: shared expert, routed experts, a gate module."""

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.shared_experts = Expert(dim)
        self.experts = nn.ModuleList(Expert(dim) for _ in range(2))
        self.gate = MoEGate(dim)


class Block(nn.Module):
    """A neutral name: only the ``experts`` child and ``top_k`` attribute reveal the MoE."""

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.top_k = 1
        self.experts = nn.ModuleList(Expert(dim) for _ in range(2))
        self.router = nn.Linear(dim, 2)


class SparseBlock(nn.Module):
    """An MoE with neutral names: a scoring Linear and a list of experts (caught by its linear count)."""

    def __init__(self, dim: int = D) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 2)
        self.ws = nn.ModuleList(LlamaMLP(dim) for _ in range(2))


class _MlpAroundMiddle(nn.Module):
    """Linear, a middle module over the hidden channels of the whole sequence (channels first), GELU, Linear.

    Subclasses name the middle module (``middle_name``) and build it (``middle``), as the replicated models do.
    """

    middle_name = "middle"

    def __init__(self, dim: int = D, hidden: int = H) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        setattr(self, self.middle_name, self.middle(hidden))
        self.fc2 = nn.Linear(hidden, dim)

    @staticmethod
    def middle(hidden: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = getattr(self, self.middle_name)(self.fc1(x).transpose(1, 2)).transpose(1, 2)
        return self.fc2(F.gelu(mixed))


class BatchNormMlp(_MlpAroundMiddle):
    middle_name = "bn"
    middle = staticmethod(nn.BatchNorm1d)


class ConvMlp(_MlpAroundMiddle):
    """Linear, depthwise Conv1d over tokens, Linear (a "Mix-FFN")."""

    middle_name = "dwconv"

    @staticmethod
    def middle(hidden: int) -> nn.Module:
        return nn.Conv1d(hidden, hidden, 3, padding=1, groups=hidden)


class GroupNormMlp(_MlpAroundMiddle):
    middle_name = "norm"

    @staticmethod
    def middle(hidden: int) -> nn.Module:
        return nn.GroupNorm(4, hidden)


class ContextMlp(nn.Module):
    """Token-local layers, but the forward needs a second input."""

    def __init__(self, dim: int = D, hidden: int = H) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x))) + context


def caption_projector() -> nn.Sequential:
    """PixArt-style caption projection: 48 -> 32 -> 32 (expansion 0.67)."""
    return nn.Sequential(nn.Linear(48, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))


def narrow_mlp() -> nn.Sequential:
    """Expansion 1.25 < 1.5."""
    return nn.Sequential(nn.Linear(D, 40), nn.GELU(), nn.Linear(40, D))


REJECTED = {
    "cross_attention": (CrossAttention, "attention"),
    "multihead_attention": (lambda: nn.MultiheadAttention(D, 2), "attention"),
    "mixtral_moe": (SparseMoeBlock, "mixture-of-experts"),
    "hidream_moe": (MOEFeedForwardSwiGLU, "mixture-of-experts"),
    "neutral_moe": (Block, "mixture-of-experts"),
    "anonymous_moe": (SparseBlock, "7 linear layers"),
    "batchnorm": (BatchNormMlp, "BatchNorm1d"),
    "conv1d": (ConvMlp, "Conv1d"),
    "groupnorm": (GroupNormMlp, "GroupNorm"),
    "context_input": (ContextMlp, "one required input"),
    "caption_projector": (caption_projector, "expansion"),
    "narrow_mlp": (narrow_mlp, "expansion"),
    "flux_single_block": (SingleStreamBlock, "attention"),
}


# -- structurally fine, but mixing tokens -----------------------------------------------------------------


class CumsumMlp(nn.Module):
    """Looks like fc1 -> GELU -> fc2, but the forward takes a running sum over tokens."""

    def __init__(self, dim: int = D, hidden: int = H) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.cumsum(-2) / x.shape[-2] ** 0.5)))


class MeanMlp(CumsumMlp):
    """Adds the token mean (a 'global context' trick) before the MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x + x.mean(-2, keepdim=True))))


class LengthScaledMlp(CumsumMlp):
    """Scales by the sequence length: token-local per call, but chunking changes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) * (x.shape[-2] / 256) ** 0.5
