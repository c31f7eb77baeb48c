#!/usr/bin/env bash
# The GPU path's check, for the day a GPU is lent: one prepared script, under 8 minutes on one
# H200 with 16 cores. Run it from anywhere (it cd's to the repo root):
#
#     bash benchmarks/gpu_check.sh
#
# Steps, each printing ONE line `STEP name: PASS|FAIL|SKIP figures [seconds]`:
#   env        what was found: python, torch (+ CUDA build), the GPUs, ray, safetensors, pytest, psutil
#   gpu-tests  python -m pytest -q -m gpu tests/        (the gpu-marked tests, tests/test_gpu.py)
#   generate   a full-width bf16 Wan-shaped expert (dim 5120, ffn 13824, GPU_CHECK_BLOCKS blocks,
#              2 shards) and a rank-64 ROLL LoRA, with the benchmark's generator (bench.py --generate-only)
#   merge-gpu  distmerge merge --device cuda            -> WORK/out-gpu (DISTMERGE_INLINE_UNITS=0: every
#              unit in a Ray task on cuda; units the driver ran anyway are counted in the line)
#   merge-cpu  distmerge merge --device cpu             -> WORK/out-cpu
#   compare    every tensor of out-gpu against out-cpu: bit-identical, or within the documented
#              tolerance (>= 99.9 % bit-identical, the rest <= 1 ulp or within 1e-6 x the tensor's
#              max: the cancellation allowance); prints the max ulp difference
#   timing     the disk's floor (dd direct read of the base || dd direct write of as many bytes),
#              cp -r BASE DEST && sync and distmerge --device cuda on the same files
#              (benchmarks/bench.py --base --lora --methods floor,cp,distmerge, with --cold when
#              /proc/sys/vm/drop_caches is writable, else warm and said so; without psutil a plain
#              timing without RSS), with the phases: first unit, units GB/s vs cp, tail; the
#              bench's markdown table (GB/s, x floor, x cp, RSS) is printed after the STEP line
#   verify     distmerge verify out-gpu                 (float64 recomputation of sampled rows, CRCs)
# A failed step does not stop the others; the exit status is 1 if any step failed.
#
# Environment (all optional):
#   PY                   the python to use: torch (CUDA build), ray, safetensors; pytest and psutil for
#                        gpu-tests and the RSS of timing (default .venv/bin/python if present, else python3)
#   GPU_CHECK_DEVICE     device of the "GPU" runs (default cuda; cpu tests this script on a CPU-only box)
#   GPU_CHECK_BLOCKS     Wan blocks of the generated expert (default 4: 3.3 GB in bf16)
#   GPU_CHECK_ROUNDS     interleaved rounds of the timing step (default 1)
#   GPU_CHECK_BUDGET_S   whole-run time budget in seconds (default 450); every step's timeout is cut
#                        to what is left, a step with under 10 s left is SKIPped
#   GPU_CHECK_STEPS      comma list of the steps to run (default all, in the order above)
#   GPU_CHECK_TIMING     plain: time without bench.py/psutil
#   GPU_CHECK_VERIFY_ARGS extra args of distmerge verify (e.g. --full)
#   GPU_CHECK_WORKDIR    scratch: the generated checkpoint (cached) and outputs (default bench-out/gpu-check)
#   GPU_CHECK_RESULTS    logs, reports, bench JSON and summary.txt (default $OUT/gpu-check when OUT
#                        is set, else WORKDIR/results)
#   GPU_CHECK_DIM, GPU_CHECK_FFN, GPU_CHECK_TEXT_DIM, GPU_CHECK_RANK   width overrides (tests only)

set -u
set -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
HELPER="$REPO/benchmarks/gpu_check.py"

if [ -z "${PY:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then
        PY="$REPO/.venv/bin/python"
    elif command -v python3 >/dev/null 2>&1; then
        PY="$(command -v python3)"
    else
        PY=python
    fi
fi
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BLOCKS="${GPU_CHECK_BLOCKS:-4}"
ROUNDS="${GPU_CHECK_ROUNDS:-1}"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
STEPS=",${GPU_CHECK_STEPS:-env,gpu-tests,generate,merge-gpu,merge-cpu,compare,timing,verify},"
WORK="${GPU_CHECK_WORKDIR:-$REPO/bench-out/gpu-check}"
if [ -n "${OUT:-}" ]; then RES="${GPU_CHECK_RESULTS:-$OUT/gpu-check}"; else RES="${GPU_CHECK_RESULTS:-$WORK/results}"; fi
GEN_ARGS="--blocks $BLOCKS --dtype bf16 --shards 2"
[ -n "${GPU_CHECK_DIM:-}" ] && GEN_ARGS="$GEN_ARGS --dim $GPU_CHECK_DIM"
[ -n "${GPU_CHECK_FFN:-}" ] && GEN_ARGS="$GEN_ARGS --ffn $GPU_CHECK_FFN"
[ -n "${GPU_CHECK_TEXT_DIM:-}" ] && GEN_ARGS="$GEN_ARGS --text-dim $GPU_CHECK_TEXT_DIM"
[ -n "${GPU_CHECK_RANK:-}" ] && GEN_ARGS="$GEN_ARGS --rank $GPU_CHECK_RANK"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" # distmerge from this tree, installed or not
unset RAY_ADDRESS                                    # always the embedded local Ray

mkdir -p "$WORK" "$RES" || exit 2
: >"$RES/summary.txt"
FAILS=0
RAN=0
echo "gpu_check: PY=$PY device=$DEVICE blocks=$BLOCKS budget=${BUDGET}s repo=$REPO work=$WORK results=$RES" |
    tee -a "$RES/summary.txt"

report() { # NAME STATUS FIGURES...
    local name=$1 status=$2
    shift 2
    local line="STEP $name: $status $*"
    echo "$line"
    echo "$line" >>"$RES/summary.txt"
    RAN=$((RAN + 1))
    [ "$status" = FAIL ] && FAILS=$((FAILS + 1))
    return 0
}

want() { case "$STEPS" in *",$1,"*) return 0 ;; esac; return 1; }

