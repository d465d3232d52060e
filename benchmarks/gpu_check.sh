#!/usr/bin/env bash
# GPU check for one NVIDIA GPU (H100/H200), no internet; finishes in under 8 minutes, compiles included.
#   1. the distributed tests (multi-process gloo parity on the CPU cores; compiled tests left to CPU CI);
#   2. benchmarks/gpu_check.py: single-rank NCCL parity of ftrain.distributed; ftrain.Trainer on the GPU against
#      transformers.Trainer (benchmarks/gpu_trainer_check.py: placement, per-step losses; fp32/bf16, eager/compiled);
#      then tokens/s and MFU of a 124M-parameter GPT: ftrain's jitted, donated step against torch.compile(model) +
#      fused AdamW.
# Usage (repo root or anywhere):  bash benchmarks/gpu_check.sh [gpu_check.py options]
# With OUT set, the pytest log and gpu_check.json are written there. GPU_TESTS_TIMEOUT / GPU_CHECK_TIMEOUT (s)
# override the two stages' limits (170 / 340), e.g. for the slow CPU smoke run: --dry-run.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # ftrain.jit's deterministic mode needs it on CUDA
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
log="${OUT:+$OUT/}pytest_distributed.txt"
[ -n "${OUT:-}" ] || log=/dev/null

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"

start=$SECONDS
timeout "${GPU_TESTS_TIMEOUT:-170}" python -m pytest -q -x -p no:cacheprovider -m "not compiled" tests/distributed 2>&1 | tee "$log" | tail -15
tests_rc=${PIPESTATUS[0]}
echo "distributed tests: rc=$tests_rc in $((SECONDS - start)) s"

timeout "${GPU_CHECK_TIMEOUT:-340}" python benchmarks/gpu_check.py "$@"
check_rc=$?
echo "gpu_check.py: rc=$check_rc; total $((SECONDS - start)) s"
[ "$tests_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
