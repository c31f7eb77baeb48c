#!/usr/bin/env python
"""One-process LoRA merge into a Q8_0 GGUF: the way people do it today with the same libraries,
used as the benchmark baseline of ``distmerge merge --output x.gguf --dtype q8_0``.

1. load EVERY base tensor into one dict (``safe_open(...).get_tensor(k)`` for every key of every
   shard, as ``seed_merge.py`` does, but in the file's own order, ``offset_keys()``: the GGUF file
   keeps the checkpoint's tensor order, shard by shard);
2. load the whole LoRA (``torch.load`` of the ROLL ``.pth``, or ``load_file``);
3. for every tensor, in the base's order: its GGML type by city96's rules
   (``distmerge.plan.gguf.gguf_type(info, "Q8_0", from_gguf=False)``: block linears Q8_0, small,
   1-D and modulation tensors F32, the rest BF16 from a bf16 base); a LoRA target is merged in float32,
   ``W = W.float() + alpha * (B.float() @ A.float())`` (as ``seed_merge.py --math fp32``) and
   rounded once, by ``gguf.quants.quantize``, straight from float32 to its type; the base tensor is
   dropped from the dict as soon as its bytes are made (a careful script; the quantized bytes are
   held until the write, as ``GGUFWriter.add_tensor`` does);
4. ``GGUFWriter(OUT, "wan")`` with ``add_quantization_version(2)`` and ``add_file_type(7)``
   (``MOSTLY_Q8_0``), then ``write_header_to_file``, ``write_kv_data_to_file``,
   ``write_tensors_to_file``: one file, written by one process.

Peak memory is therefore at least the whole base (plus, by the end, the quantized output).
For the same inputs its file is byte-identical to distmerge's (``tests/test_bench_gguf.py``).

Example:
    python benchmarks/gguf_peer.py --base bench-out/base-... --lora bench-out/lora-....pth \\
        --output /tmp/merged.gguf --alpha 1.0
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (HERE, os.path.dirname(HERE)):  # seed_merge beside it; distmerge when not installed
    if _p not in sys.path:
        sys.path.insert(0, _p)

from seed_merge import A_SUFFIX, B_SUFFIX, PREFIX, base_files, load_lora  # noqa: E402

#: torch dtype -> the dtype code ``TensorInfo`` (and so ``gguf_type``) speaks
CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
QUANT_VERSION = 2  #: ``general.quantization_version`` (GGML_QUANT_VERSION)
FILE_TYPE_Q8_0 = 7  #: ``general.file_type`` = ``LlamaFileType.MOSTLY_Q8_0``


def load_base(base: str) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in one dict, in file order (shard by shard, by data offset)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in base_files(base):
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.offset_keys():
                state[k] = f.get_tensor(k)
    return state


def lora_pairs(lora: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{target weight key: (B, A)}`` of every ROLL pair (``base_model.model.X.lora_B.default.weight``)."""
    out = {}
    for b_key in [k for k in lora if k.endswith(B_SUFFIX)]:
        module = b_key[: -len(B_SUFFIX)]
        if module + A_SUFFIX in lora:
            target = (module[len(PREFIX) :] if module.startswith(PREFIX) else module) + ".weight"
            out[target] = (lora[b_key], lora[module + A_SUFFIX])
    return out


def ggml_type(key: str, w: torch.Tensor) -> str:
    """The GGML type of base tensor ``key`` in a Q8_0 file (city96's rules, as distmerge has them)."""
    from distmerge.inputs.header import TensorInfo
    from distmerge.plan.gguf import gguf_type

    info = TensorInfo(key, CODES[w.dtype], tuple(w.shape), "", 0, w.numel() * w.element_size())
    return gguf_type(info, "Q8_0", from_gguf=False)


def to_gguf(
    state: dict[str, torch.Tensor], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, out: str
) -> int:
    """Merge ``pairs`` into ``state`` (emptied as it goes) and write the GGUF file ``out``;
    return how many pairs were merged."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    writer = GGUFWriter(out, "wan")
    writer.add_quantization_version(QUANT_VERSION)
    writer.add_file_type(FILE_TYPE_Q8_0)
    merged = 0
    for key in list(state):
        w = state.pop(key)
        code = ggml_type(key, w)
        w32 = w.to(torch.float32)
        if key in pairs:
            b, a = pairs[key]
            w32 = w32 + alpha * (b.to(torch.float32) @ a.to(torch.float32))
            merged += 1
        qtype = GGMLQuantizationType[code]
        data = quantize(np.ascontiguousarray(w32.numpy()), qtype)
        writer.add_tensor(key, data, raw_dtype=qtype)  # byte rows: gguf-py recovers the shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="bf16 Wan base: folder (shards) or .safetensors file")
    p.add_argument("--lora", required=True, help="ROLL LoRA .pth (or .safetensors)")
    p.add_argument("--output", required=True, help="output .gguf FILE")
    p.add_argument("--alpha", type=float, default=1.0)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    state = load_base(args.base)
    n = len(state)
    t1 = time.perf_counter()
    lora = load_lora(args.lora)
    pairs = lora_pairs(lora)
    skipped = sum(k not in state for k in pairs)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    merged = to_gguf(state, pairs, args.alpha, args.output)
    t2 = time.perf_counter()
    print(
        f"gguf_peer (fp32 math, Q8_0): {n} tensors, {merged} pairs merged, {skipped} skipped; "
        f"load {t1 - t0:.2f}s merge+quantize+write {t2 - t1:.2f}s"
    )
    if merged == 0:
        print("gguf_peer: error: no LoRA pair matched the base", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
