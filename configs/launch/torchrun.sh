#!/usr/bin/env bash
# Multi-node `coherence run` with torchrun: run this on every node, with `coherence
# run`'s own arguments after it:
#   NODE_RANK=0 MASTER_ADDR=node0 configs/launch/torchrun.sh --suite standard --out results
# Launch facts from the environment:
#   NNODES      number of nodes                    (default 2)
#   NODE_RANK   this node's index, 0..NNODES-1      (required on each node)
#   MASTER_ADDR address of node 0, reachable by all (required)
#   MASTER_PORT a free TCP port on node 0          (default 29500)
#   NPROC       ranks per node: GPUs per node, or CPU ranks (default: GPUs, else 1)
#   COHERENCE_VENV  the virtual environment to use (default: the checkout's .venv,
#                   found from this script's folder; else python on PATH)
# Global rank 0 (node 0) writes the single run folder under --out on its own disk.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NNODES=${NNODES:-2}
MASTER_PORT=${MASTER_PORT:-29500}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${COHERENCE_VENV:-$HERE/../../.venv}
if [ -x "$VENV/bin/python" ]; then PY="$VENV/bin/python"; else PY=python; fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec "$PY" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc-per-node="$NPROC" --node-rank="$NODE_RANK" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  -m harness.cli run --label "multi-node" "$@"
