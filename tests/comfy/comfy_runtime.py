"""Run a real ComfyUI in-process for the tests: set-up on CPU, the pack loaded as ComfyUI loads custom nodes, and
tiny random-weight models that ComfyUI's own model detection recognizes.

Used by ``tests/comfy/`` and by ``tests/test_workflows.py``; both only run when ``COMFYUI_PATH`` names a ComfyUI
checkout whose requirements are installed (see README.md, "Testing against a real ComfyUI").
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import importlib.util
import inspect
import os
import sys
from typing import Dict, NamedTuple, Optional, Tuple

import torch

__all__ = [
    "REPO_ROOT",
    "IMPORT_STUBS",
    "comfyui_path",
    "setup_comfyui",
    "ComfyFeatures",
    "detect_features",
    "FRONTEND_PATH_ENV",
    "frontend_path",
    "frontend_versions",
    "server_pythonpath",
    "load_core_nodes",
    "load_pack",
    "make_custom_nodes_dir",
    "tiny_wan_state_dict",
    "tiny_flux_state_dict",
    "tiny_sd3_state_dict",
    "tiny_clip_l_state_dict",
    "save_state_dict",
    "wan_conditioning",
    "flux_conditioning",
]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMPORT_STUBS = os.path.join(REPO_ROOT, "tests", "support", "import_stubs")
PACK_DIR_NAME = "noflash"


def comfyui_path() -> Optional[str]:
    """``COMFYUI_PATH`` when it names a ComfyUI checkout, else None."""
    path = os.environ.get("COMFYUI_PATH")
    if path and os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
        return os.path.abspath(path)
    return None


FRONTEND_PATH_ENV = "COMFYUI_FRONTEND_PATH"


def frontend_path() -> Optional[str]:
    """``COMFYUI_FRONTEND_PATH``: a ``pip install --no-deps --target`` folder holding the frontend package that
    ComfyUI at ``COMFYUI_PATH`` pins, when it differs from site-packages' (two ComfyUI versions, one environment)."""
    return os.environ.get(FRONTEND_PATH_ENV) or None


