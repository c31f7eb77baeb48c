"""Name tables: wrapper prefixes, diffusers <-> original Wan names, kohya/LyCORIS underscores.

All mappings are data and work in both directions. ``DIFFUSERS_WAN`` pairs a diffusers Wan module
path with the original Wan path (``{n}`` is a block number); ``diffusers_to_wan`` and
``wan_to_diffusers`` apply it either way, ``*_param_*`` do the same for full parameter keys
(diffusers' ``scale_shift_table`` is Wan's bare ``modulation``). ``underscore_map`` builds the
forward map from known module paths (``lora_unet_blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q``),
because the underscore encoding cannot be inverted (``self_attn`` itself holds an underscore).

Example:
    >>> diffusers_to_wan("blocks.3.attn1.to_out.0"), diffusers_to_wan("blocks.3.norm2")
    ('blocks.3.self_attn.o', 'blocks.3.norm3')
    >>> wan_to_diffusers("blocks.3.self_attn.o"), wan_param_to_diffusers("head.modulation")
    ('blocks.3.attn1.to_out.0', 'scale_shift_table')
    >>> underscore_map(["blocks.0.self_attn.q.weight"])["lora_unet_blocks_0_self_attn_q"]
    'blocks.0.self_attn.q'
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "DIFFUSERS_WAN",
    "DIFFUSERS_WAN_PARAMS",
    "UNDERSCORE_PREFIXES",
    "decode_wan_underscore",
    "diffusers_param_to_wan",
    "diffusers_to_wan",
    "strip_prefixes",
    "underscore_map",
    "wan_param_to_diffusers",
    "wan_to_diffusers",
]

#: kohya/LyCORIS module prefixes resolved through a forward map
UNDERSCORE_PREFIXES = ("lora_unet_", "lycoris_")

#: (diffusers module path, original Wan module path); ``{n}`` stands for a block number
DIFFUSERS_WAN: tuple[tuple[str, str], ...] = (
    ("blocks.{n}.attn1.to_q", "blocks.{n}.self_attn.q"),
    ("blocks.{n}.attn1.to_k", "blocks.{n}.self_attn.k"),
    ("blocks.{n}.attn1.to_v", "blocks.{n}.self_attn.v"),
    ("blocks.{n}.attn1.to_out.0", "blocks.{n}.self_attn.o"),
    ("blocks.{n}.attn1.norm_q", "blocks.{n}.self_attn.norm_q"),
    ("blocks.{n}.attn1.norm_k", "blocks.{n}.self_attn.norm_k"),
    ("blocks.{n}.attn2.to_q", "blocks.{n}.cross_attn.q"),
    ("blocks.{n}.attn2.to_k", "blocks.{n}.cross_attn.k"),
    ("blocks.{n}.attn2.to_v", "blocks.{n}.cross_attn.v"),
    ("blocks.{n}.attn2.to_out.0", "blocks.{n}.cross_attn.o"),
    ("blocks.{n}.attn2.norm_q", "blocks.{n}.cross_attn.norm_q"),
    ("blocks.{n}.attn2.norm_k", "blocks.{n}.cross_attn.norm_k"),
    ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    ("blocks.{n}.attn2.norm_added_k", "blocks.{n}.cross_attn.norm_k_img"),
    ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
    ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ("blocks.{n}.norm2", "blocks.{n}.norm3"),  # diffusers norm2 is Wan's affine norm3
    ("proj_out", "head.head"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
)

#: (diffusers parameter key, Wan parameter key) for parameters that are not ``<module>.<param>``
DIFFUSERS_WAN_PARAMS: tuple[tuple[str, str], ...] = (
    ("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
    ("scale_shift_table", "head.modulation"),
)


def _compile(pairs: tuple[tuple[str, str], ...], src: int) -> tuple[tuple[re.Pattern[str], str], ...]:
    """Regexes matching side ``src`` of each pair exactly, with the other side as the replacement."""

    def pattern(template: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)") + "$")

    return tuple((pattern(p[src]), p[1 - src].replace("{n}", r"\g<n>")) for p in pairs)


_MODULES = {"wan": _compile(DIFFUSERS_WAN, 0), "diffusers": _compile(DIFFUSERS_WAN, 1)}
_PARAMS = {"wan": _compile(DIFFUSERS_WAN_PARAMS, 0), "diffusers": _compile(DIFFUSERS_WAN_PARAMS, 1)}


def _rename(name: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, repl in rules:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return None


def strip_prefixes(key: str, prefixes: Iterable[str]) -> str:
    """Remove any of ``prefixes`` from the front of ``key``, repeatedly (longest listed first)."""
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def diffusers_to_wan(module: str) -> str:
    """A diffusers Wan module path as the original Wan path (unchanged when no rule applies)."""
    return _rename(module, _MODULES["wan"]) or module


def wan_to_diffusers(module: str) -> str:
    """An original Wan module path as the diffusers path (unchanged when no rule applies)."""
    return _rename(module, _MODULES["diffusers"]) or module


def _param(key: str, to: str) -> str:
    whole = _rename(key, _PARAMS[to])
    if whole is not None:
        return whole
    module, _, param = key.rpartition(".")
    if not module:
        return key
    return f"{(_rename(module, _MODULES[to]) or module)}.{param}"


def diffusers_param_to_wan(key: str) -> str:
    """A diffusers full parameter key (``blocks.0.scale_shift_table``) as its Wan key."""
    return _param(key, "wan")


def wan_param_to_diffusers(key: str) -> str:
    """An original Wan parameter key (``blocks.0.modulation``) as its diffusers key."""
    return _param(key, "diffusers")


_WAN_UNDERSCORE = tuple(
    (
        re.compile("^" + re.escape(w.replace(".", "_")).replace(re.escape("{n}"), r"(?P<n>\d+)") + "$"),
        w.replace("{n}", r"\g<n>"),
    )
    for _, w in DIFFUSERS_WAN
)


def decode_wan_underscore(name: str) -> str | None:
    """A kohya name (``lora_unet_`` or ``lycoris_`` prefix) read as one of the Wan module paths of
    ``DIFFUSERS_WAN``, whether or not a base has that module; ``None`` otherwise.

    >>> decode_wan_underscore("lora_unet_blocks_1_cross_attn_k_img")
    'blocks.1.cross_attn.k_img'
    """
    body = strip_prefixes(name, UNDERSCORE_PREFIXES)
    return _rename(body, _WAN_UNDERSCORE) if body != name else None


def underscore_map(keys: Iterable[str]) -> dict[str, str]:
    """``<prefix><module with . -> _>`` -> module, for every module of ``keys`` and both prefixes
    (the first module of an encoding wins)."""
    out: dict[str, str] = {}
    for k in keys:
        module = k.rpartition(".")[0]
        if module:
            enc = module.replace(".", "_")
            for p in UNDERSCORE_PREFIXES:
                out.setdefault(p + enc, module)
    return out
