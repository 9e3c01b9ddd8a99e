#!/usr/bin/env bash
# The prepared GPU check: everything one H100/H200 can tell us, in under 9 minutes, installing nothing from the
# network. Run it first whenever a GPU is at hand:
#
#     bash bench/gpu_check.sh OUTDIR            # on the GPU machine (the device tool: carry .whl if it exists)
#     bash bench/gpu_check.sh OUTDIR --tiny     # the same steps end to end on a CPU at tiny size
#     python3 bench/merge_gpu_results.py OUTDIR # here: append OUTDIR's table to bench/RESULTS.md
#
# Rows (bench/train_speed.py, bf16-mixed, compiled blocks, Lightning beside the raw loop): the causal LM at 124M
# and 350M, BERT-base MLM, T5-base span corruption; then the 124M causal LM with document masking on (FlexAttention)
# and with Muon instead of AdamW. Each row writes one JSON line to OUTDIR/rows.jsonl; a row that overruns its
# share of the time is cut (its status is in OUTDIR/status.txt) and the check goes on.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR [--tiny]}
MODE=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
: > "$OUT/status.txt"
START=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then  # wheels the GPU image lacks (bench/README.md): offline install
  python3 -m pip install --quiet --no-index --find-links .whl .whl/*.whl >> "$OUT/pip.log" 2>&1 \
    || echo "wheel install failed (see pip.log)" >> "$OUT/status.txt"
fi
{ nvidia-smi || true; python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/environment.txt" 2>&1

if [[ "$MODE" == "--tiny" ]]; then
  COMMON=(--tiny --warmup 2 --steps 3); LIMIT=240
  CLM124=tiny:clm:4:32; CLM350=tiny:clm:8:32; BERT=bert-tiny:mlm:4:32; T5=t5-tiny:span_corruption:4:32
else
  COMMON=(--warmup 8 --steps 20); LIMIT=110
  CLM124=gpt2-small:clm:32:1024; CLM350=gpt2-medium:clm:16:1024; BERT=bert-base:mlm:64:512; T5=t5-base:span_corruption:64:512
fi

row() {  # row NAME ARGS...: one bench row under a time limit, its output in OUTDIR/NAME.log
  local name=$1; shift
  local t0=$(date +%s)
  timeout "$LIMIT" python3 bench/train_speed.py "${COMMON[@]}" --jsonl "$OUT/rows.jsonl" --label "$name" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT/status.txt"
}

row clm-124m --rows "$CLM124"
row clm-350m --rows "$CLM350"
row bert-base-mlm --rows "$BERT"
row t5-base-span --rows "$T5"
row clm-124m-docmask --rows "$CLM124" --document-mask --no-raw
row clm-124m-muon --rows "$CLM124" --optim muon --no-raw

if [[ -s "$OUT/rows.jsonl" ]]; then
  python3 bench/train_speed.py --table-from "$OUT/rows.jsonl" > "$OUT/table.md" 2>> "$OUT/status.txt"
fi
echo "total seconds=$(( $(date +%s) - START ))" | tee -a "$OUT/status.txt"
cat "$OUT/table.md" 2>/dev/null
