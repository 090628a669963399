#!/usr/bin/env bash
# Every GPU check in one call (device time is scarce): the CUDA-only tests, the sync audit, what
# a rollback snapshot costs the host (bulk vs per-tensor copies), then the overhead benchmark on
# GPU-bound models with its set_sync_debug_mode("error") check.
# Usage: benchmarks/gpu_check.sh OUTDIR [ROUNDS] [MODELS]   (needs a CUDA device)
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [ROUNDS] [MODELS]}
rounds=${2:-10}
models=${3:-mlp-gpu,transformer-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi -L; $py -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
  $py -c "import lightning, transformers; print('lightning', lightning.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$out/machine.txt"
$py -m pytest -q -p no:cacheprovider tests/test_no_host_sync.py tests/actions/test_host_copy.py 2>&1 | tee "$out/pytest_gpu.log"
$py benchmarks/sync_audit.py --json "$out/sync_audit.json" 2>&1 | grep -v -E "^(GPU|TPU|HPU|💡|LOCAL_RANK)" | tee "$out/sync_audit.log"
$py benchmarks/snapshot_cost.py --device cuda --models "$models" --json "$out/snapshot_cost.json" \
  2>&1 | tee "$out/snapshot_cost.log"
$py benchmarks/overhead.py --device cuda --models "$models" \
  --variants "baseline,lrwatch,lrwatch lag0,lrwatch measure-only,lrwatch all-on,lightning-item,composer-item" \
  --rounds "$rounds" --warmup 1 --json "$out/overhead_cuda.json" 2>&1 | tee "$out/overhead.log"
