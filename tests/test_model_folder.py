"""The output is a model folder (issue 12, part 2), judged the way users judge it: transformers and
PEFT open the merged folder and reproduce PEFT's own merge.

A tiny ``Qwen2ForCausalLM`` and a byte-level BPE fast tokenizer with a chat template are built
offline with fixed seeds and written with their own ``save_pretrained`` (transformers 5 writes
``config.json``, ``generation_config.json``, ``model.safetensors`` or ``model-0000k-of-0000N`` shards
+ ``model.safetensors.index.json``, ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja``); a model card and a licence are added by hand. A PEFT LoRA on all seven
projections (r=4, α=8, randomized: PEFT zero-inits ``lora_B``) is saved with ``save_pretrained``.

The contract checked here:

* When the base is a folder, every top-level regular file of it that is not a weight file is
  copied, byte for byte, into a folder output, in the same atomic publish as the shards. Not
  copied: weight files (``*.safetensors``, ``*.bin``, ``*.pth``, ``*.pt``, ``*.ckpt``), their
  indexes (``*.index.json``) and sidecars (``<weight>.crc32``/``.sha256``/``.distmerge.json``), a recipe
  (``distmerge.json``) left by an earlier distmerge run (the new run writes its own), hidden entries
  (``.gitattributes``, ``.git/``, ``.cache/``, distmerge's own part files) and sub-folders (a model
  folder's sub-folders are things like ``original/`` with unmerged weights in another format,
  ``onnx/``, ``.cache/huggingface/``; nothing a loader of this folder reads). Symlinked files (the
  Hugging Face cache's snapshot layout) are copied as regular files holding the target's bytes;
  copies are never links to the base's files.
* The recipe: ``distmerge.json`` in a folder output, and the same dict under the index's
  ``metadata["distmerge"]["recipe"]``: ``distmerge_version``, ``base.path``, ``loras`` (``path``,
  ``weight``, ``layout``), ``alpha``, ``dtype``.
* A single-file output (``….safetensors``) and a single-file base copy nothing from any folder; a
  single-file output's recipe is the sidecar ``<file>.distmerge.json``.
* A failed merge publishes nothing: no copied file appears, an existing output is left as it was.
* A base-folder file that cannot be read (a dangling symlink, e.g. a Hugging Face snapshot whose
  blob is gone) is a one-line ``DistmergeError`` naming it, never silently left out.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import distmerge
from distmerge.errors import DistmergeError, MatchError

from .helpers import tiny_llm_config

pytestmark = pytest.mark.ray

SENTENCE = "hello merged world, the model loads!"
CHAT = [{"role": "system", "content": "the merged model"}, {"role": "user", "content": "hello world"}]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MODEL_CARD = "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n\n# tiny-qwen2\n\nA test model.\n"
LICENSE = "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n"
SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
INDEX = "model.safetensors.index.json"
RECIPE = "distmerge.json"
ADAPTER = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}


# ------------------------------------------------------------------ building the inputs


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (Qwen2's kind, so ``Qwen2Tokenizer``, which AutoTokenizer picks for a
    ``qwen2`` config, reads it faithfully) trained on a fixed corpus, with a chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(
        ["hello world", "the merged model loads", "hello merged world", "user assistant system"] * 3, trainer
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _qwen(tok: PreTrainedTokenizerFast, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(**tiny_llm_config(vocab_size=320, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return Qwen2ForCausalLM(cfg).eval()


def _save_base(model, tok, folder: str, **save_kw) -> None:
    model.save_pretrained(folder, **save_kw)
    tok.save_pretrained(folder)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(MODEL_CARD)
    with open(os.path.join(folder, "LICENSE"), "w") as f:
        f.write(LICENSE)


def _randomize(peft_model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
                n += 1
    assert n == 2 * 2 * len(TARGETS), n  # A and B, 2 layers, 7 projections


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


class Case:
    """The inputs, built once per module and never written by a test."""


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Case:
    root = tmp_path_factory.mktemp("model_folder")
    c = Case()
    tok = _tokenizer()
    model = _qwen(tok)
    c.single = str(root / "base_single")  # config + model.safetensors (no index)
    c.sharded = str(root / "base_sharded")  # config + 5 shards + model.safetensors.index.json
    _save_base(model, tok, c.single)
    _save_base(model, tok, c.sharded, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(c.single, "model.safetensors"))
    assert not os.path.exists(os.path.join(c.single, INDEX))
    c.sharded_names = sorted(n for n in os.listdir(c.sharded) if SHARD.fullmatch(n))
    assert len(c.sharded_names) >= 3 and os.path.isfile(os.path.join(c.sharded, INDEX)), os.listdir(c.sharded)
    c.folder_files = {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "LICENSE",
    }
    for base in (c.single, c.sharded):
        present = {n for n in os.listdir(base) if not n.endswith((".safetensors", ".index.json"))}
        assert present == c.folder_files, present ^ c.folder_files  # what transformers 5 writes
    c.ids = torch.tensor([tok(SENTENCE).input_ids])
    c.expected_ids = tok(SENTENCE).input_ids
    c.base_logits = _logits(model, c.ids)
    pm = get_peft_model(model, LoraConfig(**ADAPTER))
    _randomize(pm, seed=1)
    c.adapter = str(root / "adapter")
    pm.save_pretrained(c.adapter)
    assert os.path.isfile(os.path.join(c.adapter, "adapter_model.safetensors"))
    merged = pm.merge_and_unload()
    c.ref_logits = _logits(merged, c.ids)
    c.ref_state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    assert not torch.allclose(c.ref_logits, c.base_logits, atol=1e-3)  # the adapter does something
    c.root = root
    return c


def _bad_adapter(case: Case, tmp_path, kind: str) -> str:
    """A copy of the adapter with one thing wrong."""
    d = str(tmp_path / f"adapter_{kind}")
    shutil.copytree(case.adapter, d)
    st = os.path.join(d, "adapter_model.safetensors")
    sd = load_file(st)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    if kind == "shape":  # in-features 40 against a [32, 32] base weight
        sd[f"{q}.lora_A.weight"] = torch.randn(4, 40)
    elif kind == "key":  # a module the base does not have
        ghost = "base_model.model.model.layers.0.self_attn.r_proj"
        sd[f"{ghost}.lora_A.weight"] = torch.randn(4, 32)
        sd[f"{ghost}.lora_B.weight"] = torch.randn(32, 4)
    elif kind == "nonfinite":  # shapes fine; the merged tensor is not finite (found by a task)
        b = sd[f"{q}.lora_B.weight"].clone()
        b[0, 0] = float("inf")
        sd[f"{q}.lora_B.weight"] = b
    else:
        raise AssertionError(kind)
    save_file(sd, st, metadata={"format": "pt"})
    return d


# ------------------------------------------------------------------ helpers for the checks


def _tree(folder: str) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) -> its bytes."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for f in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, folder)
            out[rel] = _read(p) if os.path.isfile(p) else b"<link to a folder>"
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _shards(out: str) -> list[str]:
    names = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    ms = [SHARD.fullmatch(n) for n in names]
    assert names and all(ms), names
    n = {m.group(2) for m in ms}
    assert len(n) == 1 and [int(m.group(1)) for m in ms] == list(range(1, int(n.pop()) + 1)), names
    return names


def _recipe(out: str) -> dict:
    path = os.path.join(out, RECIPE)
    assert os.path.isfile(path), f"no {RECIPE} in {sorted(os.listdir(out))}"
    with open(path, encoding="utf-8") as f:
        recipe = json.load(f)
    with open(os.path.join(out, INDEX), encoding="utf-8") as f:
        meta = json.load(f)["metadata"]
    assert meta.get("distmerge", {}).get("recipe") == recipe, (meta, recipe)
    return recipe


def _same_path(recorded: str, given: str) -> bool:
    return os.path.realpath(recorded) == os.path.realpath(given)


def _check_recipe(recipe: dict, *, base: str, lora: str, weight: float, alpha: float, dtypes: set) -> None:
    assert recipe["distmerge_version"] == distmerge.__version__, recipe
    assert _same_path(recipe["base"]["path"], base), (recipe["base"], base)
    assert len(recipe["loras"]) == 1, recipe["loras"]
    entry = recipe["loras"][0]
    recorded = os.path.realpath(entry["path"])  # the folder given, or the adapter file inside it
    assert recorded == os.path.realpath(lora) or os.path.dirname(recorded) == os.path.realpath(lora), entry
    assert entry["weight"] == weight and entry["layout"] == "peft", entry
    assert recipe["alpha"] == alpha, recipe
    assert recipe["dtype"] in dtypes, recipe["dtype"]


def _check_copies(base: str, out: str, names: set[str]) -> None:
    """Each name is a real copy: same bytes, a regular file, not a link to the base's file."""
    for n in sorted(names):
        src, dst = os.path.join(base, n), os.path.join(out, n)
        assert os.path.isfile(dst) and not os.path.islink(dst), f"{n}: not copied as a file"
        assert _read(dst) == _read(src), f"{n}: bytes differ from the base's"
        assert not os.path.samefile(dst, src), f"{n}: hard link to the base's file"


