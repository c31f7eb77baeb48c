"""The ``distmerge`` command line: ``merge``, ``run`` (job files), ``inspect``, ``verify`` and ``demo``.

Every ``DistmergeError`` becomes one line on stderr and exit code 1 (a ``UsageError``, like
argparse's own errors, exits 2); Ctrl-C exits 130 after cancelling the Ray tasks and removing part
files, however stdout and stderr are redirected.

Example:
        distmerge merge --base Wan2.2-T2V-A14B/low_noise_model --lora diffusion_module.pth \\
            --output merged/low_noise_model --dtype bf16 --report report.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from distmerge import __version__
from distmerge.errors import DistmergeError, UsageError

__all__ = ["main", "build_parser"]


def _add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        "--base_model_path",
        "--base-model-path",
        dest="base",
        required=True,
        metavar="PATH",
        help="base checkpoint: .safetensors file, or folder (HF index or one file)",
    )
    p.add_argument(
        "--lora",
        "--lora_path",
        "--lora_dir",
        "--lora-path",
        dest="lora",
        action="append",
        required=True,
        metavar="PATH",
        help="LoRA file or folder; repeat for several LoRAs",
    )
    p.add_argument(
        "--weight",
        dest="weight",
        action="append",
        type=float,
        metavar="W",
        help="weight of each --lora, in order (default 1.0 each; negative unmerges)",
    )
    p.add_argument(
        "--output",
        "--output_path",
        "--save_dir",
        "--output-path",
        "-o",
        dest="output",
        required=True,
        metavar="PATH",
        help="output folder (shards + index), or a path ending in .safetensors (one file)",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="global multiplier on every delta (default 1.0)")
    p.add_argument(
        "--dtype",
        choices=["keep", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"],
        default="keep",
        help="output dtype of float tensors (default: keep the base's); fp8_* writes scaled fp8 "
        "block linears (ComfyUI's convention), other tensors keep their dtype",
    )
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="shard size limit (default 5GB)")
    p.add_argument(
        "--skip-unmatched",
        action="store_true",
        help="merge what matches; list unplaceable LoRA keys in the summary and report",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty output folder (only files distmerge writes are replaced)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="join a Ray cluster: 'auto' or HOST:PORT (default: embedded local Ray, or RAY_ADDRESS if set)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray tasks in flight (default: all CPUs, or all GPUs)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the math runs (default: GPUs when the cluster has them)",
    )
    p.add_argument("--report", default=None, metavar="FILE", help="write a JSON report here")
    p.add_argument(
        "--unit-size", default=None, metavar="SIZE", help="target bytes per work unit (default: total / (4 x workers))"
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=3,
        metavar="N",
        help="Ray retries per task after a worker or node failure (default 3)",
    )
    p.add_argument(
        "--num-cpus", type=int, default=None, metavar="N", help="CPUs for the embedded local Ray (default: all)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run into --output, reusing its finished work units",
    )
    p.add_argument(
        "--checksum",
        choices=["crc32", "sha256"],
        default="crc32",
        help="checksum recorded for every shard: crc32 (computed while writing, default) or "
        "sha256 (the Hub's LFS hash; re-reads every shard on one driver thread)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (``distmerge: error: …``, exit 2) like every
    other error, instead of the usage block followed by the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"distmerge: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="distmerge", description="Merge LoRA adapters into base checkpoints with Ray tasks, in float32, streaming."
    )
    parser.add_argument("--version", action="version", version=f"distmerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    m = sub.add_parser("merge", parents=[common], help="merge LoRA(s) into a base checkpoint")
    _add_merge_args(m)
    i = sub.add_parser(
        "inspect", parents=[common], help="describe LoRA file(s): layout, ranks, alpha, scale; check against a base"
    )
    i.add_argument("--lora", "--lora_path", dest="lora", action="append", required=True, metavar="PATH")
    i.add_argument("--base", "--base_model_path", dest="base", default=None, metavar="PATH")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    from distmerge.app.verify import add_verify_parser

    add_verify_parser(sub, common)
    from distmerge.app.jobfile import add_run_parser

    add_run_parser(sub, common)
    d = sub.add_parser(
        "demo", parents=[common], help="generate a small Wan2.2-shaped checkpoint and ROLL LoRA, then merge them"
    )
    d.add_argument("--dir", default="distmerge-demo", help="work folder (default ./distmerge-demo)")
    d.add_argument("--num-workers", type=int, default=None, metavar="N")
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distmerge").setLevel(level)


def _cmd_merge(args: argparse.Namespace, progress) -> int:
    from distmerge.app.api import merge

    weights = args.weight or []
    if weights and len(weights) != len(args.lora):
        raise UsageError(
            f"got {len(args.lora)} --lora but {len(weights)} --weight; give one "
            "--weight per --lora, in the same order, or none"
        )
    loras = list(zip(args.lora, weights or [1.0] * len(args.lora)))
    report = merge(
        args.base,
        loras,
        args.output,
        alpha=args.alpha,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        skip_unmatched=args.skip_unmatched,
        overwrite=args.overwrite,
        address=args.address,
        num_workers=args.num_workers,
        device=args.device,
        report=args.report,
        unit_size=args.unit_size,
        max_retries=args.max_retries,
        num_cpus=args.num_cpus,
        resume=args.resume,
        checksum=args.checksum,
        progress=progress,
    )
    for u in report.unmatched[:10]:
        print(f"distmerge: skipped unmatched '{u['key']}' in {u['file']}: {u['reason']}", file=sys.stderr)
    if len(report.unmatched) > 10:
        print(f"distmerge: … and {len(report.unmatched) - 10} more skipped (see --report)", file=sys.stderr)
    print(report.summary_line())
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from distmerge.app.inspect import format_description, inspect_lora

    descs = [inspect_lora(p, args.base) for p in args.lora]
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in descs], indent=2))
    else:
        print("\n".join(format_description(d) for d in descs))
    return 0 if all(d.ok for d in descs) else 1


def _cmd_demo(args: argparse.Namespace, progress) -> int:
    from distmerge.app.demo import run_demo

    report = run_demo(
        args.dir, num_workers=args.num_workers, progress=progress, log=lambda s: print(f"distmerge demo: {s}")
    )
    print(report.summary_line())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``distmerge`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from distmerge.app.progress import Progress

    progress = Progress("quiet" if args.quiet else "auto")
    try:
        if args.command == "merge":
            return _cmd_merge(args, progress)
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "verify":
            from distmerge.app.verify import cmd_verify

            return cmd_verify(args)
        if args.command == "run":
            from distmerge.app.jobfile import cmd_run

            return cmd_run(args, progress)
        return _cmd_demo(args, progress)
    except UsageError as e:
        _say(progress, f"distmerge: error: {e}")
        return 2
    except DistmergeError as e:
        _say(progress, f"distmerge: error: {e}")
        return 1
    except BrokenPipeError:  # `distmerge inspect … | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        _say(progress, "distmerge: interrupted; pending tasks cancelled, part files removed, nothing published")
        return 130
    except Exception as e:  # a bug: still one line unless -v asked for the traceback
        if args.verbose:
            raise
        _say(
            progress,
            f"distmerge: internal error: {type(e).__name__}: {e} (rerun with -v for a traceback; please report it)",
        )
        return 1
    finally:
        try:
            progress.close()
        except OSError:
            pass


def _say(progress, line: str) -> None:
    """Print ``line`` on stderr after closing the progress bar, whatever stderr is: when it is a
    pipe whose reader died (``… 2>&1 | tee log``, where Ctrl-C ends ``tee`` too), the line goes to
    the controlling terminal instead, and the exit code is never lost to a ``BrokenPipeError``."""
    try:
        progress.close()
    except OSError:
        pass
    try:
        print(line, file=sys.stderr, flush=True)
        return
    except OSError:
        sys.stderr = open(os.devnull, "w")  # later flushes must not raise either
    try:
        with open("/dev/tty", "w") as tty:
            print(line, file=tty)
    except OSError:
        pass


def entry() -> None:
    """The console script (and ``python -m distmerge``): ``main()``, then exit at once.

    Once Ray and torch are loaded, the interpreter's own teardown takes ~1.5 s after the work is
    done; by then the Ray session is closed (``RaySession`` is always a context manager), the
    output is published and every file is closed, so only the log handlers and the standard
    streams are flushed before leaving.
    """
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
