#!/usr/bin/env bash
# The GPU checks and benchmarks behind BENCHMARKS.md, in two halves:
#
#   bash compiler/runtime/device_check.sh build out     compile the artifacts into out/
#   bash compiler/runtime/device_check.sh run out LOGS [PARTS]
#                                                       on the GPU machine: PARTS, a comma list of
#                                                       check (gpu tests, sanitizers, probe),
#                                                       correct (token checks), time (default: all)
#
# `build` needs only the package and nvcc, here (then carry out/, ~75 MB: over the device tool's
# 64 MiB, so carry a part) or on the GPU machine itself, where the package is not installed:
# `PYTHONPATH=. AMK="python3 -m amk_farm.cli" bash compiler/runtime/device_check.sh build out`.
# `run` needs a Hopper GPU, CuPy and compute-sanitizer (PYTHONPATH=. where the package is not
# installed); it writes every log under LOGS and prints the short tables last (the device tool
# returns at most 8 files: `run out /tmp/logs; tar czf $OUT/logs.tgz -C /tmp logs`; a device
# call runs at most 10 minutes, so build + check in one call, build + time in another). `check`
# also builds and runs the ring probe (probes/ring_race_probe.cu) under racecheck. Artifacts
# (sm_90a):
#   tiny-b1, tiny-b4            tiny-llama, default options (CUDA-core matvec): the gpu tests
#   mma/tiny-b1, mma/tiny-b4    the same with the tensor-core matvec
#   mma16/tiny-b1, mma16/...    the same with 16-row mma slots (mma_rows=16)
#   threads/tiny-b1, .../tiny-b4  ring slots filled by the producer lanes (ring_copy=threads;
#                               b4 with the tensor-core matvec): what racecheck can judge
#   1b, 7b                      llama-3.2-1b, llama-2-7b at b1-s4096 (the benchmark)
#   1b-b16, 7b-b16              the same at b16-s1024 (defaults: tensor-core matvec)
#   1b-b4, 7b-b4                b4-s2048, for the batch-4 token checks
#   7b-b16-r16, 7b-b16-r32      7b-b16 with 16- and 32-row mma slots (to time against 7b-b16)
#   7b-p16, 7b-l2               7b with 16 KV partitions, with evict-first weight copies
set -euo pipefail
AMK=${AMK:-amk-farm}

build() {
    local out=$1 pids=() failed=0
    mkdir -p "$out/mma" "$out/mma16" "$out/threads"
    c() {
        local name=$1
        shift
        rm -rf "${out:?}/$name"
        # shellcheck disable=SC2086  # AMK may be a command with arguments
        $AMK compile "$@" --arch sm_90a -o "$out/$name" >/dev/null && echo "built $out/$name"
    }
    c tiny-b1 tiny-llama -t b1-s64 & pids+=($!)
    c tiny-b4 tiny-llama -t b4-s64 & pids+=($!)
    c mma/tiny-b1 tiny-llama -t b1-s64 --option matvec=mma & pids+=($!)
    c mma/tiny-b4 tiny-llama -t b4-s64 --option matvec=mma & pids+=($!)
    c mma16/tiny-b1 tiny-llama -t b1-s64 --option matvec=mma --option mma_rows=16 & pids+=($!)
    c mma16/tiny-b4 tiny-llama -t b4-s64 --option matvec=mma --option mma_rows=16 & pids+=($!)
    c threads/tiny-b1 tiny-llama -t b1-s64 --option ring_copy=threads & pids+=($!)
    c threads/tiny-b4 tiny-llama -t b4-s64 --option matvec=mma --option ring_copy=threads & pids+=($!)
    for m in 1b:llama-3.2-1b 7b:llama-2-7b; do
        c "${m%%:*}" "${m#*:}" -t b1-s4096 & pids+=($!)
        c "${m%%:*}-b16" "${m#*:}" -t b16-s1024 & pids+=($!)
        c "${m%%:*}-b4" "${m#*:}" -t b4-s2048 & pids+=($!)
    done
    c 7b-b16-r16 llama-2-7b -t b16-s1024 --option mma_rows=16 --option stages=3 \
        --option stage_bytes=32768 --option work_bytes=131072 & pids+=($!)
    c 7b-b16-r32 llama-2-7b -t b16-s1024 --option mma_rows=32 & pids+=($!)
    c 7b-p16 llama-2-7b -t b1-s4096 --option kv_partitions=16 & pids+=($!)
    c 7b-l2 llama-2-7b -t b1-s4096 --option weight_l2=evict_first & pids+=($!)
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    return "$failed"
}

