"""The attention calls of one video run, as tuning signatures.

``python -m noflash_core.tune --model wan2.2-5b --width 1280 --height 704 --frames 121`` tunes exactly the calls
the video planner says that run makes: the diffusion model's self- and cross-attention, the text encoders' and
the VAE's attention. All shapes come from the estimator's public result; :func:`_estimate` is the one place that
knows where the estimator lives.
"""

from __future__ import annotations

from typing import List, Tuple

from .signature import Signature

__all__ = ["workflow_signatures"]

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "float16": "float16",
           "bfloat16": "bfloat16", "float32": "float32"}


def _estimate(model: str, width: int, height: int, frames: int, batch: int, dtype: str, prompt_tokens: int):
    """The estimator's run estimate, and a function giving a text encoder's mask kind (``"causal"``, ``"bias"``,
    ``"none"``) by name."""
    from ..video.encoders import get_encoder
    from ..vram import estimate_run

    run = estimate_run(model, width, height, frames, batch, dtype, device="cpu", prompt_tokens=prompt_tokens)
    return run, lambda name: get_encoder(name).mask


def workflow_signatures(model: str, width: int, height: int, frames: int = 1, *, batch: int = 1,
                        dtype: str = "fp16", prompt_tokens: int = 256) -> List[Tuple[str, Signature]]:
    """``(label, signature)`` of every distinct attention call of the run (forward only, as in sampling).

    Text encoders compute in fp32 in ComfyUI and pass a float mask (T5's position bias, CLIP's causal mask); the
    VAE's attention is one head over the latent's pixels in the VAE's dtype.
    """
    run, encoder_mask = _estimate(model, width, height, frames, batch, dtype, prompt_tokens)
    dt = _DTYPES.get(str(run.dtype), str(run.dtype))
    out: List[Tuple[str, Signature]] = []
    for a in run.denoise.attention:
        out.append((f"{run.model} {a.name}", Signature(dt, a.batch * a.heads, 1, a.q_len, a.kv_len, a.head_dim,
                                                        a.head_dim)))
    for t in run.text_encoders:
        mask = "none" if encoder_mask(t.name) == "none" else "float"
        out.append((f"{t.name} text encoder", Signature("float32", t.batch * t.heads, 1, t.tokens, t.tokens,
                                                        t.head_dim, t.head_dim, mask)))
    if run.vae is not None:
        v = run.vae
        vdt = _DTYPES.get(str(v.dtype), str(v.dtype))
        out.append((f"{v.name} VAE", Signature(vdt, 1, 1, v.tokens, v.tokens, v.channels, v.channels)))
    seen, unique = set(), []
    for label, sig in out:
        if sig.key() not in seen:
            seen.add(sig.key())
            unique.append((label, sig))
    return unique
