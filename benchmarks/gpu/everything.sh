#!/usr/bin/env bash
# Everything a lent CUDA machine measures for the open GPU questions, after the install, in one
# command of under 10 minutes: the full-scale harness first (within its time budget), then the
# memory of one vision pass and one prefill (memory.sh), then the probes of evaluation policies
# and of passes at new cache lengths, then the verdict on the issues' targets
# (`benchmarks.gpu.verdict`). Each part under its own time limit; one that fails is
# logged and the rest go on. The results go to WORK_FOLDER; after each part they are packed
# again into BRING_BACK/everything.tar.gz (one file, whatever stops the command later). From the
# checkout's root:
#   bash benchmarks/gpu/everything.sh WORK_FOLDER BRING_BACK
set -u
out=${1:?usage: bash benchmarks/gpu/everything.sh WORK_FOLDER BRING_BACK}
back=${2:?usage: bash benchmarks/gpu/everything.sh WORK_FOLDER BRING_BACK}
mkdir -p "$out" "$back"
python=${PYTHON:-python3}
part() {  # NAME LIMIT COMMAND...: COMMAND's output in NAME.log; its status and time logged
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "everything: $name exit $? in $((SECONDS - started)) s" | tee -a "$out/everything.log"
  tar czf "$back/everything.tar.gz" --exclude=work/kernels -C "$(dirname "$out")" "$(basename "$out")"
}
part harness "${HARNESS_LIMIT:-400}" "$python" -m benchmarks.run --scale full \
  --time-budget "${BUDGET:-390}" --out "$out/full"
# The kernels the harness compiled, for the rest (MLX's CUDA build reads them from there).
[[ -d $out/full/work/kernels/all ]] && export MLX_PTX_CACHE_DIR=$out/full/work/kernels/all
part memory 90 env PYTHON="$python" bash benchmarks/gpu/memory.sh "$out/memory"
part policies 50 "$python" -m benchmarks.gpu.eval_policies --out "$out/policies.json"
part offsets 40 "$python" -m benchmarks.gpu.pass_offsets --out "$out/offsets.json"
part verdict 10 "$python" -m benchmarks.gpu.verdict "$out"
cat "$out/verdict.log"
