"""Find token-local feed-forward modules by their structure.

A module is an FFN candidate when its subtree holds only feature-local layers (linear layers, activations,
dropout, LayerNorm/RMSNorm, identity) and its linear layers form a feed-forward shape:

- two layers ``D -> H`` then ``H -> D'`` (Linear -> act -> Linear; GPT-2's ``Conv1D`` counts as linear), or
  ``D -> 2H`` then ``H -> D'`` (a fused gate that is split in halves: ComfyUI's ``GEGLU``, Flux2's SiLU gate);
- three layers ``D -> H``, ``D -> H`` and ``H -> D'`` (SwiGLU/GEGLU with separate projections:
  ``w2(act(w1 x) * w3 x)``, ``LlamaMLP``, T5's gated dense);
- with an expansion ``H / max(D, D') >= 1.5``; narrower ones are projectors (caption or time embedders) whose
  intermediate is not worth chunking;
- and a ``forward`` that takes a single required input.

Rejected: attention modules (q/k/v-style children, ``*Attention*`` classes); mixture-of-experts modules,
recognised by expert/router children or router/expert-list/top-k classes (neither they nor their experts
are wrapped; a class merely named ``*Moe*`` is no evidence, MoE families name dense MLPs that way); and any
subtree holding a layer that mixes tokens or that the scan does not know (BatchNorm, GroupNorm,
InstanceNorm, convolutions, pooling, recurrent layers, softmax, raw matrix parameters). A ``ModuleList`` run
in order (diffusers-style ``FeedForward.net``) counts like a ``Sequential``; an unnamed list of experts has
more than three linear layers.

Matching is by structure and class names only: nothing here imports ComfyUI or transformers. Structure is
evidence, not proof: :mod:`noflash_core.ffn.chunk` checks each accepted module numerically on its first call.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "MIN_EXPANSION",
    "FFNInfo",
    "FFNVerdict",
    "classify_ffn",
    "estimate_ffn_info",
    "find_ffn_modules",
    "scan_ffn_modules",
]

MIN_EXPANSION = 1.5
"""Smallest hidden/model width ratio accepted as a feed-forward (below it: a projector)."""

_ATTENTION_CHILD_NAMES = frozenset(
    {
        "q", "k", "v", "qkv", "to_q", "to_k", "to_v", "to_qkv", "q_proj", "k_proj", "v_proj", "qkv_proj",
        "query", "key", "value", "c_attn", "wq", "wk", "wv", "wqkv", "q_lin", "k_lin", "v_lin",
        "norm_q", "norm_k", "q_norm", "k_norm", "query_norm", "key_norm", "add_q_proj", "add_k_proj",
    }
)  # fmt: skip
_MOE_CHILD_NAMES = frozenset({"experts", "shared_experts", "router", "routers", "expert", "switch_mlp"})
_MOE_ATTRIBUTES = frozenset(
    {"num_experts", "n_routed_experts", "num_experts_per_tok", "top_k", "topk", "moe_topk", "num_local_experts"}
)
_ATTENTION_CLASS = re.compile(r"attn|attention", re.IGNORECASE)
_ROUTING_CLASS = re.compile(r"router|experts|top_?k|moe_?gate|gating|mixture.?of.?experts", re.IGNORECASE)
_TOKEN_MIXER_CLASS = re.compile(
    r"batch_?norm|group_?norm|instance_?norm|response_?norm|conv|pool|rnn|lstm|gru|embedding|upsampl|shuffle"
    r"|fold|pad|softmax|softmin|flatten|mamba|ssm",
    re.IGNORECASE,
)
_FEATURE_NORM_CLASS = re.compile(r"(layer|rms)_?norm", re.IGNORECASE)
_ACTIVATION_CLASS = re.compile(
    r"gelu|silu|swish|relu|mish|sigmoid|tanh|glu|softplus|elu|activation|^act|quick|approx|identity|noop",
    re.IGNORECASE,
)

_TOKEN_MIXER_TYPES: Tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.GroupNorm, nn.LocalResponseNorm, nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.RNNBase, nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag, nn.Softmax, nn.Softmin, nn.LogSoftmax,
    nn.Flatten, nn.Unflatten, nn.Upsample, nn.Fold, nn.Unfold,
)  # fmt: skip
_ACTIVATION_TYPES: Tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.RReLU,
    nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)  # fmt: skip
_DROPOUT_TYPES: Tuple[type, ...] = (nn.modules.dropout._DropoutNd,)
_FEATURE_NORM_TYPES: Tuple[type, ...] = tuple(t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if t is not None)


@dataclass(frozen=True)
class FFNInfo:
    """Shape of an accepted feed-forward module.

    Attributes:
        in_features: model width ``D`` the input projections read.
        hidden: intermediate width ``H`` the output projection reads.
        out_features: output width ``D'``.
        gated: two input projections, or one fused ``D -> 2H`` projection split into value and gate.
        linears: paths (relative to the module) of the linear layers, input projections first.
        width_per_token: elements of intermediate activations alive per token at the peak of one chunk
            (projection outputs, activation output, gate product); the adaptive chunk size comes from it.
        reduction_length: summed reduction lengths of the matmuls on the path, ``D + H``; it sets the
            verification tolerance.
        roundings: low-precision roundings on the path (one per layer output), for the same tolerance.
    """

    in_features: int
    hidden: int
    out_features: int
    gated: bool
    linears: Tuple[str, ...]
    width_per_token: int
    reduction_length: int
    roundings: int

    @property
    def expansion(self) -> float:
        return self.hidden / max(self.in_features, self.out_features)


@dataclass(frozen=True)
class FFNVerdict:
    """Why a module was accepted or rejected.

    Attributes:
        name: dotted path of the module in the scanned model (``""`` for the model itself).
        class_name: the module's class name.
        accepted: whether it is an FFN candidate.
        reason: one line that explains the decision.
        info: the FFN's shape when accepted.
        num_linears: linear layers in its subtree.
        descend: whether a scan should look for feed-forwards inside it (False for accepted modules, for
            attention modules with q/k/v projections and for mixture-of-experts modules).
    """

    name: str
    class_name: str
    accepted: bool
    reason: str
    info: Optional[FFNInfo] = None
    num_linears: int = 0
    descend: bool = True


@dataclass(frozen=True)
class _Linear:
    path: str
    in_features: int
    out_features: int


class _Reject(Exception):
    """Internal: a subtree holds something that is not a feature-local FFN layer."""


def classify_ffn(module: nn.Module, name: str = "") -> FFNVerdict:
    """Decide whether ``module`` itself is a chunkable token-local feed-forward.

    Args:
        module: any ``nn.Module``.
        name: its path, only used in the verdict.

    Returns:
        An :class:`FFNVerdict`; ``info`` is set when ``accepted``.
    """
    cls = type(module).__name__
    n = sum(_linear_dims(m) is not None for m in module.modules())

    def verdict(reason: str, descend: bool = True) -> FFNVerdict:
        return FFNVerdict(name, cls, False, reason, None, n, descend)

    if _linear_dims(module) is not None:
        return verdict("a single linear layer", descend=False)
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return verdict(f"a {cls} container (no forward of its own)")
    moe, routes = _moe_evidence(module)
    if routes:  # experts are never wrapped
        return verdict(f"mixture-of-experts module ({moe})", descend=False)
    attention = _attention_evidence(module)
    if attention:  # a block named *Attention* may hold the FFN; a module with q/k/v projections does not
        return verdict(f"attention module ({attention})", descend=attention.startswith("class"))
    if moe:
        return verdict(f"mixture-of-experts settings ({moe})")
    linears: List[_Linear] = []
    try:
        _collect_linears(module, "", linears, is_root=True)
        if len(linears) < 2:
            raise _Reject(f"{len(linears)} linear layer(s); a feed-forward needs at least two")
        info = _ffn_shape(linears)
    except _Reject as exc:
        return verdict(str(exc))
    if info.expansion < MIN_EXPANSION:
        return verdict(
            f"expansion {info.expansion:.2f}x < {MIN_EXPANSION}x ({info.in_features} -> {info.hidden} -> "
            f"{info.out_features}): a projector, not a feed-forward"
        )
    signature_problem = _signature_problem(module)
    if signature_problem:
        return verdict(signature_problem)
    kind = "gated " if info.gated else ""
    reason = (
        f"{kind}feed-forward {info.in_features} -> {info.hidden} -> {info.out_features} "
        f"({info.expansion:.2f}x) via {', '.join(info.linears)}"
    )
    return FFNVerdict(name, cls, True, reason, info, n, descend=False)


def scan_ffn_modules(model: nn.Module) -> List[FFNVerdict]:
    """Walk ``model`` top-down and classify its modules.

    The walk does not descend into accepted modules (their inner Sequential is part of them), attention
    modules, or mixture-of-experts modules (experts are never wrapped). A module used at several paths is
    classified once, at its first path.

    Returns:
        Accepted verdicts, plus the deepest rejected modules that looked like feed-forwards (two or more
        linear layers, with no accepted or reported module below them) and every mixture-of-experts module,
        in traversal order.
    """
    out: List[FFNVerdict] = []
    seen: set = set()

    def visit(name: str, module: nn.Module) -> bool:
        if id(module) in seen:
            return False
        seen.add(id(module))
        v = classify_ffn(module, name)
        if v.accepted:
            out.append(v)
            return True
        reported = False
        if v.descend:
            for child_name, child in module.named_children():
                reported |= visit(f"{name}.{child_name}" if name else child_name, child)
        if not reported and (v.num_linears >= 2 or v.reason.startswith("mixture-of-experts module")):
            out.append(v)
            return True
        return reported

    visit("", model)
    return out


def find_ffn_modules(model: nn.Module) -> List[str]:
    """Dotted paths of the chunkable feed-forward modules of ``model``, in traversal order.

    A path is usable as ``add_object_patch(path + ".forward", fn)`` on a ComfyUI ModelPatcher (prefix it with
    ``"diffusion_model."`` when ``model`` is the diffusion model). The model itself is reported as ``""``.
    """
    return [v.name for v in scan_ffn_modules(model) if v.accepted]


def estimate_ffn_info(module: nn.Module) -> FFNInfo:
    """:class:`FFNInfo` of ``module``: exact when it is accepted, else a conservative estimate.

    The estimate (for modules wrapped without passing :func:`classify_ffn`) counts every linear layer's
    output as live intermediate width and every input width as reduction length.
    """
    info = classify_ffn(module).info
    if info is not None:
        return info
    linears = [(path, dims) for path, m in module.named_modules() for dims in [_linear_dims(m)] if dims]
    if not linears:
        return FFNInfo(1, 1, 1, False, (), 1, 1, 3)
    return FFNInfo(
        in_features=linears[0][1][0],
        hidden=max(d[0] for _, d in linears),
        out_features=linears[-1][1][1],
        gated=False,
        linears=tuple(p for p, _ in linears),
        width_per_token=sum(d[1] for _, d in linears),
        reduction_length=sum(d[0] for _, d in linears),
        roundings=len(linears) + 2,
    )


# -- structure ---------------------------------------------------------------------------------------------


def _linear_dims(module: nn.Module) -> Optional[Tuple[int, int]]:
    """``(in_features, out_features)`` when ``module`` is a token-local linear layer, else ``None``.

    Covers ``nn.Linear`` and its subclasses (ComfyUI ops, GGUF, bitsandbytes), other ``*Linear`` classes that
    carry ``in_features``/``out_features`` (quantised or LoRA-wrapped linears), and GPT-2's ``Conv1D``, which
    despite its name is ``x @ W + b`` per token with ``W`` of shape ``(in, out)``.
    """
    cls = type(module).__name__
    if isinstance(module, nn.Linear) or (cls.endswith("Linear") and not cls.endswith("Bilinear")):
        fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if isinstance(fin, int) and isinstance(fout, int) and fin > 0 and fout > 0:
            return fin, fout
        return None
    if cls == "Conv1D":
        nf = getattr(module, "nf", None)
        weight = getattr(module, "weight", None)
        if isinstance(nf, int) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return int(weight.shape[0]), nf
    return None


def _attention_evidence(module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "nn.MultiheadAttention"
    names = sorted(n for n, _ in module.named_children() if n.lower() in _ATTENTION_CHILD_NAMES)
    if names:
        return f"q/k/v-style children {', '.join(names)}"
    if _ATTENTION_CLASS.search(type(module).__name__):
        return f"class {type(module).__name__}"
    return ""


def _moe_evidence(module: nn.Module) -> Tuple[str, bool]:
    """``(evidence, strong)`` that ``module`` is a mixture-of-experts layer.

    Strong: it is, or has as a child, a router/expert-list/top-k gate (by child name or class name); such a
    module routes tokens itself and is not searched further. Weak: only MoE attributes (``num_experts``,
    ``top_k``): it is no FFN but may hold some. A class name like ``Qwen2MoeMLP`` alone is no evidence: MoE
    model families name their dense MLPs and norms that way too.
    """
    if _ROUTING_CLASS.search(type(module).__name__):
        return f"class {type(module).__name__}", True
    for child_name, child in module.named_children():
        if child_name.lower() in _MOE_CHILD_NAMES:
            return f"child {child_name!r}", True
        if _ROUTING_CLASS.search(type(child).__name__):
            return f"child {child_name!r} of class {type(child).__name__}", True
    attrs = sorted(a for a in vars(module) if a.lower() in _MOE_ATTRIBUTES)
    if attrs:
        return f"attributes {', '.join(attrs)}", False
    return "", False


def _collect_linears(module: nn.Module, path: str, out: List[_Linear], is_root: bool = False) -> None:
    """Append the linear layers under ``module`` to ``out``; raise :class:`_Reject` on anything else."""
    where = path or "the module itself"
    if not is_root:
        dims = _linear_dims(module)
        if dims is not None:
            out.append(_Linear(path, *dims))
            return
        evidence, _ = _moe_evidence(module)
        if evidence:
            raise _Reject(f"contains mixture-of-experts part {path!r} ({evidence})")
        evidence = _attention_evidence(module)
        if evidence:
            raise _Reject(f"contains attention part {path!r} ({evidence})")
    children = list(module.named_children())
    if not children:
        if not is_root:
            _check_leaf(module, path)
        return
    if isinstance(module, _TOKEN_MIXER_TYPES):
        raise _Reject(f"contains {type(module).__name__} {path!r}, which mixes tokens")
    for pname, tensor in _own_tensors(module):
        if tensor.dim() > 1:
            raise _Reject(f"{where} holds a raw {tuple(tensor.shape)} tensor {pname!r} whose use is unknown")
    for child_name, child in children:
        _collect_linears(child, f"{path}.{child_name}" if path else child_name, out)


def _own_tensors(module: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    for name, t in list(module._parameters.items()) + list(module._buffers.items()):
        if t is not None:
            yield name, t


def _check_leaf(module: nn.Module, path: str) -> None:
    """Accept feature-local leaf layers; raise :class:`_Reject` for token mixers and unknown layers."""
    cls = type(module).__name__
    if isinstance(module, _TOKEN_MIXER_TYPES) or _TOKEN_MIXER_CLASS.search(cls):
        raise _Reject(f"contains {cls} {path!r}, which mixes tokens")
    if isinstance(module, _FEATURE_NORM_TYPES) or _FEATURE_NORM_CLASS.search(cls):
        return
    if isinstance(module, (nn.Identity,) + _DROPOUT_TYPES) or "dropout" in cls.lower():
        return
    if isinstance(module, nn.GLU):
        if module.dim == -1:
            return
        raise _Reject(f"contains GLU {path!r} over dim {module.dim}, which may be the token dim")
    if isinstance(module, nn.PReLU):
        if module.num_parameters == 1:
            return
        raise _Reject(f"contains per-channel PReLU {path!r}; its channel dim is the token dim of (B, N, C)")
    if isinstance(module, _ACTIVATION_TYPES):
        return
    has_tensors = any(True for _ in _own_tensors(module))
    if not has_tensors and _ACTIVATION_CLASS.search(cls):
        return
    kind = "layer with parameters" if has_tensors else "layer"
    raise _Reject(f"contains unrecognised {kind} {cls} {path!r}")


def _ffn_shape(linears: Sequence[_Linear]) -> FFNInfo:
    """Match the linear layers to ``D -> H (-> 2H fused) -> D'`` or the three-projection gated form."""
    n = len(linears)
    if n == 2:
        for up, down in ((linears[0], linears[1]), (linears[1], linears[0])):
            hidden = down.in_features
            if up.out_features in (hidden, 2 * hidden):
                gated = up.out_features == 2 * hidden
                return FFNInfo(
                    in_features=up.in_features,
                    hidden=hidden,
                    out_features=down.out_features,
                    gated=gated,
                    linears=(up.path, down.path),
                    width_per_token=up.out_features + (2 if gated else 1) * hidden,  # + act(gate), product
                    reduction_length=up.in_features + hidden,
                    roundings=4 if gated else 3,
                )
        raise _Reject(f"linear layers {_dims_text(linears)} do not chain into a feed-forward (no out == in pairing)")
    if n == 3:
        for i in range(3):
            down = linears[i]
            a, b = (linears[j] for j in range(3) if j != i)
            same = (a.in_features, a.out_features) == (b.in_features, b.out_features)
            if same and a.out_features == down.in_features:
                hidden = down.in_features
                return FFNInfo(
                    in_features=a.in_features,
                    hidden=hidden,
                    out_features=down.out_features,
                    gated=True,
                    linears=(a.path, b.path, down.path),
                    width_per_token=3 * hidden,
                    reduction_length=a.in_features + hidden,
                    roundings=5,
                )
        raise _Reject(f"linear layers {_dims_text(linears)} do not form a gated feed-forward")
    raise _Reject(f"{n} linear layers; a feed-forward has two or three")


def _dims_text(linears: Sequence[_Linear]) -> str:
    return ", ".join(f"{lin.path}({lin.in_features}->{lin.out_features})" for lin in linears)


def _signature_problem(module: nn.Module) -> str:
    """Empty when ``forward`` takes exactly one required input (others optional), else the reason."""
    forward = getattr(type(module), "forward", None)
    if forward is None:
        return "no forward method"
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return "forward has no inspectable signature"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if len(required) == 1 and required[0].kind in positional:
        return ""
    names = ", ".join(p.name for p in required) or "none"
    return f"forward needs exactly one required input (required: {names})"