def _check_loads(case: Case, base: str, out: str, *, atol: float = 1e-5, **load_kw) -> None:
    model = AutoModelForCausalLM.from_pretrained(out, **load_kw)
    assert type(model) is Qwen2ForCausalLM, type(model)
    torch.testing.assert_close(_logits(model, case.ids), case.ref_logits, rtol=0, atol=atol)
    gen_out, gen_base = GenerationConfig.from_pretrained(out), GenerationConfig.from_pretrained(base)
    assert gen_out.to_dict() == gen_base.to_dict()
    assert model.generation_config.eos_token_id == gen_base.eos_token_id
    tok_out, tok_base = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(base)
    assert type(tok_out) is type(tok_base), (type(tok_out), type(tok_base))
    assert tok_out(SENTENCE).input_ids == tok_base(SENTENCE).input_ids == case.expected_ids
    assert tok_out.eos_token == "<|im_end|>" and tok_out.pad_token == "<|endoftext|>"
    assert tok_out.chat_template == CHAT_TEMPLATE
    text = tok_out.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == tok_base.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "hello world<|im_end|>" in text, text
    ids = tok_out.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert ids == tok_base(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize(
    "kind, weight, alpha, shard_size",
    [
        ("single", 1.0, 1.0, "5GB"),  # model.safetensors base -> one shard + index
        ("sharded", 0.5, 2.0, "20KB"),  # 5-shard base -> several output shards; 0.5 · 2 = PEFT's scale
    ],
)
def test_merged_folder_opens_with_transformers_and_matches_peft(
    case, tmp_path, ray_local, kind, weight, alpha, shard_size
):
    base = case.single if kind == "single" else case.sharded
    before = _tree(base)
    out = str(tmp_path / "merged")
    rep = distmerge.merge(base, [(case.adapter, weight)], out, alpha=alpha, max_shard_size=shard_size)
    assert rep.unmatched == []
    shards = _shards(out)
    assert (len(shards) > 1) == (kind == "sharded"), shards
    expected = case.folder_files | set(shards) | {INDEX, RECIPE}
    assert set(os.listdir(out)) == expected, set(os.listdir(out)) ^ expected  # no parts, temps, manifest
    with open(os.path.join(out, INDEX)) as f:
        assert set(json.load(f)["weight_map"].values()) == set(shards)
    _check_copies(base, out, case.folder_files)
    _check_recipe(_recipe(out), base=base, lora=case.adapter, weight=weight, alpha=alpha, dtypes={None, "keep"})
    _check_loads(case, base, out)
    assert _tree(base) == before  # the base is never written


def test_overwrite_replaces_copied_files_and_keeps_the_users(case, tmp_path, ray_local):
    """An earlier 5-shard result with a hand-edited config, a stale recipe and a user's file; a new
    merge with --overwrite: the base's files replace the old ones, the stale shards go, notes stay."""
    out = str(tmp_path / "merged")
    distmerge.merge(case.sharded, [case.adapter], out, max_shard_size="20KB")
    assert len(_shards(out)) > 1
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "note": "older config"}, f)
    with open(os.path.join(out, RECIPE), "w") as f:
        f.write('{"stale": true}')
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    distmerge.merge(case.single, [(case.adapter, 0.25)], out, alpha=4.0, overwrite=True)
    shards = _shards(out)
    assert shards == ["model-00001-of-00001.safetensors"], shards
    expected = case.folder_files | set(shards) | {INDEX, RECIPE, "notes.txt"}
    assert set(os.listdir(out)) == expected, set(os.listdir(out)) ^ expected
    _check_copies(case.single, out, case.folder_files)
    assert _read(os.path.join(out, "notes.txt")) == b"mine"
    _check_recipe(_recipe(out), base=case.single, lora=case.adapter, weight=0.25, alpha=4.0, dtypes={None, "keep"})
    _check_loads(case, case.single, out)


