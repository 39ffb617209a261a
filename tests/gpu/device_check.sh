#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, the quick suite and the GPU check
# suite on `cuda`, results under $OUT. Installs nothing from the internet: the image's
# python3 has torch, numpy, pandas, pyarrow, scipy, psutil, pynvml, click, rich, yaml.
set -u
OUT=${OUT:-/tmp/coherence-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
{
  date -u; nvidia-smi -L; python3 --version
  python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/log.txt"
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . >>"$OUT/log.txt" 2>&1 \
  || { echo "install failed"; tail -5 "$OUT/log.txt"; }
python3 -m harness.cli env --json >"$OUT/env.json" 2>>"$OUT/log.txt"; echo "env rc=$?"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/probes/test_cuda.py tests/probes -m "not slow" \
  >"$OUT/pytest.txt" 2>&1; echo "pytest rc=$?"; tail -25 "$OUT/pytest.txt"
RUNS=$(mktemp -d)
timeout 120 python3 -m harness.cli run --suite quick --devices cuda --out "$RUNS" -q --label device-quick \
  >>"$OUT/log.txt" 2>&1; echo "quick rc=$?"
timeout 100 python3 -m harness.cli run --suite tests/gpu/gpu_check.yaml --devices cuda --out "$RUNS" -q \
  --label device-gpu-check >>"$OUT/log.txt" 2>&1; echo "gpu-check rc=$?"
# JAX on the GPU (the image has jax with its CUDA plugin): the quick suite's JAX cases.
timeout 60 python3 -m harness.cli run --backend jax --devices jax:gpu --suite quick --out "$RUNS" -q \
  --label device-jax-quick >>"$OUT/log.txt" 2>&1; echo "jax quick rc=$?"; tail -3 "$OUT/log.txt"
for r in "$RUNS"/*/; do python3 -m harness.cli show "$r"; done >"$OUT/show.txt" 2>&1
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" .
python3 - "$RUNS" <<'PY' | tee "$OUT/summary.txt"
import sys, glob, pandas as pd
for f in sorted(glob.glob(sys.argv[1] + "/*/cases.parquet")):
    c = pd.read_parquet(f)
    print(f.split("/")[-2], c["status"].value_counts().to_dict())
    bad = c[c["status"] != "ok"]
    for _, r in bad.iterrows():
        print("  ", r["status"], r["case_id"], str(r["reason"])[:160])
    cols = [k for k in ("case_id", "p50_s", "flops_per_s", "bytes_per_s", "roofline_fraction") if k in c]
    import json, os
    ind = os.path.join(os.path.dirname(f), "indicators.json")
    if os.path.exists(ind):
        d = json.load(open(ind))
        print("capacity", d.get("capacity"))
        for e in d.get("serving", []):
            print("serving", e["case_id"][:100], "kappa", (e.get("kappa") or {}).get("value"), "eps", (e.get("epsilon") or {}).get("value"))
        for m in ("mode1", "mode2", "mode3", "mode4"):
            print(m, {k: (v.get("value") if not isinstance(v.get("value"), float) else round(v["value"], 4)) for k, v in d.get(m, {}).items()})
    ok = c[c["status"] == "ok"][cols]
    with pd.option_context("display.width", 250, "display.max_colwidth", 80, "display.max_rows", 200):
        print(ok.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
PY