cap() { # a step's timeout: what it asks for, or what is left of the budget
    local left=$((BUDGET - SECONDS - 5))
    if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

verdict() { # NAME RC TIMEOUT LOG START OUTPUT: report the helper's `STATUS figures` line
    local name=$1 rc=$2 t=$3 log=$4 start=$5 out=$6 line
    local took="[$((SECONDS - start)) s]"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        report "$name" FAIL "timed out after ${t} s (log $log) $took"
        return
    fi
    line="$(printf '%s\n' "$out" | tail -n 1)"
    case "${line%% *}" in
    PASS | FAIL | SKIP) report "$name" "${line%% *}" "${line#* } $took" ;;
    *) report "$name" FAIL "rc $rc, no verdict: $(tail -n 1 "$log" 2>/dev/null | cut -c1-300) (log $log) $took" ;;
    esac
}

helper() { # NAME TIMEOUT LOG ARGS...: run a gpu_check.py subcommand under timeout and report it
    local name=$1 t log=$3 start=$SECONDS out rc
    t="$(cap "$2")"
    shift 3
    if [ "$t" -lt 10 ]; then
        report "$name" SKIP "out of the ${BUDGET} s budget"
        return
    fi
    out="$(timeout -k 10 "$t" "$PY" "$HELPER" "$@" 2>>"$log")"
    rc=$?
    verdict "$name" "$rc" "$t" "$log" "$start" "$out"
}

timed() { # NAME TIMEOUT LOG CMD...: run CMD under timeout into LOG; sets T_RC, T_T, T_START
    local name=$1 log=$3
    T_T="$(cap "$2")"
    T_START=$SECONDS
    shift 3
    if [ "$T_T" -lt 10 ]; then
        report "$name" SKIP "out of the ${BUDGET} s budget"
        T_RC=-1
        return
    fi
    echo "\$ $*" >"$log"
    timeout -k 10 "$T_T" "$@" >>"$log" 2>&1
    T_RC=$?
}

BASE=""
LORA=""

# --------------------------------------------------------------------------- env
if want env; then
    {
        echo "PY=$PY"
        "$PY" -c 'import sys; print(sys.version)' 2>&1
        command -v nvidia-smi >/dev/null 2>&1 &&
            nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv,noheader 2>&1
        nproc 2>&1
        free -g 2>&1 | head -2
        df -h "$WORK" 2>&1 | tail -1
    } >"$RES/env.log" 2>&1
    helper env 60 "$RES/env.log" env --device "$DEVICE" --workdir "$WORK"
fi

# --------------------------------------------------------------------------- gpu-tests
if want gpu-tests; then
    log="$RES/gpu-tests.log"
    timed gpu-tests 150 "$log" "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider --continue-on-collection-errors -rfEs
    if [ "$T_RC" -ne -1 ]; then
        if [ "$T_RC" -eq 124 ] || [ "$T_RC" -eq 137 ]; then
            verdict gpu-tests "$T_RC" "$T_T" "$log" "$T_START" ""
        else
            s=$T_START
            out="$(timeout 30 "$PY" "$HELPER" pytest-verdict "$log" "$T_RC" --device "$DEVICE" 2>>"$log")"
            verdict gpu-tests $? 30 "$log" "$s" "$out"
        fi
    fi
fi

# --------------------------------------------------------------------------- generate
if want generate || want merge-gpu || want merge-cpu || want timing; then
    log="$RES/generate.log"
    # shellcheck disable=SC2086  # GEN_ARGS is a list of flags and numbers
    timed generate 150 "$log" "$PY" benchmarks/bench.py --generate-only --workdir "$WORK" $GEN_ARGS
    if [ "$T_RC" -eq 0 ]; then
        BASE="$(sed -n 's/^base=//p' "$log" | tail -n 1)"
        LORA="$(sed -n 's/^lora=//p' "$log" | tail -n 1)"
        bytes="$(sed -n 's/^base_bytes=//p' "$log" | tail -n 1)"
    fi
    if [ "$T_RC" -eq -1 ]; then
        :
    elif [ "$T_RC" -eq 0 ] && [ -n "$BASE" ] && [ -n "$LORA" ]; then
        gb="$(awk -v b="${bytes:-0}" 'BEGIN { printf "%.2f", b / 1e9 }')"
        shape="$BLOCKS blocks, dim ${GPU_CHECK_DIM:-5120}, ffn ${GPU_CHECK_FFN:-13824}, 2 shards"
        report generate PASS "${gb} GB bf16 Wan base ($shape) + rank-${GPU_CHECK_RANK:-64} ROLL LoRA: $BASE, $LORA [$((SECONDS - T_START)) s]"
    else
        verdict generate "$T_RC" "$T_T" "$log" "$T_START" "FAIL rc $T_RC: $(tail -n 1 "$log" | cut -c1-300) (log $log)"
        BASE=""
    fi