check() {
    local out=$1 logs=$2
    for d in "$out" "$out/mma" "$out/mma16" "$out/threads"; do
        echo "gpu tests, $d: $(AMK_TEST_ARTIFACTS=$d timeout 120 python3 -m pytest -q -m gpu \
            tests/test_runtime.py -p no:cacheprovider 2>&1 | tail -1)"
    done
    for a in "$out/tiny-b1" "$out/mma/tiny-b4" "$out/threads/tiny-b1" "$out/threads/tiny-b4"; do
        local log="$logs/memcheck-${a//\//_}.log"
        timeout 120 compute-sanitizer --tool memcheck python3 -m compiler.runtime.smoke decode "$a" 2 \
            >"$log" 2>&1 || true
        echo "memcheck $a: $(tail -1 "$log")"
    done
    # racecheck: the async copies' hand-off is invisible to it (probes/ring_race_probe.cu), so
    # the artifacts whose producer lanes copy themselves (ring_copy=threads) are the check; the
    # default artifact is run too, to count what it reports on the bulk copies
    for a in "$out/threads/tiny-b1" "$out/threads/tiny-b4" "$out/tiny-b1"; do
        local log="$logs/racecheck-${a//\//_}.log"
        timeout 120 compute-sanitizer --tool racecheck --print-limit 0 \
            python3 -m compiler.runtime.smoke decode "$a" 2 >"$log" 2>&1 || true
        echo "racecheck $a: $(tail -1 "$log")"
        echo "  races reported: $(grep -c 'Race reported between' "$log" || true), of them" \
            "consumer read vs a producer write of a ring slot:" \
            "$(grep -A1 'Race reported between' "$log" | grep -c 'Write access at void produce<' || true)"
    done
    nvcc -gencode=arch=compute_90a,code=sm_90a -o "$logs/ring_race_probe" \
        compiler/runtime/probes/ring_race_probe.cu
    for m in 0 1 2 3 4 5 6 7; do  # see the probe's header
        timeout 60 compute-sanitizer --tool racecheck "$logs/ring_race_probe" "$m" \
            >"$logs/racecheck-probe-$m.log" 2>&1 || true
        echo "probe $m: $(timeout 30 "$logs/ring_race_probe" "$m" 2>&1 | tail -1);" \
            "racecheck: $(tail -1 "$logs/racecheck-probe-$m.log")"
    done
}

correct() {
    local out=$1 logs=$2
    timeout 300 python3 -m compiler.runtime.smoke correct "$out/1b" "$out/1b-b4" "$out/7b" \
        "$out/7b-b4" >"$logs/correct.log" 2>&1 || true
    grep '^|' "$logs/correct.log" || tail -3 "$logs/correct.log"
}

time_all() {
    local out=$1 logs=$2
    timeout 150 python3 -m compiler.runtime.smoke time "$out/7b-b16" "$out/7b-b16-r16" \
        "$out/7b-b16-r32" >"$logs/time-b16.log" 2>&1 || true
    timeout 150 python3 -m compiler.runtime.smoke time "$out/7b" "$out/7b-p16" "$out/7b-l2" \
        --kv 128,2048 >"$logs/time-b1.log" 2>&1 || true
    for m in 1b 7b; do
        timeout 200 python3 -m compiler.runtime.smoke bench "$out/$m" --batch16 "$out/$m-b16" \
            --out "$logs/bench-$m.json" >"$logs/bench-$m.log" 2>&1 || true
    done
    grep '^|' "$logs/time-b16.log" "$logs/time-b1.log" || true
    for m in 1b 7b; do tail -6 "$logs/bench-$m.log"; done
}

run() {
    local out=$1 logs=$2 parts=,${3:-check,correct,time},
    mkdir -p "$logs"
    export PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    if [[ $parts == *,check,* ]]; then check "$out" "$logs"; fi
    if [[ $parts == *,correct,* ]]; then correct "$out" "$logs"; fi
    if [[ $parts == *,time,* ]]; then time_all "$out" "$logs"; fi
}

case "${1:-}" in
build) build "${2:?usage: device_check.sh build OUT}" ;;
run) run "${2:?usage: device_check.sh run OUT LOGS [PARTS]}" "${3:?usage: device_check.sh run OUT LOGS [PARTS]}" "${4:-check,correct,time}" ;;
*)
    echo "usage: device_check.sh build OUT | run OUT LOGS [PARTS]" >&2
    exit 2
    ;;
esac
