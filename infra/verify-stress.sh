#!/usr/bin/env bash
# The verifier's false-rejection stress run: RUNS consecutive `amk-farm verify --no-cache` (each
# a fresh process: the frontend, the axiom self-checks and every query run again) over fresh
# artifacts of tiny-llama and tiny-mistral compiled for several shape templates. Any run that
# does not exit 0 is a false rejection: its output is kept in OUT/fail-N.log.
#
#   nice -n 19 infra/verify-stress.sh [RUNS=300] [OUT=/tmp/amk-verify-stress]
#
# Prints one line per run (run, artifact, exit code, seconds) and a final count. Not a test:
# it takes about 10 s a run on two cores.
set -u
runs=${1:-300}
out=${2:-/tmp/amk-verify-stress}
amk=(python -m amk_farm.cli)
mkdir -p "$out"
export AMK_HOME="$out/home"
arts=()
for model in tiny-llama tiny-mistral; do
  for t in b1-s64 b2-s64 b1-s128 b4-s32; do
    dir="$out/art/$model-$t"
    rm -rf "$dir"
    "${amk[@]}" compile "$model" -t "$t" --arch sm_90a -o "$dir" >/dev/null || exit 1
    arts+=("$dir")
  done
done
fail=0
start=$(date +%s)
for ((i = 1; i <= runs; i++)); do
  art=${arts[$(((i - 1) % ${#arts[@]}))]}
  t0=$(date +%s.%N)
  "${amk[@]}" verify "$art" --no-cache >"$out/run.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then
    fail=$((fail + 1))
    cp "$out/run.log" "$out/fail-$i.log"
  fi
  printf '%d %s rc=%d %.1fs\n' "$i" "$(basename "$art")" "$rc" "$(echo "$(date +%s.%N) - $t0" | bc)"
done
echo "runs=$runs failures=$fail seconds=$(($(date +%s) - start))"