@pytest.mark.parametrize("bad, error", [("shape", MatchError), ("key", MatchError), ("nonfinite", DistmergeError)])
@pytest.mark.parametrize("state", ["absent", "earlier"])
def test_failed_merge_publishes_nothing(case, tmp_path, ray_local, bad, error, state):
    """Shape and key problems fail while planning, a non-finite merged value inside a task (after
    the part files exist): either way no copied file appears and an existing folder is unchanged."""
    lora = _bad_adapter(case, tmp_path, bad)
    out = str(tmp_path / "merged")
    if state == "earlier":  # a folder with an older config and a user's file
        os.makedirs(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "note": "older config"}, f)
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("mine")
    before = _tree(out) if state == "earlier" else None
    with pytest.raises(error) as ei:
        distmerge.merge(case.sharded, [lora], out, overwrite=state == "earlier", skip_unmatched=False)
    assert "\n" not in str(ei.value), str(ei.value)
    if state == "absent":
        assert not os.path.exists(out), _tree(out)
    else:
        assert _tree(out) == before, set(_tree(out)) ^ set(before)


def test_single_file_output_copies_nothing(case, tmp_path, ray_local):
    """``--output dir/merged.safetensors``: one file in a folder the user may share with other
    files, so no config or tokenizer lands next to it; its recipe is a ``<file>.distmerge.json``
    sidecar (like the checksum sidecar), which two single-file outputs in one folder never share."""
    out_dir = tmp_path / "outdir"
    out_dir.mkdir()
    out = str(out_dir / "merged.safetensors")
    distmerge.merge(case.sharded, [(case.adapter, 0.5)], out, alpha=2.0)
    names = ["merged.safetensors", "merged.safetensors.crc32", f"merged.safetensors.{RECIPE}"]
    assert sorted(os.listdir(out_dir)) == names, os.listdir(out_dir)
    with open(out + "." + RECIPE, encoding="utf-8") as f:
        _check_recipe(json.load(f), base=case.sharded, lora=case.adapter, weight=0.5, alpha=2.0, dtypes={None, "keep"})
    got = load_file(str(out_dir / "merged.safetensors"))
    assert set(got) == set(case.ref_state)
    for k, v in case.ref_state.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_single_file_base_copies_nothing(case, tmp_path, ray_local):
    """``--base folder/model.safetensors``: the user named one file, so nothing next to it is
    copied; the output folder still records its recipe."""
    base_file = os.path.join(case.single, "model.safetensors")
    out = str(tmp_path / "merged")
    distmerge.merge(base_file, [case.adapter], out)
    shards = _shards(out)
    assert set(os.listdir(out)) == set(shards) | {INDEX, RECIPE}, os.listdir(out)
    _check_recipe(_recipe(out), base=base_file, lora=case.adapter, weight=1.0, alpha=1.0, dtypes={None, "keep"})


