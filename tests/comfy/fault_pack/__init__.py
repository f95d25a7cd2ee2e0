"""A test-only ComfyUI custom-node pack: fault injection and inspection for ``tests/comfy/test_comfyui_faults.py``.

The server under test loads it next to the NoFlash pack (``custom_nodes/noflash_faults``). Its nodes sit in a
prompt like any other node and act while ComfyUI runs the prompt, in the server's own process:

- ``NoFlashTestHoldSampling`` (MODEL → MODEL): on the sampling step ``hold_step`` it records what is patched, then
  waits until the prompt is interrupted (``POST /interrupt``) and raises ComfyUI's own interrupt exception there,
  so the cancel lands in the middle of sampling, deterministically.
- ``NoFlashTestHoldEncode`` (CLIP → CLIP): the same inside the text encoder's first attention module, i.e. in the
  middle of a (patched) encode.
- ``NoFlashTestMemoryCap`` (MODEL → MODEL): every attention override call of the model runs under a dispatch mode
  that raises ``torch.OutOfMemoryError`` for any tensor larger than ``cap_kib`` KiB, as an allocator at its limit
  would.
- ``NoFlashTestInspect`` (MODEL → MODEL): records, on the first sampling step, the attention override the model
  carries and whether torch's SDPA is patched.

``GET /noflash_test/state`` returns what was recorded (and the live state of the text encoders' attention
modules and of ``torch.nn.functional.scaled_dot_product_attention``); ``POST /noflash_test/reset`` clears it.
Nothing here is imported by the project.
"""

from __future__ import annotations

import threading
import time

import comfy.model_management as mm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

_LOCK = threading.Lock()
STATE = {"events": [], "clips": []}
_SDPA_AT_LOAD = F.scaled_dot_product_attention
_HOLD_SECONDS = 120


def _event(kind: str, **data) -> None:
    with _LOCK:
        STATE["events"].append({"kind": kind, "time": time.time(), **data})


def _hold_until_interrupted(where: str) -> None:
    """Wait (bounded) for ``/interrupt``, then raise ComfyUI's interrupt exception from here."""
    _event("holding", where=where)
    deadline = time.time() + _HOLD_SECONDS
    while not mm.processing_interrupted() and time.time() < deadline:
        time.sleep(0.05)
    mm.throw_exception_if_processing_interrupted()
    raise RuntimeError(f"noflash fault pack: no interrupt arrived within {_HOLD_SECONDS} s at {where}")


def _override_name(model_options) -> str:
    override = model_options.get("transformer_options", {}).get("optimized_attention_override")
    return "" if override is None else getattr(override, "__name__", type(override).__name__)


def _attention_modules(root):
    return [m for _, m in root.named_modules() if type(m).__name__.endswith("Attention")]


def _routed_forwards(root) -> int:
    """How many attention modules of a text encoder carry an instance ``forward`` (the CLIP Patcher's routing)."""
    return sum("forward" in m.__dict__ for m in _attention_modules(root))


def _node(port: str, inputs: dict, run):
    """A V1 node class around ``run(**inputs) -> output``."""
    return type(run.__name__, (), {
        "CATEGORY": "noflash_test", "RETURN_TYPES": (port,), "FUNCTION": "run",
        "INPUT_TYPES": classmethod(lambda cls: {"required": inputs}),
        "run": lambda self, **kwargs: (run(**kwargs),),
    })


def hold_sampling(model, hold_step):
    m = model.clone()
    counter = {"step": 0}

    def wrapper(apply_model, args):
        if counter["step"] == hold_step:
            _event("sampling", override=_override_name(m.model_options),
                   sdpa_patched=F.scaled_dot_product_attention is not _SDPA_AT_LOAD)
            _hold_until_interrupted("sampling")
        counter["step"] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    return m


def hold_encode(clip):
    root = clip.cond_stage_model
    with _LOCK:
        if not any(r is root for r in STATE["clips"]):
            STATE["clips"].append(root)
    first = _attention_modules(root)[0]
    handle = None

    def hook(module, args):
        handle.remove()  # one shot: the shared module keeps no hook after this encode
        _event("encode", routed=_routed_forwards(root), modules=len(_attention_modules(root)))
        _hold_until_interrupted("encode")

    handle = first.register_forward_pre_hook(hook)
    return clip


class _CapMode(TorchDispatchMode):
    def __init__(self, cap_bytes: int) -> None:
        super().__init__()
        self.cap_bytes = cap_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results allocate nothing (their storage is an input's); a fresh tensor over the cap is
        # what an allocator at its limit refuses.
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs
                    and t.numel() * t.element_size() > self.cap_bytes):
                with _LOCK:
                    STATE.setdefault("ooms", 0)
                    STATE["ooms"] += 1
                raise torch.OutOfMemoryError(
                    f"fault pack: {func} wanted {t.numel() * t.element_size()} bytes over the cap of "
                    f"{self.cap_bytes}")
        return out


def memory_cap(model, cap_kib):
    m = model.clone()
    options = m.model_options.setdefault("transformer_options", {})
    inner = options["optimized_attention_override"]

    def capped(func, *args, **kwargs):
        with _CapMode(cap_kib * 1024):
            return inner(func, *args, **kwargs)

    options["optimized_attention_override"] = capped
    return m


def inspect(model, label):
    m = model.clone()
    seen = {"done": False}

    def wrapper(apply_model, args):
        if not seen["done"]:
            seen["done"] = True
            options = args["c"].get("transformer_options", {})
            _event("inspect", label=label, override=_override_name({"transformer_options": options}),
                   sdpa_patched=F.scaled_dot_product_attention is not _SDPA_AT_LOAD)
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(wrapper)
    return m


NODE_CLASS_MAPPINGS = {
    "NoFlashTestHoldSampling": _node("MODEL", {"model": ("MODEL",), "hold_step": ("INT", {"default": 1, "min": 0})},
                                     hold_sampling),
    "NoFlashTestHoldEncode": _node("CLIP", {"clip": ("CLIP",)}, hold_encode),
    "NoFlashTestMemoryCap": _node("MODEL", {"model": ("MODEL",), "cap_kib": ("INT", {"default": 1024, "min": 1})},
                                  memory_cap),
    "NoFlashTestInspect": _node("MODEL", {"model": ("MODEL",), "label": ("STRING", {"default": "run"})}, inspect),
}


def _register_routes() -> None:
    from aiohttp import web
    from server import PromptServer

    routes = PromptServer.instance.routes

    @routes.get("/noflash_test/state")
    async def state(request):
        with _LOCK:
            clips = [_routed_forwards(root) for root in STATE["clips"]]
            body = {"events": list(STATE["events"]), "ooms": STATE.get("ooms", 0), "clip_routed_now": clips,
                    "sdpa_patched_now": F.scaled_dot_product_attention is not _SDPA_AT_LOAD}
        return web.json_response(body)

    @routes.post("/noflash_test/reset")
    async def reset(request):
        with _LOCK:
            STATE["events"].clear()
            STATE["ooms"] = 0
        return web.json_response({"ok": True})


_register_routes()
