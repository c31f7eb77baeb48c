"""Key -> base-module resolution tables: prefixes, diffusers <-> Wan names, kohya/LyCORIS underscores.

All mappings are data. ``strip_prefixes`` removes wrapper prefixes; ``diffusers_to_wan`` renames a
diffusers Wan module path to the original Wan path; ``underscore_map`` builds the forward map from
the base's own keys (``lora_unet_blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q``), because the
underscore encoding cannot be inverted (``self_attn`` itself holds an underscore).

Example:
    >>> diffusers_to_wan("blocks.3.attn1.to_out.0"), diffusers_to_wan("blocks.3.norm2")
    ('blocks.3.self_attn.o', 'blocks.3.norm3')
    >>> underscore_map(["blocks.0.self_attn.q.weight"])["lora_unet_blocks_0_self_attn_q"]
    'blocks.0.self_attn.q'
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["strip_prefixes", "DIFFUSERS_TO_WAN", "diffusers_to_wan", "underscore_map", "UNDERSCORE_PREFIXES"]

#: kohya/LyCORIS module prefixes resolved through the base's forward map
UNDERSCORE_PREFIXES = ("lora_unet_", "lycoris_")

#: (diffusers module-path regex, Wan replacement); first match wins, applied once per path
DIFFUSERS_TO_WAN: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])$", r"blocks.\1.self_attn.\2"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0$", r"blocks.\1.self_attn.o"),
    (r"^blocks\.(\d+)\.attn1\.norm_([qk])$", r"blocks.\1.self_attn.norm_\2"),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])$", r"blocks.\1.cross_attn.\2"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0$", r"blocks.\1.cross_attn.o"),
    (r"^blocks\.(\d+)\.attn2\.norm_([qk])$", r"blocks.\1.cross_attn.norm_\2"),
    (r"^blocks\.(\d+)\.attn2\.add_k_proj$", r"blocks.\1.cross_attn.k_img"),
    (r"^blocks\.(\d+)\.attn2\.add_v_proj$", r"blocks.\1.cross_attn.v_img"),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k$", r"blocks.\1.cross_attn.norm_k_img"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj$", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2$", r"blocks.\1.ffn.2"),
    (r"^blocks\.(\d+)\.norm2$", r"blocks.\1.norm3"),  # diffusers norm2 is Wan's affine norm3
    (r"^proj_out$", "head.head"),
    (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
    (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
    (r"^condition_embedder\.time_proj$", "time_projection.1"),
    (r"^condition_embedder\.image_embedder\.norm1$", "img_emb.proj.0"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj$", "img_emb.proj.1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2$", "img_emb.proj.3"),
    (r"^condition_embedder\.image_embedder\.norm2$", "img_emb.proj.4"),
))

#: diffusers parameter names that are bare parameters in Wan (no ``.weight``)
DIFFUSERS_PARAMS = {"scale_shift_table": "head.modulation"}
_BLOCK_SST = re.compile(r"^blocks\.(\d+)\.scale_shift_table$")


def strip_prefixes(key: str, prefixes: Iterable[str]) -> str:
    """Remove any of ``prefixes`` from the front of ``key``, repeatedly (longest listed first)."""
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def diffusers_to_wan(module: str) -> str:
    """Map a diffusers Wan module path to the original Wan path (unchanged when no rule applies)."""
    for pattern, repl in DIFFUSERS_TO_WAN:
        if pattern.match(module):
            return pattern.sub(repl, module)
    return module


def diffusers_param_to_wan(key: str) -> str:
    """Map a diffusers full parameter key (``blocks.0.scale_shift_table``) to its Wan key."""
    m = _BLOCK_SST.match(key)
    if m:
        return f"blocks.{m.group(1)}.modulation"
    if key in DIFFUSERS_PARAMS:
        return DIFFUSERS_PARAMS[key]
    module, _, param = key.rpartition(".")
    return f"{diffusers_to_wan(module)}.{param}" if module else key


def underscore_map(base_keys: Iterable[str]) -> dict[str, str]:
    """``<prefix><module with . -> _>`` -> module, for every module of the base and both prefixes."""
    out: dict[str, str] = {}
    for k in base_keys:
        module = k.rpartition(".")[0]
        if module:
            enc = module.replace(".", "_")
            for p in UNDERSCORE_PREFIXES:
                out.setdefault(p + enc, module)
    return out