def _busy_base(case: Case, tmp_path) -> tuple[str, set[str], set[str]]:
    """The sharded base plus what real model folders also hold: files to copy, weights and
    metadata that must not be copied, hidden entries and sub-folders. Returns (folder, copied,
    not copied)."""
    base = str(tmp_path / "busy_base")
    shutil.copytree(case.sharded, base)
    blobs = tmp_path / "blobs"  # the Hugging Face cache keeps files as blobs, snapshots link to them
    blobs.mkdir()
    (blobs / "b1").write_text('{"do_normalize": false, "processor_class": "Qwen2Processor"}\n')
    os.symlink(str(blobs / "b1"), os.path.join(base, "preprocessor_config.json"))
    extra_copied = {
        "special_tokens_map.json": b'{"eos_token": "<|im_end|>"}\n',
        "added_tokens.json": b'{"<|im_start|>": 1}\n',
        "tokenizer.model": bytes(range(256)) * 3,  # a binary non-weight file
        "NOTICE": b"tiny-qwen2 notice\n",
        "USE_POLICY.md": b"# use policy\n",
    }
    not_copied = {
        "consolidated.safetensors": None,  # Mistral repos: unmerged weights next to the shards
        "pytorch_model.bin": b"\x80\x02}q\x00.",  # older unmerged weights
        "pytorch_model.bin.index.json": b'{"metadata": {}, "weight_map": {}}',
        # sidecars of a weight file (a single-file distmerge result used as the base folder)
        "model.safetensors.crc32": b"00000000  model.safetensors\n",
        f"model.safetensors.{RECIPE}": b'{"note": "describes model.safetensors, which is not copied"}\n',
        RECIPE: b'{"distmerge_version": "0.0.1", "note": "from the merge that made this base"}\n',
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        ".git/HEAD": b"ref: refs/heads/main\n",
        ".cache/huggingface/download/config.json.metadata": b"abc\n",
        ".model-00001-of-00005.safetensors.distmerge-part": b"junk",
        "original/params.json": b'{"dim": 32}\n',
        "tokenizer/tokenizer_config.json": b"{}\n",
    }
    for name, data in {**extra_copied, **not_copied}.items():
        p = os.path.join(base, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if name == "consolidated.safetensors":
            save_file({"w": torch.zeros(2)}, p)
        else:
            with open(p, "wb") as f:
                f.write(data)
    return base, case.folder_files | set(extra_copied) | {"preprocessor_config.json"}, set(not_copied)


def test_what_is_copied_from_the_base_folder(case, tmp_path, ray_local):
    base, copied, not_copied = _busy_base(case, tmp_path)
    out = str(tmp_path / "merged")
    rep = distmerge.merge(base, [case.adapter], out)
    skipped = {s["name"] for s in rep.files_skipped}  # listed, hidden ones too (README: "listed")
    assert {".gitattributes", ".git/", ".cache/", ".model-00001-of-00005.safetensors.distmerge-part"} <= skipped, (
        skipped
    )
    assert {"original/", "tokenizer/", "pytorch_model.bin"} <= skipped, skipped
    shards = _shards(out)
    expected = copied | set(shards) | {INDEX, RECIPE}
    assert set(os.listdir(out)) == expected, set(os.listdir(out)) ^ expected
    _check_copies(base, out, copied)  # the symlinked preprocessor config arrives as a regular file
    tree = _tree(out)
    assert (not_copied - {RECIPE}).isdisjoint(tree), not_copied & set(tree)
    assert b"from the merge that made this base" not in tree[RECIPE]  # a new recipe, not the base's
    recipe = _recipe(out)  # this run's recipe, not the base's
    assert "note" not in recipe and _read(os.path.join(out, RECIPE)) != _read(os.path.join(base, RECIPE))
    _check_recipe(recipe, base=base, lora=case.adapter, weight=1.0, alpha=1.0, dtypes={None, "keep"})
    _check_loads(case, base, out)


@pytest.mark.parametrize("how", ["dangling_symlink", "fifo"])
def test_unreadable_base_file_fails_naming_it(case, tmp_path, ray_local, how):
    """A model-card link into a blob that never finished downloading, or a named pipe where a file
    should be: an error naming it (a loader would miss the file), never a silent skip."""
    base = str(tmp_path / "base")
    shutil.copytree(case.sharded, base)
    card = os.path.join(base, "README.md")
    os.remove(card)
    if how == "dangling_symlink":
        os.symlink(str(tmp_path / "blobs" / "missing"), card)
    else:
        os.mkfifo(card)
    out = str(tmp_path / "merged")
    with pytest.raises(DistmergeError) as ei:
        distmerge.merge(base, [case.adapter], out)
    msg = str(ei.value)
    assert "README.md" in msg and "\n" not in msg, msg
    assert not os.path.exists(out), _tree(out)


def test_bf16_merge_loads_and_says_its_dtype(case, tmp_path, ray_local):
    """``dtype="bf16"``: bf16 shards, and ``config.json`` copied with its ``dtype`` set to
    bfloat16 (as transformers' own ``save_pretrained`` of a bf16 model writes it), so a plain
    ``from_pretrained`` builds a bf16 model, not a float32 one twice the size."""
    out = str(tmp_path / "merged")
    distmerge.merge(case.single, [case.adapter], out, dtype="bf16")
    shards = _shards(out)
    assert set(os.listdir(out)) == case.folder_files | set(shards) | {INDEX, RECIPE}
    _check_copies(case.single, out, case.folder_files - {"config.json"})
    _check_recipe(
        _recipe(out),
        base=case.single,
        lora=case.adapter,
        weight=1.0,
        alpha=1.0,
        dtypes={"bf16", "bfloat16", "torch.bfloat16"},
    )
    base_cfg = json.loads(_read(os.path.join(case.single, "config.json")))
    out_cfg = json.loads(_read(os.path.join(out, "config.json")))
    assert base_cfg["dtype"] == "float32" and out_cfg == {**base_cfg, "dtype": "bfloat16"}
    tensors = {}
    for s in shards:
        tensors.update(load_file(os.path.join(out, s)))
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    for k, v in case.ref_state.items():  # one rounding of PEFT's fp32 merge, within 1 bf16 ulp
        torch.testing.assert_close(
            tensors[k].float(), v.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    assert all(torch.equal(sd[k], tensors[k]) for k in tensors)  # transformers read exactly those bytes
    default = AutoModelForCausalLM.from_pretrained(out, dtype="auto")  # dtype from config.json
    assert default.dtype == torch.bfloat16
    got = _logits(default.float(), case.ids)
    err = (got - case.ref_logits).abs().max().item()
    assert err < 5e-2 * case.ref_logits.abs().max().item(), err  # bf16 weights, fp32 compute
