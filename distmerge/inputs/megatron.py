"""Find and read a Megatron LoRA checkpoint as ROLL's ``mcore_adapter`` writes it.

::

    checkpoint-<step>/                       the root: mca_config.json, tokenizer, one folder per adapter
      <adapter>/                             adapter_config.json, mca_config.json, latest_checkpointed_iteration.txt
        iter_0000001/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt     {"model": {key: tensor}}
      iter_…/optimizer.pt, rng_state/ …      training state: never read

``--lora`` may name the root (when it holds one adapter), the adapter folder or the ``iter_…`` folder.
Every rank file the parallel sizes in ``mca_config.json`` call for must be there, and no other; the
tensors that tensor parallelism replicates (and the dense tensors every expert-parallel rank
repeats) must be identical. Only this module reads the rank files' contents in the driver; tasks
read the factors they need (``lorafile.LoraReader``).

Example:
    >>> find_adapter("/nonexistent") is None
    True
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from distmerge.errors import FormatError

__all__ = ["MegatronConfig", "RankFile", "MegatronCheckpoint", "find_adapter", "open_megatron", "RANK_FILE"]

RANK_FILE = "model_optim_rng.pt"
_ITER = re.compile(r"^iter_(\d+)$")
_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?(?:_(\d+))?$")
#: rank-file key suffixes whose tensor every tensor-parallel rank holds whole (the input side of a
#: column-parallel layer, the output side of a row-parallel one)
TP_REPLICATED = re.compile(
    r"(?:linear_qkv|linear_fc1)\.lora_A\.weight\d*$|(?:linear_proj|linear_fc2)\.lora_B\.weight\d*$"
)


#: mca_config.json keys that must keep these values (even, non-virtual pipeline stages)
_EVEN_STAGES: dict[str, tuple[object, ...]] = {
    "virtual_pipeline_model_parallel_size": (None, 1),
    "num_layers_in_first_pipeline_stage": (None,),
    "num_layers_in_last_pipeline_stage": (None,),
    "pipeline_model_parallel_layout": (None,),
}


@dataclass(frozen=True)
class MegatronConfig:
    """What ``mca_config.json`` says about the model and its parallel split."""

    tp: int
    pp: int
    ep: int
    num_layers: int
    hidden: int
    heads: int
    groups: int
    kv_channels: int
    experts: int  #: 0 for a dense model
    topk: int
    model_type: str  #: ``hf_model_type`` (``qwen3``, ``qwen3_moe``, ``llama`` …)

    @classmethod
    def read(cls, path: str) -> MegatronConfig:
        cfg = _read_json(path)

        def num(key: str, default: int | None = None) -> int:
            v = cfg.get(key, default)
            if v is None:
                v = default
            if not isinstance(v, int) or v < 0:
                raise FormatError(f"{path}: '{key}' should be a whole number, found {v!r}")
            return v

        for key, plain in _EVEN_STAGES.items():
            if cfg.get(key) not in plain:
                raise FormatError(
                    f"{path}: '{key}' = {cfg.get(key)!r}: uneven or virtual pipeline stages are not supported"
                )
        tp = num("tensor_model_parallel_size", 1) or 1
        etp = cfg.get("expert_tensor_parallel_size")
        if etp not in (None, tp):
            raise FormatError(
                f"{path}: expert_tensor_parallel_size {etp} differs from tensor_model_parallel_size {tp}: not supported"
            )
        heads = num("num_attention_heads")
        return cls(
            tp=tp,
            pp=num("pipeline_model_parallel_size", 1) or 1,
            ep=num("expert_model_parallel_size", 1) or 1,
            num_layers=num("num_layers"),
            hidden=num("hidden_size"),
            heads=heads,
            groups=num("num_query_groups", heads) or heads,
            kv_channels=num("kv_channels", num("hidden_size") // max(1, heads)),
            experts=num("num_moe_experts", 0),
            topk=num("moe_router_topk", 1) or 1,
            model_type=str(cfg.get("hf_model_type") or ""),
        )


@dataclass
class RankFile:
    """One ``model_optim_rng.pt``: its tensor/pipeline/expert ranks and its tensors (key -> meta)."""

    tp: int
    pp: int
    ep: int
    path: str
    tensors: dict[str, Any] = field(default_factory=dict)  #: key -> ``TensorMeta``


@dataclass
class MegatronCheckpoint:
    path: str  #: the adapter folder
    name: str  #: the adapter's name (its folder name)
    iteration: str  #: the ``iter_…`` folder read
    adapter_config: dict[str, Any]
    config: MegatronConfig
    files: list[RankFile]
    adapters: list[str]  #: every adapter of the checkpoint root (for inspect)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes or 0 for f in self.files for m in f.tensors.values())


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return obj


def _is_adapter(path: str) -> bool:
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return False
    return os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")) or any(
        _ITER.match(n) and os.path.isdir(os.path.join(path, n)) for n in os.listdir(path)
    )


def find_adapter(path: str) -> tuple[str, str | None, list[str]] | None:
    """(adapter folder, the ``iter_…`` folder if ``path`` named one, every adapter of the root) when
    ``path`` is a Megatron checkpoint; None when it is not one.

    Raises:
        FormatError: a root holding several adapters (naming them).
    """
    if not os.path.isdir(path):
        return None
    path = os.path.normpath(path)
    name = os.path.basename(path)
    if _ITER.match(name) and any(_RANK_DIR.match(n) for n in os.listdir(path)):
        parent = os.path.dirname(path)
        return parent, name, [os.path.basename(parent)]
    if _is_adapter(path):
        return path, None, [name]
    subs = sorted(
        n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)) and _is_adapter(os.path.join(path, n))
    )
    if len(subs) == 1:
        return os.path.join(path, subs[0]), None, subs
    if len(subs) > 1:
        raise FormatError(
            f"{path}: this checkpoint holds {len(subs)} LoRA adapters ({', '.join(subs)}); choose one: "
            f"--lora {os.path.join(path, subs[0])}"
        )
    return None


def _iteration(adapter: str, chosen: str | None) -> str:
    if chosen is not None:
        return chosen
    latest = os.path.join(adapter, "latest_checkpointed_iteration.txt")
    iters = sorted(n for n in os.listdir(adapter) if _ITER.match(n))
    if os.path.isfile(latest):
        text = open(latest, encoding="utf-8").read().strip()
        name = f"iter_{int(text):07d}" if text.isdigit() else text
        if name not in iters:
            raise FormatError(f"{latest}: names iteration '{text}' but there is no {name}/ in {adapter}")
        return name
    if len(iters) != 1:
        raise FormatError(f"{adapter}: {len(iters)} iter_* folders and no latest_checkpointed_iteration.txt; pass one")
    return iters[0]


def rank_dir(cfg: MegatronConfig, tp: int, pp: int, ep: int) -> str:
    """``mp_rank_TT[_PPP][_EEE]`` as Megatron names it.

    >>> rank_dir(MegatronConfig(2, 2, 2, 4, 8, 2, 2, 4, 4, 2, "qwen3_moe"), 1, 0, 1)
    'mp_rank_01_000_001'
    """
    return f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if cfg.pp > 1 else "") + (f"_{ep:03d}" if cfg.ep > 1 else "")


def open_megatron(path: str) -> MegatronCheckpoint | None:
    """Read a Megatron checkpoint's configs and every rank file's table of contents, and check the
    replicated tensors; None when ``path`` is not a Megatron checkpoint."""
    found = find_adapter(path)
    if found is None:
        return None
    adapter, chosen, adapters = found
    acfg = _read_json(os.path.join(adapter, "adapter_config.json"))
    mca = os.path.join(adapter, "mca_config.json")
    if not os.path.isfile(mca):
        mca = os.path.join(os.path.dirname(adapter), "mca_config.json")
    if not os.path.isfile(mca):
        raise FormatError(f"{adapter}: a Megatron checkpoint without mca_config.json (looked beside it and above)")
    cfg = MegatronConfig.read(mca)
    iteration = _iteration(adapter, chosen)
    where = os.path.join(adapter, iteration)
    expected = {rank_dir(cfg, t, p, e): (t, p, e) for t in range(cfg.tp) for p in range(cfg.pp) for e in range(cfg.ep)}
    present = sorted(n for n in os.listdir(where) if _RANK_DIR.match(n))
    extra = [n for n in present if n not in expected]
    if extra:
        raise FormatError(
            f"{where}: rank folder {extra[0]} is not one of the TP {cfg.tp} x PP {cfg.pp} x EP {cfg.ep} ranks "
            f"{os.path.basename(mca)} describes"
        )
    files = []
    replicas = _Replicas()
    for name, (t, p, e) in expected.items():
        file = os.path.join(where, name, RANK_FILE)
        if not os.path.isfile(file):
            raise FormatError(f"{file}: missing: TP {cfg.tp} x PP {cfg.pp} x EP {cfg.ep} needs every rank's file")
        f = RankFile(t, p, e, file)
        f.tensors = replicas.read(f)
        files.append(f)
    return MegatronCheckpoint(adapter, os.path.basename(adapter), iteration, acfg, cfg, files, adapters)


class _Replicas:
    """Reads each rank file once (mapped): its table of contents, and its copies of the tensors
    tensor parallelism replicates (and the dense tensors every expert-parallel rank repeats),
    which must equal the first file's copy."""

    def __init__(self) -> None:
        self.first: dict[tuple[Any, ...], tuple[str, Any]] = {}

    def read(self, f: RankFile) -> dict[str, Any]:
        from distmerge.inputs.lorafile import TensorMeta, load_pickle
        from distmerge.inputs.torch_dtypes import code_of

        sd = load_pickle(f.path)
        for key, value in sd.items():
            self._compare(f, key, value)
        return {
            k: TensorMeta(code_of(v.dtype), tuple(v.shape), -1, v.numel() * v.element_size()) for k, v in sd.items()
        }

    def _compare(self, f: RankFile, key: str, value: Any) -> None:
        import torch

        if TP_REPLICATED.search(key):  # across TP ranks (and EP ranks too for a dense tensor)
            group: tuple[Any, ...] = (f.pp, f.ep if ".experts." in key else -1, key)
        elif ".experts." not in key:  # a dense tensor: across EP ranks
            group = (f.pp, f.tp, key)
        else:
            return
        seen = self.first.setdefault(group, (f.path, value))
        if seen[1] is not value and not (seen[1].shape == value.shape and torch.equal(seen[1], value)):
            raise FormatError(
                f"{f.path}: '{key}' differs from the copy in {seen[0]}; the replicated shards of a "
                "Megatron checkpoint must be identical (a damaged or mixed checkpoint)"
            )
