#!/usr/bin/env bash
# One GPU-machine call that builds variants there and checks, times and benches them:
#
#   BUILD="NAME:MODEL:TEMPLATE[:K=V,...] ..." CORRECT="NAME ..." TIME="NAME ..." KV=128,2048 \
#   BENCH="NAME ..." bash compiler/runtime/device_runs.sh OUT
#
# Builds run in parallel (sm_90a, artifacts under /tmp/amk-art/NAME, kept between warm calls);
# then `smoke correct` on CORRECT (tokens against bf16, float32, one launch == N launches),
# memcheck of a few decode steps of each of MEMCHECK, `smoke time` on TIME at the KV lengths KV (kernel only, median of 100, side by side in one
# process), `amk-farm profile` on each NAME@KV of PROFILE, and `amk-farm bench NAME --kv KV
# --json` on each of BENCH (both baselines), in that
# order; logs and JSON land in OUT. Runs from the checkout (PYTHONPATH=.) with the service
# libraries' wheels from .whl/ (see device_profile.sh). A build NAME%PATCH compiles from a copy of
# the checkout with .exp/PATCH.patch applied (an experiment; run it with the checkout's runtime).
set -uo pipefail
out=$1
mkdir -p "$out" /tmp/amk-art
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site AMK_HOME=/tmp/amk-home PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv,noheader
art() { echo "/tmp/amk-art/$1"; }
pids=()
tree() {  # the checkout, or for NAME%PATCH a copy of it with .exp/PATCH.patch applied
    local patch=${1#*%}
    [[ $patch == "$1" ]] && { echo "$PWD"; return; }
    if [[ ! -d /tmp/tree-$patch ]]; then
        mkdir -p "/tmp/tree-$patch" && cp -r compiler amk_farm verifier workers "/tmp/tree-$patch" &&
            patch -s -d "/tmp/tree-$patch" -p1 <".exp/$patch.patch" >&2 || return 1
    fi
    echo "/tmp/tree-$patch"
}
for spec in ${BUILD:-}; do
    IFS=: read -r name model template opts <<<"$spec"
    src=$(tree "$name") || { echo "no tree for $name"; continue; }
    args=()
    if [[ -n ${opts:-} ]]; then
        IFS=, read -ra kvs <<<"$opts"
        for o in "${kvs[@]}"; do args+=(--option "$o"); done
    fi
    rm -rf "$(art "$name")"
    (PYTHONPATH=$src:/tmp/site python3 -c 'from amk_farm.cli import main; main()' compile "$model" -t "$template" \
        --arch sm_90a -o "$(art "$name")" "${args[@]}" >/dev/null 2>"$out/$name.compile.log" &&
        echo "built $name") &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
paths() { for n in "$@"; do art "$n"; done; }
if [[ -n ${CORRECT:-} ]]; then
    echo "--- correct ${CORRECT}"
    # shellcheck disable=SC2046
    python3 -m compiler.runtime.smoke correct $(paths $CORRECT) 2>&1 | tee "$out/correct.log" |
        grep -v "^W[0-9]"
fi
for n in ${MEMCHECK:-}; do
    echo "--- memcheck $n"
    compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m compiler.runtime.smoke decode \
        "$(art "$n")" 4 >"$out/memcheck-$n.log" 2>&1
    echo "exit $? ($(grep -c "=========.*Error\|ERROR SUMMARY" "$out/memcheck-$n.log") lines)"
    grep "ERROR SUMMARY\|one launch" "$out/memcheck-$n.log"
done
if [[ -n ${TIME:-} ]]; then
    echo "--- time ${TIME} (KV ${KV:-128})"
    # shellcheck disable=SC2046
    python3 -m compiler.runtime.smoke time $(paths $TIME) --kv "${KV:-128}" 2>&1 |
        tee "$out/time.log" | grep -v "^W[0-9]"
fi
for spec in ${PROFILE:-}; do
    n=${spec%%@*} kv=${spec#*@}
    echo "--- profile $n (KV $kv)"
    python3 -c 'from amk_farm.cli import main; main()' profile "$(art "$n")" --kv "$kv" \
        -o "$out/$n-$kv.trace.json" --force 2>&1 | tee "$out/profile-$n-$kv.log" | tail -40
done
for n in ${BENCH:-}; do
    echo "--- bench $n (KV ${KV:-128,2048})"
    python3 -c 'from amk_farm.cli import main; main()' bench "$(art "$n")" --kv "${KV:-128,2048}" \
        --json >"$out/bench-$n.json" 2>"$out/bench-$n.log" || tail -3 "$out/bench-$n.log"
    python3 -c 'import json, sys; from compiler.runtime.bench import report
print(report(json.load(open(sys.argv[1]))))' "$out/bench-$n.json"
done
