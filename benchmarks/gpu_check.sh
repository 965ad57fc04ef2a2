#!/usr/bin/env bash
# The GPU check: the CUDA path, bf16 autocast and real-resolution throughput, in one script (< 8 min on one GPU).
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh        # on a machine with a CUDA GPU
#
# Uses the python3 found there (PyTorch, timm, safetensors, peft, onnxruntime preinstalled on the lent machines);
# the package itself is pure Python and runs from src/ without installing. Writes its tables under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1

echo "== environment" | tee "$OUT/summary.txt"
$PY -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$OUT/summary.txt"

echo "== tests (CPU paths; the GPU machine's cores)" | tee -a "$OUT/summary.txt"
timeout 240 $PY -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -3 | tee -a "$OUT/summary.txt"

echo "== a 2-cycle MiMi run on CUDA with bf16 autocast (ViT-B/16 at 224 px, random weights, a written toy task)" | tee -a "$OUT/summary.txt"
$PY -c "import sys; sys.path.insert(0, 'tests'); from vtab_fixture import write_vtab_task; write_vtab_task('$OUT/data', sizes={'train800': 256, 'val200': 64, 'test': 64}, px=64)"
timeout 180 $PY -m mimi train --model vit_base_patch16_224 --weights none --img-size 224 --data vtab1k:toy \
    --data-root "$OUT/data" --method mimi --adapter-dim 192 --budget-dim 48 --rho 0.75 --first-epochs 2 --epochs 1 \
    --batch-size 64 --device cuda --precision bf16 --no-progress --no-tensorboard --out "$OUT/run" 2>&1 \
    | tail -6 | tee -a "$OUT/summary.txt"

echo "== throughput and memory at 224 px, ViT-B/16, batch 128, bf16" | tee -a "$OUT/summary.txt"
timeout 150 $PY benchmarks/throughput.py --model vit_base_patch16_224 --img-size 224 --batch-size 128 \
    --precision bf16 --out "$OUT/throughput.json" 2>&1 | tail -20 | tee -a "$OUT/summary.txt"
timeout 120 $PY benchmarks/memory.py --model vit_base_patch16_224 --img-size 224 --batch-size 128 \
    --precision bf16 --out "$OUT/memory.json" 2>&1 | tail -12 | tee -a "$OUT/summary.txt"
echo "tables: $OUT/summary.txt, $OUT/throughput.json, $OUT/memory.json"