fi

need_inputs() { # NAME: report FAIL and return 1 when there is no generated checkpoint
    if [ -z "$BASE" ]; then
        report "$1" FAIL "no generated checkpoint (the generate step failed or did not run)"
        return 1
    fi
}

# --------------------------------------------------------------------------- merges + compare
if want merge-gpu && need_inputs merge-gpu; then
    : >"$RES/merge-gpu.log"
    helper merge-gpu 120 "$RES/merge-gpu.log" merge "$BASE" "$LORA" "$WORK/out-gpu" --device "$DEVICE" \
        --report "$RES/merge-gpu-report.json" --log "$RES/merge-gpu.log" --no-inline
fi
if want merge-cpu && need_inputs merge-cpu; then
    : >"$RES/merge-cpu.log"
    helper merge-cpu 150 "$RES/merge-cpu.log" merge "$BASE" "$LORA" "$WORK/out-cpu" --device cpu \
        --report "$RES/merge-cpu-report.json" --log "$RES/merge-cpu.log"
fi
if want compare; then
    : >"$RES/compare.log"
    helper compare 90 "$RES/compare.log" compare "$WORK/out-gpu" "$WORK/out-cpu"
fi
rm -rf "$WORK/out-cpu"

# --------------------------------------------------------------------------- timing
if want timing && need_inputs timing; then
    log="$RES/timing.log"
    if [ "${GPU_CHECK_TIMING:-}" != plain ] && "$PY" -c 'import psutil' >/dev/null 2>&1; then
        rm -f "$RES/timing.json"
        # cold (page cache dropped before every run) where we may drop it; the probe drops it once
        if (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
            COLD=--cold
        else
            COLD=""
            echo "gpu_check: timing: /proc/sys/vm/drop_caches is not writable: the timing runs warm" |
                tee -a "$RES/summary.txt"
        fi
        # 210 s: the floor adds one base-sized read + write to cp and distmerge, all cold
        # shellcheck disable=SC2086  # COLD is one flag or none
        timed timing 210 "$log" "$PY" benchmarks/bench.py --base "$BASE" --lora "$LORA" \
            --methods floor,cp,distmerge $COLD --repeats "$ROUNDS" --workdir "$WORK/bench" \
            "--distmerge-args=--device $DEVICE" --json "$RES/timing.json"
        if [ "$T_RC" -ne -1 ]; then
            if [ "$T_RC" -eq 124 ] || [ "$T_RC" -eq 137 ]; then
                verdict timing "$T_RC" "$T_T" "$log" "$T_START" ""
            else
                s=$T_START
                out="$(timeout 30 "$PY" "$HELPER" bench-verdict "$RES/timing.json" "$T_RC" 2>>"$log")"
                verdict timing $? 30 "$log" "$s" "$out"
                # the bench's table: every method's GB/s and wall against the disk floor and cp
                grep '^|' "$log" | tee -a "$RES/summary.txt"
            fi
        fi
    else
        : >"$log"
        helper timing 180 "$log" plain-timing "$BASE" "$LORA" "$WORK" --device "$DEVICE" --log "$log"
    fi
fi

# --------------------------------------------------------------------------- verify
if want verify; then
    log="$RES/verify.log"
    if [ ! -d "$WORK/out-gpu" ]; then
        report verify FAIL "no $WORK/out-gpu (the merge-gpu step failed or did not run)"
    else
        # shellcheck disable=SC2086  # extra args, split on purpose
        timed verify 120 "$log" "$PY" -m distmerge verify "$WORK/out-gpu" ${GPU_CHECK_VERIFY_ARGS:-}
        if [ "$T_RC" -ne -1 ]; then
            if [ "$T_RC" -eq 124 ] || [ "$T_RC" -eq 137 ]; then
                verdict verify "$T_RC" "$T_T" "$log" "$T_START" ""
            else
                s=$T_START
                out="$(timeout 30 "$PY" "$HELPER" verify-verdict "$log" "$T_RC" 2>>"$log")"
                verdict verify $? 30 "$log" "$s" "$out"
            fi
        fi
    fi
fi
rm -rf "$WORK/out-gpu" "$WORK/bench/out-floor" "$WORK/bench/out-cp" "$WORK/bench/out-distmerge"

echo "gpu_check: $RAN steps, $FAILS failed, ${SECONDS} s; logs and summary.txt in $RES" | tee -a "$RES/summary.txt"
[ "$FAILS" -eq 0 ]
