#!/usr/bin/env bash
# The checks that need an NVIDIA GPU (CI has none), in one run that takes a few minutes:
#  1. the CUDA tests: gsplat against the torch reference (images and gradients), and
#     `avatar drive --device cuda` against the CPU path, frame by frame;
#  2. `avatar bench render --device cuda` at 1920x1080 with 1 and 3 million Gaussians, and at
#     512x512 with 50,000 against the torch reference on the same GPU;
#  3. `avatar bench drive` on the GPU (10 s and 60 s of speech, 512², with a stack profile) and
#     on the CPU of the same machine (CPU_TOO=0 skips it);
#  4. with LTX2=PATH (a local LTX-2 diffusers folder): the LTX-2 tests on CUDA and two steps of
#     `avatar finetune` with it as the audio-conditioned teacher (8-frame windows, 256²).
# Every step runs; the exit status is non-zero if any failed.
# Usage (repo root, after `pip install -e '.[cuda]'`): tools/gpu_check.sh AVATAR [OUT_DIR]
set -uo pipefail
avatar=${1:?usage: tools/gpu_check.sh AVATAR [OUT_DIR]}
out=${2:-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt" || failed=1
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$out/gpu.txt" || failed=1
$py -m pytest -q -rs tests/test_rasterize.py tests/test_drive.py -k "cuda" 2>&1 \
  | tee "$out/pytest.txt" || failed=1
for n in 1000000 3000000; do
  $py -m avatar bench render --device cuda --gaussians $n --size 1920 --height 1080 --frames 30 \
    --no-reference --json 2>&1 | tail -n 1 | tee "$out/render_1080p_$n.json" || failed=1
done
$py -m avatar bench render --device cuda --json 2>&1 | tail -n 1 \
  | tee "$out/render_512_50k.json" || failed=1
$py -m avatar bench drive --avatar "$avatar" --device cuda --profile "$out/drive_cuda.folded" \
  --json 2>&1 | tail -n 1 | tee "$out/drive_cuda.json" || failed=1
if [ "${CPU_TOO:-1}" = 1 ]; then  # the same drive on this machine's CPU, for the ratio
  $py -m avatar bench drive --avatar "$avatar" --device cpu --long-seconds 0 --json 2>&1 \
    | tail -n 1 | tee "$out/drive_cpu.json" || failed=1
fi
if [ -n "${LTX2:-}" ]; then  # the audio-conditioned teacher on real weights
  $py -m pytest -q -rs tests/test_ltx2_teacher.py 2>&1 | tee "$out/pytest_ltx2.txt" || failed=1
  speech=$($py -c "from avatar.scenes import demo_speech; print(demo_speech())")
  /usr/bin/time -v $py -m avatar finetune "$avatar" --audio "$speech" --teacher "diffusers:$LTX2" \
    --steps 2 --frames 8 --size 256 -o "$out/ltx2.avatar" 2>&1 | tee "$out/finetune_ltx2.txt" \
    || failed=1
fi
[ "$failed" = 0 ] || echo "gpu_check: some checks failed (see above and $out)" >&2
exit "$failed"
