"""The command line's grammar: every subcommand's flags, built without importing torch or Ray.

The merge options come from ``options.MergeOptions`` (one declaration for the flags, the job-file
schema and ``merge()``'s keywords); ``--base``/``--lora``/``--weight`` are shared by ``merge`` and
``verify``. ``build_parser()`` is all ``distmerge --help`` needs.

Example:
    >>> a = build_parser().parse_args(["merge", "--base", "b", "--lora", "l.pth", "-o", "out", "--dtype", "bf16"])
    >>> a.command, a.lora, a.output, a.dtype, a.alpha, a.num_workers
    ('merge', ['l.pth'], 'out', 'bf16', 1.0, None)
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any, NoReturn

from distmerge import __version__
from distmerge.app.options import flag_of, meta_of, option_fields
from distmerge.plan.extract_plan import LAYOUTS, OUT_DTYPES

__all__ = ["build_parser", "add_verify_parser", "add_run_parser", "add_extract_parser", "add_merge_flags"]

_BASE_FLAGS = ("--base", "--base_model_path", "--base-model-path")
_TYPES: dict[str, Any] = {"float": float, "int": int}
#: the Ray options ``verify`` and ``run`` take, in their ``--help`` order
_RAY_OPTIONS = ("address", "num_workers", "num_cpus")
#: the ``MergeOptions`` fields ``extract`` takes too, in its ``--help`` order
_EXTRACT_OPTIONS = ("resume", "overwrite", "report", "num_workers", "address", "device", "num_cpus", "max_retries")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (``distmerge: error: …``, exit 2) like every
    other error, instead of the usage block followed by the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"distmerge: error: {self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """A mistyped long option is named, with the nearest real one, before argparse would
        report some other option as missing (``--ouput`` -> "did you mean --output?")."""
        if args is not None and self._subparsers is None:
            self._refuse_unknown(list(args))
        return super().parse_known_args(args, namespace)

    def _refuse_unknown(self, args: list[str]) -> None:
        known = [o for o in self._option_string_actions if o.startswith("--")]
        for token in args:
            if token == "--":
                return
            name = token.split("=", 1)[0]
            if not name.startswith("--") or name in known or any(o.startswith(name) for o in known):
                continue  # a value, a known option, or an abbreviation argparse resolves
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            self.error(f"unknown option {name}" + (f"; did you mean {near[0]}?" if near else ""))


def _add_option(p: argparse.ArgumentParser, name: str, **override: Any) -> None:
    """One ``MergeOptions`` field as a flag; ``override`` replaces its default or help."""
    f = next(f for f in option_fields() if f.name == name)
    m = meta_of(f)
    kw: dict[str, Any] = {"default": f.default, "help": m.help}
    if m.kind == "bool":
        kw["action"] = "store_true"
    elif m.choices:
        kw["choices"] = list(m.choices)
        if m.metavar:
            kw["metavar"] = m.metavar
    else:
        kw["metavar"] = m.metavar
        if m.kind in _TYPES:
            kw["type"] = _TYPES[m.kind]
    p.add_argument(flag_of(name), **(kw | override))


def _add_options(p: argparse.ArgumentParser, *names: str, **helps: str) -> None:
    """Several ``MergeOptions`` fields as flags, in this order; ``helps`` replaces some of their help."""
    for name in names:
        _add_option(p, name, **({"help": helps[name]} if name in helps else {}))


def _add_base(p: argparse.ArgumentParser, help: str, *, required: bool = True) -> None:
    """``--base`` (and the spellings other tools use for it)."""
    p.add_argument(*_BASE_FLAGS, dest="base", required=required, default=None, metavar="PATH", help=help)


def _add_output(p: argparse.ArgumentParser, help: str, *spellings: str) -> None:
    """``--output``/``-o`` (and ``spellings``, between the two)."""
    p.add_argument("--output", *spellings, "-o", dest="output", required=True, metavar="PATH", help=help)


def _add_loras(p: argparse.ArgumentParser, *, required: bool, lora_help: str, weight_help: str) -> None:
    p.add_argument(
        "--lora",
        "--lora_path",
        "--lora_dir",
        "--lora-path",
        dest="lora",
        action="append",
        required=required,
        default=None,
        metavar="PATH",
        help=lora_help,
    )
    p.add_argument("--weight", dest="weight", action="append", type=float, metavar="W", help=weight_help)


def add_merge_flags(p: argparse.ArgumentParser) -> None:
    """``distmerge merge``'s flags: the inputs and output, then every ``MergeOptions`` field."""
    _add_base(p, "base checkpoint: .safetensors file, or folder (HF index or one file)")
    _add_loras(
        p,
        required=True,
        lora_help="LoRA file or folder; repeat for several LoRAs",
        weight_help="weight of each --lora, in order (default 1.0 each; negative unmerges)",
    )
    _add_output(
        p,
        "output folder (shards + index), or a path ending in .safetensors (one file)",
        "--output_path",
        "--save_dir",
        "--output-path",
    )
    _add_options(p, *(f.name for f in option_fields()))


