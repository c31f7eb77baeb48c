"""The ``distmerge`` command line: ``merge``, ``run`` (job files), ``inspect``, ``verify``, ``extract``
and ``demo``.

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
import stat
import sys

from distmerge.app.flags import build_parser
from distmerge.errors import DistmergeError, UsageError

__all__ = ["main", "build_parser"]


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("distmerge").setLevel(level)


def _cmd_merge(args: argparse.Namespace, progress) -> int:
    from distmerge.app.options import from_args, pair_weights
    from distmerge.app.validate import check_options, check_output_name

    opts = from_args(args)
    loras = pair_weights(args.lora, args.weight)
    out_code = check_options(opts, loras)  # a usage error answers before Ray (or torch) is even imported
    check_output_name(args.output, out_code=out_code, checksum=opts.checksum)
    from distmerge.inputs.s3client import is_s3
    from distmerge.output.lock import refuse_if_locked

    if not is_s3(args.output):  # a bucket prefix has no lock file
        refuse_if_locked(args.output)  # so does a run into an output another run is writing
    from distmerge.cluster import RaySession

    lazy = _driver_alone(args.base, opts)
    session = RaySession(opts.address, num_cpus=opts.num_cpus, fast_exit=args.fast_exit, lazy=lazy).start()
    try:
        from distmerge.app.api import merge
        from distmerge.tasks import inline  # noqa: F401  (torch and the unit's code load while Ray starts)

        report = merge(args.base, loras, args.output, options=opts, session=session, progress=progress)
    finally:
        session.close()
    progress.close()  # the bar ends before anything else is printed
    for u in report.unmatched[:10]:
        print(f"distmerge: skipped unmatched '{u['key']}' in {u['file']}: {u['reason']}", file=sys.stderr)
    if len(report.unmatched) > 10:
        print(f"distmerge: … and {len(report.unmatched) - 10} more skipped (see --report)", file=sys.stderr)
    print(report.summary_line(since_start=_process_age()))
    return 0


#: a merge whose base is at most this big is done by the driver before an embedded Ray and its
#: workers (seconds of CPU to start) could take a unit: Ray is then not started at all
DRIVER_ALONE_BYTES = 512 << 20


def _driver_alone(base: str, opts) -> bool:
    """Whether the driver merges every unit itself, with no Ray: a small base (headers only, no
    torch), an embedded session on the CPU, the driver's units on, no resume (which re-checks
    units through Ray). Anything unusual (a Hub reference, a missing file): Ray as usual, and
    the merge reports the problem."""
    if opts.address or os.environ.get("RAY_ADDRESS") or opts.device == "cuda" or opts.resume:
        return False
    from distmerge.app.driver import driver_units_on

    if not driver_units_on():
        return False
    try:
        from distmerge.inputs.checkpoint import open_base

        return sum(t.nbytes for t in open_base(base).tensors.values()) <= DRIVER_ALONE_BYTES
    except Exception:  # noqa: BLE001 (the merge itself reports what is wrong with the base)
        return False


def _process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), interpreter start-up included."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


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
    print(report.summary_line(since_start=_process_age()))
    return 0


def main(argv: list[str] | None = None, *, fast_exit: bool = False) -> int:
    """Entry point of the ``distmerge`` console script; returns the exit code.

    ``fast_exit``: the process ends right after (``entry``), so an embedded Ray session is killed
    instead of shut down gracefully (milliseconds instead of ~1.5 s).
    """
    args = build_parser().parse_args(argv)
    args.fast_exit = fast_exit
    _setup_logging(args.verbose)
    from distmerge.app.progress import Progress

    progress = Progress("quiet" if args.quiet else "auto")
    try:
        if args.command == "merge":
            return _cmd_merge(args, progress)
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "verify":
            from distmerge.app.recipe import precheck

            precheck(args)  # argument and recipe errors answer before torch and Ray load
            from distmerge.app.verify import cmd_verify

            return cmd_verify(args)
        if args.command == "extract":
            from distmerge.app.extract import cmd_extract

            return cmd_extract(args, progress)
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
        line = "distmerge: interrupted; pending tasks cancelled, part files removed, nothing published"
        _say(progress, line, terminal_too=True)
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
        _close(progress)


def _close(progress) -> None:
    """End the progress bar; a stderr that can no longer be written to is no error here."""
    try:
        progress.close()
    except OSError:
        pass


def _say(progress, line: str, *, terminal_too: bool = False) -> None:
    """Print ``line`` on stderr after closing the progress bar, whatever stderr is: when it is a
    pipe whose reader died (``… 2>&1 | tee log``, where Ctrl-C ends ``tee`` too), the line goes to
    the controlling terminal instead, and the exit code is never lost to a ``BrokenPipeError``.
    ``terminal_too`` (Ctrl-C): when stderr is a pipe, the line goes to the terminal as well, since
    the pipe's reader may be dying of the same Ctrl-C and take the line with it."""
    _close(progress)
    try:
        print(line, file=sys.stderr, flush=True)
        if not (terminal_too and _is_pipe(sys.stderr)):
            return
    except OSError:
        sys.stderr = open(os.devnull, "w")  # later flushes must not raise either
    try:
        with open("/dev/tty", "w") as tty:
            print(line, file=tty)
    except OSError:
        pass


def _is_pipe(stream) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def entry() -> None:
    """The console script (and ``python -m distmerge``): ``main()``, then exit at once.

    Once Ray and torch are loaded, the interpreter's own teardown takes ~1.5 s after the work is
    done, and ``ray.shutdown()`` as long again; by then the output is published and every file is
    closed, and the embedded Ray session's processes are being killed by its watchdog
    (``main(fast_exit=True)``), so only the log handlers and the standard streams are flushed.
    """
    code = main(fast_exit=True)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
