#!/bin/bash
# torchrun across nodes with a static rendezvous: run this on every node with
# its own NODE_RANK (0 on the master), the same NNODES / MASTER_ADDR.
#
#   NODE_RANK=0 NNODES=2 MASTER_ADDR=10.0.0.1 launch/torchrun_node.sh --config configs/x.yaml
#   NODE_RANK=1 NNODES=2 MASTER_ADDR=10.0.0.1 launch/torchrun_node.sh --config configs/x.yaml
#
# NPROC_PER_NODE defaults to the number of GPUs (1 process on a CPU-only node).
set -euo pipefail
: "${NODE_RANK:?set NODE_RANK}" "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" -m vlp train "$@"
