#!/usr/bin/env bash
# Peak memory of one vision pass and one prefill at MiMo-VL's full widths on this machine's backend:
# the tower before (one lazy graph, as every backend ran it before #22) and after (the backend's
# schedule) at 448, 1024 and 1344, one lazy graph in Metal-sized command buffers, a 128-frame
# video, and a 4,096-token prefill through 4 and 36 decoder layers. Each measurement in its own process, under its own time limit; one that fails is
# logged and the rest go on. From the checkout's root:
#   bash benchmarks/gpu/memory.sh OUT_FOLDER
set -u
out=${1:?usage: bash benchmarks/gpu/memory.sh OUT_FOLDER}
mkdir -p "$out"
python=${PYTHON:-python3}
measure() {  # NAME MODULE ARGS...; VAR=value words before NAME go to its environment
  local env=() started=$SECONDS
  while [[ $1 == *=* ]]; do env+=("$1"); shift; done
  local name=$1
  shift
  if env "${env[@]}" timeout "${LIMIT:-60}" "$python" -m "$@" --out "$out/$name.json" \
    >"$out/$name.log" 2>&1; then
    echo "memory: $name in $((SECONDS - started)) s"
  else
    echo "memory: $name FAILED (exit $?) after $((SECONDS - started)) s: $(tail -n 1 "$out/$name.log")"
  fi
}
for size in 448 1024 1344; do
  for schedule in one-graph backend; do
    measure "vision-$size-$schedule" benchmarks.vision_memory --size "$size" --schedule "$schedule" --runs 3
  done
done
# One lazy graph with command buffers the size Metal gives a base or Pro chip (40 commands, 40 M
# elements of inputs; MLX gives an H100 or H200 100 and 1,000 M): what a Mac's one-graph pass may
# hold, as far as a CUDA machine can tell.
measure MLX_MAX_OPS_PER_BUFFER=40 MLX_MAX_MB_PER_BUFFER=40 vision-1344-one-graph-metal-buffers \
  benchmarks.vision_memory --size 1344 --schedule one-graph --runs 3
measure video-128-backend benchmarks.vision_memory --video 128 --runs 2
for layers in 4 36; do
  measure "prefill-4096-${layers}layers" benchmarks.prefill_memory --tokens 4096 --layers "$layers"
done
