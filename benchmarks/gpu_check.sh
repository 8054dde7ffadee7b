#!/usr/bin/env bash
# Is this GPU machine ready for bias_lab's search? One PASS/FAIL line per check, in a few minutes (< 8):
#   CUDA really used (device_info, the model's parameters), fit >= 0.8 of the compute bound for ResNet-18 @64,
#   same seed same numbers, resume on CUDA equals an uninterrupted run (AlexNet: dropout), K trials per GPU >= 1.5x one.
#
#   benchmarks/gpu_check.sh            # from the repository root, with the project's environment active
#   DEVICE=cuda:1 benchmarks/gpu_check.sh
#
# Exit status: 0 all PASS, 1 a check FAILed (or ran out of time), 3 no usable CUDA here (nothing checked).
# The full numbers behind the checks: python benchmarks/bench_epoch.py --device cuda
set -u
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
LIMIT_S=${LIMIT_S:-450}
export TQDM_DISABLE=1

problem=$("$PYTHON" -c 'from bias_lab.device import cuda_problem; print(cuda_problem() or "")' 2>/dev/null) || {
    echo "gpu_check: FAIL: cannot import bias_lab with $PYTHON (activate the project's environment)"; exit 1; }
if [ -n "$problem" ]; then
    echo "gpu_check: no CUDA on this machine ($problem): nothing checked; run it where torch.cuda.is_available()"
    exit 3
fi

start=$(date +%s)
timeout "$LIMIT_S" "$PYTHON" benchmarks/bench_epoch.py --device "$DEVICE" --check
rc=$?
if [ "$rc" -eq 124 ]; then
    echo "CHECK finished within ${LIMIT_S} s: FAIL (timed out)"
    rc=1
fi
echo "gpu_check: $([ "$rc" -eq 0 ] && echo PASS || echo FAIL) in $(( $(date +%s) - start )) s"
exit "$rc"
