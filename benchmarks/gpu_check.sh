#!/usr/bin/env bash
# The update's cost on one GPU, prepared to run once on an H100 / H200 in at most 8 minutes, with no
# internet (random weights in the real architectures). One JSON file under benchmarks/results/:
#   - the full-size SD-Turbo architecture, 512 px, bf16, K = 24, teacher-UNet features, brightness
#     reward: this project at --grad-chunk 0 (= K) and 8, and the authors' update structure;
#   - DrPO against the reward gradient through HPSv3's architecture (Qwen2-VL-7B + head), K = 24;
#   - in that comparison, the DrPO update at --grad-chunk 8 with the HPSv3 architecture on the same GPU
#     is the paper's one-GPU command (grad-accum does not change the peak): its peak_mb;
#   - the update against the sampler's steps (N = 1, 2, 4; --grad-steps N and 1; with and without
#     --gradient-checkpointing) on the same architecture: a second file, at most 6 more minutes (ten settings,
#     each loading the model in its own process: 240 s were too few on an H200, 2026-12-04);
#   - the update at FLUX.1-schnell's size (its 12 B transformer with random weights, 4 steps, K = 8 at 512 px,
#     checkpointing, --grad-steps 4 and 1): a third file, at most 5.5 more minutes.
# FLUX took 204 s there. All three take up to 20 minutes, more than one session's 15 minutes of device time:
# GPU_CHECK_PARTS picks.
#   - 24gb (not in the default; run it alone): docs/cost.md's "One 24 GB card" recipes at their real sizes with
#     random weights, each capped to 24 GiB with torch.cuda.set_per_process_memory_fraction, 3 updates, and the same
#     run without levers or cap (benchmarks/card_24gb.py): a fourth file, at most 9 minutes.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU
#   GPU_CHECK_PARTS=flux,steps bash benchmarks/gpu_check.sh   # some parts only (costs, steps, flux, 24gb)
#   GPU_CHECK_SIZE=toy bash benchmarks/gpu_check.sh    # the same steps at toy size, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
size=${GPU_CHECK_SIZE:-full}
out=${GPU_CHECK_OUT:-benchmarks/results}
parts=",${GPU_CHECK_PARTS:-costs,steps,flux},"
case "$size" in
  full) preset=sd-turbo; arch=qwen2vl-7b; limit=470 ;;
  toy) preset=tiny-cpu; arch=qwen2vl-tiny; limit=600 ;;
  *) echo "GPU_CHECK_SIZE=$size: use full or toy" >&2; exit 2 ;;
esac
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: running on the CPU"
python -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
if [[ $parts == *,flux,* ]]; then
  timeout 330 python benchmarks/step_cost.py --preset "$preset" --parts flux --json "$out/gpu_check_flux_$size.json" \
    || echo "the FLUX part did not finish within 330 s (what it printed is above)"
fi
if [[ $parts == *,costs,* ]]; then
  timeout "$limit" python benchmarks/step_cost.py --preset "$preset" --parts structures,scaling --reward-arch "$arch" \
    --candidates 24 --json "$out/gpu_check_$size.json"
  echo "wrote $out/gpu_check_$size.json"
fi
if [[ $parts == *,steps,* ]]; then
  timeout 360 python benchmarks/step_cost.py --preset "$preset" --parts steps --json "$out/gpu_check_steps_$size.json" \
    || echo "the steps part did not finish within 360 s (what it printed is above)"
fi
if [[ $parts == *,24gb,* ]]; then
  timeout 540 python benchmarks/card_24gb.py --size "$size" --json "$out/card_24gb_$size.json" \
    || echo "the 24gb part did not finish within 540 s (the recipes that did are in $out/card_24gb_$size.json)"
fi
