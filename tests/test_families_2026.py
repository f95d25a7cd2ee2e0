"""The VRAM probe's 2026 families: tokens per attention call against hand calculations.

Every expected number below is worked out by hand from the model's shape facts as ComfyUI 0.33 states them (the
file is named next to each case), not read from the table under test. ``estimate_run`` is what the probe node and
the CLI call, so these are the token counts a user sees.
"""

from __future__ import annotations

import pytest

from noflash_core.comfy.estimate import ENCODER_ATTRIBUTES, TEXT_ENCODER_CHOICES
from noflash_core.comfy.families import family_for_comfy_model
from noflash_core.video.encoders import get_encoder, get_vae
from noflash_core.video.families import attention_calls, family_names, get_family, latent_frames
from noflash_core.vram import estimate_run

_GIB = 1 << 30

# (family, width, height, frames, [(call, q_len, kv_len, heads, head_dim), ...])
_CASES = [
    # Wan 2.2 5B at 1280x704x121 (the example): (121-1)/4+1 = 31 latent frames, (704/16)/2 = 22 rows,
    # (1280/16)/2 = 40 columns: 31*22*40 = 27,280 tokens; UMT5 cross-attention to 512 tokens; 24 heads x 128.
    ("wan2.2-5b", 1280, 704, 121, [("self", 31 * 22 * 40, 31 * 22 * 40, 24, 128), ("cross", 27_280, 512, 24, 128)]),
    # LTX-2 (lightricks/av_model.py, latent_formats.LTXV): (121-1)/8+1 = 16 latent frames at /32 with patch 1:
    # 16 * 22 * 40 = 14,080 video tokens. Gemma 3 padded to 1024 tokens (text_encoders/lt.py). Audio: 16000 Hz /
    # hop 160 / 4 = 25 latents per second, at 25 fps that is 121/25*25 = 121 audio tokens. Video 32 x 128, audio
    # 32 x 64; the audio<->video calls run at the audio heads.
    ("ltx-2", 1280, 704, 121, [
        ("self", 14_080, 14_080, 32, 128), ("cross", 14_080, 1024, 32, 128),
        ("audio-to-video", 14_080, 121, 32, 64),
        ("audio self", 121, 121, 32, 64), ("audio cross", 121, 1024, 32, 64), ("video-to-audio", 121, 14_080, 32, 64),
    ]),
    # LTX-2.3: the same shapes at 768x512x97: (97-1)/8+1 = 13 frames, 16 x 24 -> 4,992 video tokens, 97 audio.
    ("ltx-2.3", 768, 512, 97, [
        ("self", 4992, 4992, 32, 128), ("cross", 4992, 1024, 32, 128), ("audio-to-video", 4992, 97, 32, 64),
        ("audio self", 97, 97, 32, 64), ("audio cross", 97, 1024, 32, 64), ("video-to-audio", 97, 4992, 32, 64),
    ]),
    # HunyuanVideo 1.5 (latent_formats.HunyuanVideo15: /16, /4; patch 1): 1280x720x121 -> 31 x 45 x 80 = 111,600
    # video tokens + 256 joint text tokens = 111,856; 2048 / 128 = 16 heads.
    ("hunyuanvideo-1.5", 1280, 720, 121, [("self", 111_600 + 256, 111_856, 16, 128)]),
    # Flux 2 dev (latent_formats.Flux2: 128 channels at /16, patch 1): 1024x1024 -> 64 x 64 = 4096 image tokens
    # + 512 text tokens (assumed) = 4608; 6144 / 128 = 48 heads.
    ("flux2-dev", 1024, 1024, 1, [("self", 4096 + 512, 4608, 48, 128)]),
    # Z-Image (Flux latent /8, patch 2, lumina2 dim 3840 / 30 heads): 1000x744 -> 125 x 93 latent -> 63 x 47 =
    # 2961 image tokens, padded to a multiple of 32: 2976; text 256 (already a multiple): 3232.
    ("z-image", 1000, 744, 1, [("self", 2976 + 256, 3232, 30, 128)]),
    # Qwen-Image-Edit (Wan 2.1 latent /8, patch 2): 1024x1024 -> 64 x 64 = 4096 tokens, one reference image at the
    # same size adds 4096, + 256 text = 8448; 24 heads x 128.
    ("qwen-image-edit", 1024, 1024, 1, [("self", 4096 + 4096 + 256, 8448, 24, 128)]),
    # Kandinsky 5 lite (HunyuanVideo latent /8, /4; patch 1x2x2; 1792 / (16+24+24) = 28 heads of 64): 768x512x121
    # -> 31 x 32 x 48 = 47,616 tokens; cross-attention to 256 text tokens.
    ("kandinsky5-lite", 768, 512, 121, [("self", 47_616, 47_616, 28, 64), ("cross", 47_616, 256, 28, 64)]),
    # Kandinsky 5 pro (4096 / (32+48+48) = 32 heads of 128) at 1280x704x121: 31 x 44 x 80 = 109,120.
    ("kandinsky5-pro", 1280, 704, 121, [("self", 109_120, 109_120, 32, 128), ("cross", 109_120, 256, 32, 128)]),
    # MiniMax H3 (nodes_minimax_h3.py): 121 frames snap up to 17k+5 = 124; latent frames (124-5)//17*5+2 = 37;
    # 1344x768 at /16 with patch 2 -> 42 x 24; video 37*24*42 = 37,296; audio round(124/24*40) = 207 steps x 2
    # stereo rows = 414; text 256: one packed sequence of 37,966; 56 heads x 128.
    ("minimax-h3", 1344, 768, 121, [("self", 37_296 + 414 + 256, 37_966, 56, 128)]),
    # Krea 2 (Wan 2.1 latent /8, patch 2, 6144 / 128 = 48 query heads): 1024x1024 -> 4096 + 256 text = 4352.
    ("krea2", 1024, 1024, 1, [("self", 4352, 4352, 48, 128)]),
]