def frontend_versions(path: str) -> Tuple[Optional[str], Optional[str]]:
    """(the ``comfyui-frontend-package`` version that ComfyUI at ``path`` pins in its requirements.txt, the version
    its server will import with :func:`frontend_path` first on its path); None where there is none."""
    required = None
    with open(os.path.join(path, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            name, _, version = line.partition("==")
            if name.strip() == "comfyui-frontend-package" and version.strip():
                required = version.strip()
    search = [p for p in (frontend_path(),) if p] + sys.path
    dist = next(iter(importlib.metadata.distributions(name="comfyui-frontend-package", path=search)), None)
    return required, (dist.version if dist is not None else None)


def server_pythonpath() -> str:
    """``PYTHONPATH`` for a ComfyUI server process: the frontend folder (if any) first, so the server serves and
    version-checks that frontend; the import stand-ins; then the caller's ``PYTHONPATH``."""
    parts = (frontend_path(), IMPORT_STUBS, os.environ.get("PYTHONPATH"))
    return os.pathsep.join(p for p in parts if p)


def setup_comfyui() -> str:
    """Make ComfyUI importable (first on ``sys.path``), on CPU; returns its path."""
    path = comfyui_path()
    if path is None:
        raise RuntimeError("COMFYUI_PATH does not name a ComfyUI checkout")
    if sys.path[0] != path:
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)  # before the repo root: ComfyUI's nodes.py, not the pack's nodes/
    if any(importlib.util.find_spec(name) is None for name in ("torchvision", "torchaudio")):
        sys.path.append(IMPORT_STUBS)  # import-only stand-ins (tests/support/import_stubs)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401  (after args.cpu)

    import nodes

    if not os.path.abspath(nodes.__file__).startswith(path):
        raise RuntimeError(f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    return path


class ComfyFeatures(NamedTuple):
    """What the running ComfyUI has, found by looking at its code (never by comparing version strings).

    Attributes:
        version: ``comfyui_version.__version__``, for messages only.
        attention_kwargs: its attention functions read ``scale=`` / ``enable_gqa=`` from their keywords (0.33).
        attention_container: ``comfy.ldm.modules.attention.AttentionTensorContainer`` exists (q/k/v may come wrapped;
            ``wrap_attn`` unwraps them unless the override has a ``container_function``).
        set_model_optimized_attention: ``ModelPatcher.set_model_optimized_attention`` exists (core node
            ``ModelAttentionBackend`` writes the override through it).
        patcher_free_memory: ``ModelPatcher.get_free_memory`` exists (free memory under comfy-aimdo's dynamic VRAM).
        flux_txt_ids_dims: ``FluxParams`` has the ``txt_ids_dims`` field.
        wan_vae_cache_layers: the Wan VAE decodes two latent frames per step with a layer cache
            (``comfy.ldm.wan.vae.count_cache_layers``); it needs less working memory than 0.3.64's.

    A NamedTuple, not a dataclass: some test files load this module from its path without registering it in
    ``sys.modules``, which a dataclass needs.
    """

    version: str
    attention_kwargs: bool
    attention_container: bool
    set_model_optimized_attention: bool
    patcher_free_memory: bool
    flux_txt_ids_dims: bool
    wan_vae_cache_layers: bool


def detect_features() -> ComfyFeatures:
    """The features of the ComfyUI that :func:`setup_comfyui` made importable."""
    import comfy.ldm.flux.model as flux
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.wan.vae as wan_vae
    import comfy.model_patcher as model_patcher
    import comfyui_version

    patcher = model_patcher.ModelPatcher
    return ComfyFeatures(
        version=str(getattr(comfyui_version, "__version__", "unknown")),
        attention_kwargs="enable_gqa" in inspect.getsource(attention.attention_pytorch),
        attention_container=hasattr(attention, "AttentionTensorContainer"),
        set_model_optimized_attention=hasattr(patcher, "set_model_optimized_attention"),
        patcher_free_memory=hasattr(patcher, "get_free_memory"),
        flux_txt_ids_dims="txt_ids_dims" in {f.name for f in dataclasses.fields(flux.FluxParams)},
        wan_vae_cache_layers=hasattr(wan_vae, "count_cache_layers"),
    )


def load_core_nodes() -> None:
    """ComfyUI's built-in extra nodes (comfy_extras), once."""
    import nodes

    if "ModelSamplingSD3" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))


def make_custom_nodes_dir(base: str) -> str:
    """``base/custom_nodes/noflash`` → the repository root (a symlink); returns the pack path."""
    custom = os.path.join(base, "custom_nodes")
    os.makedirs(custom, exist_ok=True)
    link = os.path.join(custom, PACK_DIR_NAME)
    if not os.path.islink(link):
        os.symlink(REPO_ROOT, link)
    return link


def load_pack(base: str):
    """Load the pack exactly as ComfyUI loads a custom-node directory; returns the pack's module.

    ComfyUI imports ``custom_nodes/<dir>/__init__.py`` under a module name made from the directory path and
    registers what ``comfy_entrypoint`` lists in ``nodes.NODE_CLASS_MAPPINGS``. A process loads the pack once: a
    second copy (from another ``base``) would replace the node classes in ``NODE_CLASS_MAPPINGS`` with its own, whose
    telemetry the first copy's readers never see, so the copy already loaded is returned.
    """
    import nodes

    loaded = _loaded_pack()
    if loaded is not None:
        make_custom_nodes_dir(base)  # the server tests still want the link in their base
        return loaded
    pack_path = make_custom_nodes_dir(base)
    name = pack_path.replace(".", "_x_")
    if name not in sys.modules:
        ok = asyncio.run(nodes.load_custom_node(pack_path))
        if not ok:
            raise RuntimeError(f"ComfyUI refused to load the pack from {pack_path}")
    return sys.modules[name]


def _loaded_pack():
    """The pack module ComfyUI already loaded in this process (from any ``custom_nodes`` folder), or None."""
    init = os.path.realpath(os.path.join(REPO_ROOT, "__init__.py"))
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if "custom_nodes" in name and path and os.path.realpath(path) == init:
            return module
    return None


