#!/usr/bin/env bash
# One GPU-machine call: build artifacts there, then `amk-farm profile` each (the artifact's kernel
# and its profile build timed side by side, 20 profiled steps), and print a short table.
#
#   bash compiler/runtime/device_profile.sh OUT NAME:MODEL:TEMPLATE:KV[:KEY=VALUE,...] ...
#
# e.g. `... /tmp/prof 1b:llama-3.2-1b:b1-s4096:128 1b-rt32:llama-3.2-1b:b1-s4096:128:row_tile=32`.
# Runs of one NAME share its artifact (give the same MODEL, TEMPLATE and options). The package is
# not installed on the GPU machine: it runs from the checkout (PYTHONPATH=.), with the wheels of
# the service libraries the CLI imports carried in .whl/ (sqlalchemy, cryptography, cffi,
# pycparser). Writes OUT/NAME.json (the profile, --json) and OUT/NAME.trace.json + .png.
set -uo pipefail
out=$1
shift
mkdir -p "$out" /tmp/amk-art
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site AMK_HOME=/tmp/amk-home PYTHONUNBUFFERED=1
amk() { python3 -c 'from amk_farm.cli import main; main()' "$@"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv,noheader

declare -A built=()
pids=()
for run in "$@"; do
    IFS=: read -r name model template kv opts <<<"$run"
    art=${name%%@*}
    [[ -n ${built[$art]:-} ]] && continue
    built[$art]=1
    args=()
    if [[ -n ${opts:-} ]]; then
        IFS=, read -ra kvs <<<"$opts"
        for o in "${kvs[@]}"; do args+=(--option "$o"); done
    fi
    (amk compile "$model" -t "$template" --arch sm_90a -o "/tmp/amk-art/$art" "${args[@]}" \
        >/dev/null 2>"$out/$art.compile.log" && echo "built $art") &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done

for run in "$@"; do
    IFS=: read -r name model template kv opts <<<"$run"
    art=${name%%@*}
    echo "--- profile $name ($model $template KV $kv ${opts:-defaults})"
    amk profile "/tmp/amk-art/$art" --kv "$kv" -o "$out/$name.trace.json" --json \
        >"$out/$name.json" 2>"$out/$name.log" || { tail -3 "$out/$name.log"; continue; }
done
python3 - "$out" "$@" <<'EOF'
import json, sys
from pathlib import Path
from compiler.runtime.timeline import summary
out = Path(sys.argv[1])
rows = []
for run in sys.argv[2:]:
    name = run.split(":")[0]
    p = out / f"{name}.json"
    if not p.is_file() or not p.stat().st_size:
        print(f"{name}: no profile"); continue
    r = json.loads(p.read_text())
    print(f"==== {name}: {r['model']} {r['template']} KV {r['kv_len']}")
    print(summary(r["profile"]))
    rows.append((name, r))
print("name | kernel ms | profile build ms | cost | predicted ms | step us (profiled) | hop us | busy/wait/idle")
for name, r in rows:
    a, ct = r["profile"], r["profile"]["cta_time"]
    print(f"{name} | {r['kernel_ms']:.3f} | {r['profile_build_ms']:.3f} | {100 * r['instrumentation_cost']:+.1f}% | "
          f"{r['schedule_report']['predicted_ms']:.3f} | {a['step_us']:.1f} | {a['median_hop_us']} | "
          f"{100 * ct['busy']:.0f}/{100 * ct['wait']:.0f}/{100 * ct['idle']:.0f}")
print(json.dumps(rows[0][1]["versions"]) if rows else "")
EOF