@pytest.mark.parametrize("family, width, height, frames, expected", _CASES, ids=[c[0] for c in _CASES])
def test_tokens_per_attention_call(family, width, height, frames, expected):
    est = estimate_run(family, width, height, frames=frames, vram_bytes=256 * _GIB, device="cpu")
    got = [(a.name, a.q_len, a.kv_len, a.heads, a.head_dim) for a in est.denoise.attention]
    assert got == expected
    assert est.denoise.tokens_per_call == max(q for _, q, _, _, _ in expected)


def test_minimax_references_and_short_clips():
    fam = get_family("minimax-h3")
    # 5 frames is the shortest grid point: 2 latent frames; 17 frames snap to 22: (22-5)//17*5+2 = 7.
    assert latent_frames(fam, 5) == 2 and latent_frames(fam, 17) == 7 and latent_frames(fam, 22) == 7
    # One reference image adds one latent frame's tokens (24 x 42 = 1008) to the packed sequence.
    base, = attention_calls(fam, (37, 24, 42), 121)
    ref, = attention_calls(fam, (37, 24, 42), 121, reference_images=1)
    assert ref.tokens - base.tokens == 24 * 42


def test_gqa_and_new_encoders_from_comfy_configs():
    # comfy/text_encoders/llama.py: (layers, hidden, heads, kv heads, head dim, MLP)
    expected = {
        "gemma-3-12b": (48, 3840, 16, 8, 256, 15360),
        "qwen3-4b": (36, 2560, 32, 8, 128, 9728),
        "qwen3-vl-8b": (36, 4096, 32, 8, 128, 12288),
        "qwen3-vl-32b": (50, 5120, 64, 8, 128, 25600),
        "mistral-small-24b": (40, 5120, 32, 8, 128, 32768),
    }
    for key, shape in expected.items():
        e = get_encoder(key)
        assert (e.layers, e.width, e.heads, e.kv_heads, e.head_dim, e.ffn_dim) == shape
    # LTX-2's Gemma prompt is padded to 1024 tokens (lt.py min_length=1024), a short prompt included.
    assert get_encoder("gemma-3-12b").tokens(20) == (1, 1024)
    krea = get_family("krea2").stages[0]
    assert (krea.heads, krea.kv_heads) == (48, 12)
    assert get_vae("flux2").spatial == 8 and get_vae("hunyuanvideo-1.5").spatial == 16


def test_every_new_family_is_selectable_and_has_its_encoders():
    names = family_names()
    for key in ("ltx-2", "ltx-2.3", "hunyuanvideo-1.5", "flux2-dev", "z-image", "qwen-image-edit",
                "kandinsky5-lite", "kandinsky5-pro", "minimax-h3", "krea2"):
        assert key in names
        fam = get_family(key)
        for enc in fam.text_encoders:
            get_encoder(enc)
        get_vae(fam.vae)
        # A prompt-dependent text length is an assumption and says so (LTX-2's Gemma prompt is padded to 1024).
        assert key.startswith("ltx-2") or any("text tokens" in a for a in fam.assumed), key
    note = " ".join(estimate_run("krea2", 512, 512, device="cpu", text_encoders="none", vae="none").notes)
    assert "Krea 2: assumed 256 text tokens" in note
    assert get_family("LTX2").name == "ltx-2" and get_family("flux2").name == "flux2-dev"
    for attr in ("gemma3_12b", "qwen3_4b", "qwen3vl_4b", "qwen3vl_32b", "mistral3_24b"):
        assert ENCODER_ATTRIBUTES[attr] in TEXT_ENCODER_CHOICES


@pytest.mark.parametrize("class_name, config, family", [
    ("LTXAV", {"num_layers": 48, "attention_head_dim": 128}, "ltx-2"),
    ("LTXAV", {"cross_attention_adaln": True}, "ltx-2.3"),
    ("LTXV", {"num_layers": 48}, "ltxv-13b"),
    ("HunyuanVideo15", {"hidden_size": 2048}, "hunyuanvideo-1.5"),
    ("HunyuanVideo15_SR_Distilled", {}, "hunyuanvideo-1.5"),
    ("HunyuanVideo", {"vision_in_dim": None}, "hunyuanvideo"),
    ("HunyuanVideoI2V", {}, "hunyuanvideo"),
    ("Flux2", {"hidden_size": 6144}, "flux2-dev"),
    ("Flux2", {"hidden_size": 3072}, None),
    ("Flux", {"hidden_size": 3072}, "flux"),
    ("Lumina2", {"dim": 3840}, "z-image"),
    ("Lumina2", {"dim": 2304}, None),
    ("QwenImage", {}, "qwen-image"),
    ("QwenImage", {"default_ref_method": "index_timestep_zero"}, "qwen-image-edit"),
    ("Kandinsky5", {"model_dim": 1792}, "kandinsky5-lite"),
    ("Kandinsky5", {"model_dim": 4096}, "kandinsky5-pro"),
    ("Kandinsky5Image", {"model_dim": 2560}, None),
    ("MiniMaxH3", {}, "minimax-h3"),
    ("Krea2", {"heads": 48, "kvheads": 12}, "krea2"),
    ("WAN22", {"dim": 3072, "in_dim": 48}, "wan2.2-5b"),
])
def test_family_for_comfy_model(class_name, config, family):
    assert family_for_comfy_model(class_name, config) == family