def pack_module(pack, dotted: str):
    """A submodule of the loaded pack, e.g. ``pack_module(pack, "noflash_core.comfy.telemetry")``; imported (as the
    pack's own copy) when the pack has not imported it yet, so that no test depends on which ran before it."""
    name = f"{pack.__name__}.{dotted}"
    if name not in sys.modules:
        importlib.import_module(name)
    return sys.modules[name]


def _random_state_dict(module: torch.nn.Module, seed: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in module.state_dict().items():
        if key.endswith(("norm.weight", "norm.scale", "norm_q.weight", "norm_k.weight", "key_norm.scale",
                         "query_norm.scale", "ln_q.weight", "ln_k.weight")):
            out[key] = torch.ones(t.shape, dtype=dtype)
        else:
            fan_in = max(1, t[0].numel()) if t.dim() >= 2 else 50
            out[key] = (torch.randn(t.shape, generator=g) / fan_in**0.5).to(dtype)
    return out


def tiny_wan_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """A Wan 2.1 T2V state dict that ComfyUI detects: dim 256 (2 heads of 128), ffn 512, 2 layers."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    with torch.device("meta"):
        model = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=256, ffn_dim=512,
                         freq_dim=256, text_dim=4096, out_dim=16, num_heads=2, num_layers=2,
                         operations=comfy.ops.disable_weight_init)
    return _random_state_dict(model, seed, dtype)


def tiny_flux_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """A Flux.1-dev state dict that ComfyUI detects. Detection fixes hidden 3072 / 24 heads / context 4096, so
    it is as small as that allows: one double block, no single blocks (about 0.8 GB in fp16)."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    extra = {}
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        extra["txt_ids_dims"] = []  # newer ComfyUI (0.33): what its detection gives Flux.1
    with torch.device("meta"):
        model = Flux(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                     mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0, axes_dim=[16, 56, 56],
                     theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                     operations=comfy.ops.disable_weight_init, **extra)
    return _random_state_dict(model, seed, dtype)


def tiny_sd3_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32, context_dim: int = 768,
                        adm_dim: int = 768):
    """An SD3-style MMDiT state dict ComfyUI detects: depth 2 (hidden 128, 2 heads of 64), 16 latent channels,
    text context ``context_dim`` wide and pooled vector ``adm_dim`` wide (768 each: a CLIP-L text encoder)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    with torch.device("meta"):
        model = MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2,
                      pos_embed_max_size=64, adm_in_channels=adm_dim,
                      context_embedder_config={"target": "torch.nn.Linear",
                                               "params": {"in_features": context_dim, "out_features": 128}},
                      operations=comfy.ops.disable_weight_init)
    return _random_state_dict(model, seed, dtype)


def save_state_dict(sd: Dict[str, torch.Tensor], path: str) -> str:
    import safetensors.torch

    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def wan_conditioning(batch: int = 1, tokens: int = 24, seed: int = 1) -> Tuple[list, list]:
    """(positive, negative) conditioning lists as a Wan text encoder would give them: ``(b, tokens, 4096)``."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(batch, tokens, 4096, generator=g) * 0.5
    neg = torch.randn(batch, tokens, 4096, generator=g) * 0.5
    return [[pos, {}]], [[neg, {}]]


def flux_conditioning(batch: int = 1, tokens: int = 16, seed: int = 2) -> Tuple[list, list]:
    """(positive, negative) for Flux: T5 ``(b, tokens, 4096)``, pooled CLIP ``(b, 768)``, guidance 3.5."""
    g = torch.Generator().manual_seed(seed)

    def one():
        return [[torch.randn(batch, tokens, 4096, generator=g) * 0.5,
                 {"pooled_output": torch.randn(batch, 768, generator=g) * 0.5, "guidance": 3.5}]]

    return one(), one()


def tiny_clip_l_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> Dict[str, torch.Tensor]:
    """A random CLIP-L text encoder state dict (ComfyUI's fixed SD1 config: 12 layers, width 768, ~123M params)
    for ``CLIPLoader`` with type ``stable_diffusion``: ``CLIPTextEncode`` then gives ``(1, 77, 768)`` plus a
    pooled ``(1, 768)`` output."""
    import comfy.sd1_clip

    with torch.device("meta"):
        model = comfy.sd1_clip.SDClipModel(device="meta")
    sd = _random_state_dict(model.transformer, seed, dtype)
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}
