#!/usr/bin/env bash
# A Ray cluster of separate processes on this machine's loopback, shaped like a small farm:
#
#   head      no CPU slots: it runs the control plane and the submitting driver only
#   codegen   a build node: offers the `codegen` resource (schedule, codegen, nvcc)
#   cpu       a proof node: offers `smt` on each of its cores (frontend, fusion, proofs)
#
#   infra/local-cluster.sh start [PORT] [CPU_CORES]   prints the RAY_ADDRESS to use
#   infra/local-cluster.sh stop
#
# Every node is at 127.0.0.2 (Ray turns 127.0.0.1 into the machine's network address; any
# other loopback address it keeps), and token authentication is off: nothing outside this
# machine can reach a loopback address. A real cluster keeps Ray's token authentication
# (the default of `ray start --head` since Ray 2.60) and gives every node and submitter the
# token.
#
# On real machines run the same `ray start` lines on each node (GPU nodes: add `codegen` and
# leave `smt` out, so proofs never take their CPU slots); the Helm chart does it on Kubernetes.
set -euo pipefail

ray_cli() { command -v ray >/dev/null && ray "$@" || python -m ray.scripts.scripts "$@"; }

case "${1:-}" in
start)
    port=${2:-6390}
    cores=${3:-2}
    address="127.0.0.2:$port"
    export RAY_AUTH_MODE=disabled
    common=(--node-ip-address=127.0.0.2 --disable-usage-stats --object-store-memory=200000000)
    ray_cli start --head --port="$port" --num-cpus=0 --include-dashboard=false "${common[@]}" >&2
    ray_cli start --address="$address" --num-cpus=1 --resources='{"codegen": 1}' "${common[@]}" >&2
    ray_cli start --address="$address" --num-cpus="$cores" --resources="{\"smt\": $cores}" \
        "${common[@]}" >&2
    echo "$address"
    ;;
stop)
    RAY_AUTH_MODE=disabled ray_cli stop --force >&2
    ;;
*)
    echo "usage: $0 start [PORT] [CPU_CORES] | stop" >&2
    exit 2
    ;;
esac
