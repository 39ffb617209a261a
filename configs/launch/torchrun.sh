#!/usr/bin/env bash
# Multi-node `coherence run` with torchrun: run this on every node.
#   NNODES      number of nodes                    (default 2)
#   NODE_RANK   this node's index, 0..NNODES-1      (required on each node)
#   MASTER_ADDR address of node 0, reachable by all (required)
#   MASTER_PORT a free TCP port on node 0          (default 29500)
#   NPROC       ranks per node: GPUs per node, or CPU ranks (default: GPUs, else 1)
#   SUITE, OUT, LABEL as for `coherence run`
# Global rank 0 (node 0) writes the single run folder under $OUT on its own disk.
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
NNODES=${NNODES:-2}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec python -m torch.distributed.run \
  --nnodes="$NNODES" --nproc-per-node="$NPROC" --node-rank="$NODE_RANK" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
  -m harness.cli run --suite "${SUITE:-standard}" --out "${OUT:-results}" --label "${LABEL:-multi-node}" "$@"