def _add_verify_inputs(p: argparse.ArgumentParser) -> None:
    """``verify``'s OUTPUT, and the inputs that replace the recorded ones."""
    p.add_argument(
        "output",
        nargs="?",
        default=None,
        metavar="OUTPUT",
        help="the merge output: folder with an index, or a .safetensors file",
    )
    p.add_argument("--merged", default=None, metavar="PATH", help="the same as OUTPUT")
    _add_base(
        p, "the base checkpoint the merge started from (default: the one recorded in OUTPUT's recipe)", required=False
    )
    _add_loras(
        p,
        required=False,
        lora_help="LoRA file as given to merge; repeat for several LoRAs (default: "
        "the recorded LoRAs, which must still have their recorded SHA-256)",
        weight_help="weight of each --lora (or of each recorded LoRA), in order (default: the recorded "
        "weights; 1.0 each with --lora)",
    )


def add_verify_parser(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """Add ``distmerge verify`` to ``subparsers`` (with the ``common`` -q/-v options).

    >>> p = argparse.ArgumentParser(); sub = p.add_subparsers(dest="command")
    >>> _ = add_verify_parser(sub, argparse.ArgumentParser(add_help=False))
    >>> a = p.parse_args(["verify", "--base", "b", "--lora", "l.pth", "--merged", "m", "--full"])
    >>> a.command, a.lora, a.full, a.rows, a.dtype, a.alpha
    ('verify', ['l.pth'], True, 32, None, None)
    >>> p.parse_args(["verify", "out"]).output
    'out'
    """
    p = subparsers.add_parser(
        "verify",
        parents=[common],
        usage="distmerge verify OUTPUT [--base PATH --lora PATH …] [options]",
        help="check a merged checkpoint against the recipe it records (or --base/--lora given by "
        "hand): structure, untouched bytes, recomputed rows, finiteness, shard checksums",
        description="Check a merge output. 'distmerge verify OUTPUT' re-checks it against the recipe "
        "it records (distmerge.json); --base, --lora, --weight, --alpha and --dtype replace "
        "the recorded values.",
    )
    _add_verify_inputs(p)
    _add_option(
        p,
        "alpha",
        default=None,
        help="global multiplier given to merge (default: the recorded one; 1.0 with --base and --lora)",
    )
    _add_option(
        p,
        "dtype",
        default=None,
        help="output dtype given to merge (default: the recorded one; keep with --base and --lora)",
    )
    p.add_argument(
        "--full", action="store_true", help="recompute every row of every merged tensor (default: a sample of rows)"
    )
    p.add_argument("--rows", type=int, default=32, metavar="N", help="rows sampled per merged tensor (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample (default 0)")
    _add_options(
        p,
        "skip_unmatched",
        *_RAY_OPTIONS,
        skip_unmatched="as given to merge: ignore LoRA keys that have no target in the base (implied for the "
        "recorded LoRAs)",
        num_workers="Ray tasks in flight (default: all CPUs)",
    )
    return p


def add_run_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``distmerge run JOB.yaml`` to ``subparsers`` (with the ``common`` -q/-v options).

    >>> p = argparse.ArgumentParser(); sub = p.add_subparsers(dest="command")
    >>> _ = add_run_parser(sub, argparse.ArgumentParser(add_help=False))
    >>> a = p.parse_args(["run", "job.yaml", "--address", "auto", "--only", "low_noise_model"])
    >>> a.command, a.job, a.address, a.only, a.device, a.check
    ('run', 'job.yaml', 'auto', ['low_noise_model'], None, False)
    """
    p = subparsers.add_parser(
        "run",
        parents=[common],
        help="run the merges of a YAML job file in one Ray session (e.g. both Wan2.2 experts)",
        description="Run several merges described in a YAML job file, in order, in one Ray session. "
        "Options given here override the file's 'ray:' section.",
    )
    p.add_argument("job", metavar="JOB.yaml", help="the job file (relative paths in it are relative to it)")
    _add_options(
        p,
        *_RAY_OPTIONS,
        address="join a Ray cluster: 'auto' or HOST:PORT (default: the file's ray.address, "
        "else embedded local Ray, or RAY_ADDRESS if set)",
        num_workers="Ray tasks in flight",
        num_cpus="CPUs for the embedded local Ray",
    )
    _add_option(p, "device", default=None, help="where the math runs")
    p.add_argument(
        "--only", action="append", default=None, metavar="NAME", help="run only this merge (repeat for several)"
    )
    p.add_argument(
        "--check", action="store_true", help="validate the job file and print the merges without running them"
    )
    return p


def _add_extract_inputs(p: argparse.ArgumentParser) -> None:
    """``extract``'s two checkpoints and its output."""
    _add_base(p, "the base checkpoint")
    p.add_argument(
        "--tuned",
        "--tuned_model_path",
        dest="tuned",
        required=True,
        metavar="PATH",
        help="the fine-tuned checkpoint (same keys, shapes and dtypes as the base)",
    )
    _add_output(p, "the LoRA .safetensors file (a folder for --layout peft)")


def _add_extract_method(p: argparse.ArgumentParser) -> None:
    """How ``extract`` reduces and writes each difference: rank or energy, layout, dtype."""
    p.add_argument("--rank", type=int, default=None, metavar="R", help="LoRA rank (default 64; with --energy: the cap)")
    p.add_argument(
        "--energy",
        type=float,
        default=None,
        metavar="E",
        help="smallest rank per matrix keeping this fraction of ||dW||_F^2, e.g. 0.9",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="comfy",
        help="key layout: comfy (diffusion_model.…lora_down/up, default), peft (adapter folder), "
        "diffusers (transformer.…lora_A/B), roll (base_model.model.…lora_A.default)",
    )
    p.add_argument(
        "--dtype", choices=OUT_DTYPES, default="bf16", help="dtype of the factors and differences (default bf16)"
    )
    p.add_argument(
        "--min-diff",
        type=float,
        default=0.0,
        metavar="D",
        help="tensors with max|tuned - base| <= D count as identical and are skipped (default 0)",
    )
    p.add_argument("--exact", action="store_true", help="exact SVD (torch.linalg.svd) for every matrix (slow)")


def add_extract_parser(
    subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """Add ``distmerge extract`` to ``subparsers`` (with the ``common`` -q/-v options).

    >>> p = argparse.ArgumentParser(); sub = p.add_subparsers(dest="command")
    >>> _ = add_extract_parser(sub, argparse.ArgumentParser(add_help=False))
    >>> a = p.parse_args(["extract", "--base", "b", "--tuned", "t", "-o", "l.safetensors", "--energy", "0.9"])
    >>> a.command, a.rank, a.energy, a.layout, a.dtype, a.device, a.max_retries, a.resume
    ('extract', None, 0.9, 'comfy', 'bf16', 'auto', 3, False)
    """
    p = subparsers.add_parser(
        "extract", parents=[common], help="turn a fine-tune into a LoRA: SVD of tuned - base, as Ray tasks"
    )
    _add_extract_inputs(p)
    _add_extract_method(p)
    _add_options(
        p,
        *_EXTRACT_OPTIONS,
        resume="continue a crashed run into --output",
        overwrite="replace an existing output",
        report="write a JSON report here (per-tensor rank, energy, time)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``distmerge`` parser with every subcommand."""
    parser = _Parser(
        prog="distmerge", description="Merge LoRA adapters into base checkpoints with Ray tasks, in float32, streaming."
    )
    parser.add_argument("--version", action="version", version=f"distmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    add_merge_flags(sub.add_parser("merge", parents=[common], help="merge LoRA(s) into a base checkpoint"))
    i = sub.add_parser(
        "inspect", parents=[common], help="describe LoRA file(s): layout, ranks, alpha, scale; check against a base"
    )
    i.add_argument("--lora", "--lora_path", dest="lora", action="append", required=True, metavar="PATH")
    i.add_argument("--base", "--base_model_path", dest="base", default=None, metavar="PATH")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_verify_parser(sub, common)
    add_run_parser(sub, common)
    add_extract_parser(sub, common)
    d = sub.add_parser(
        "demo", parents=[common], help="generate a small Wan2.2-shaped checkpoint and ROLL LoRA, then merge them"
    )
    d.add_argument("--dir", default="distmerge-demo", help="work folder (default ./distmerge-demo)")
    d.add_argument("--num-workers", type=int, default=None, metavar="N")
    return parser
