#!/usr/bin/env bash
# One device call: install sdpa_pass into a temp path, run the suite on the GPU, then benchmarks.
# Usage: bash benchmarks/gpu_session.sh "<pytest args>" "<benchmark args>" ["<distributed args>"]
# The third runs benchmarks/distributed.py (training step under DDP/FSDP2/TP) over every GPU.
# tests/test_distributed.py runs on the GPUs (NCCL, bf16) when SDPA_PASS_DIST_DEVICE=cuda is set.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"
# sdpa_pass.kernels maps to the repository's kernels/ folder; mirror that layout without pip.
# Run from that copy so the repository's own sdpa_pass/ (without kernels/) is not on sys.path.
# pyproject.toml: tests/test_dynamo_backend.py reads the entry point it declares.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r sdpa_pass tests benchmarks examples pyproject.toml /tmp/pkg/ \
  && cp -r kernels /tmp/pkg/sdpa_pass/kernels && { [ -d .whl ] && cp -r .whl /tmp/pkg/; true; }
cd /tmp/pkg
# The package's metadata beside it, as an install would leave it: its entry point is how
# Dynamo finds the backend in a process that never imported us (tests/test_pass_api.py).
python3 - <<'PY'
import pathlib, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path(f"{project['name'].replace('-', '_')}-{project['version']}.dist-info")
info.mkdir()
(info / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in table.items()) + "\n"
    for group, table in project.get("entry-points", {}).items()))
PY
export PYTHONPATH=/tmp/pkg
if ! python3 -c "import pytest, expecttest" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/pkg:/tmp/site
fi
# Tests: each ';'-separated pytest argument list runs as its own process, in parallel (kernel
# compilation is the cost on a GPU and it is per process and CPU-bound).
if [ -n "${1:-}" ]; then
  i=0; IFS=';' read -ra shards <<< "$1"
  for shard in "${shards[@]}"; do
    i=$((i + 1))
    # -v: each test's outcome as it happens (with -n, "[gwN] [ x%] FAILED <id>"), so a shard
    # that runs out of time still names its failures (the summary comes only at the end)
    # SDPA_PASS_FAILURE_LOG (tests/conftest.py): each failure's traceback as it happens, too
    eval "SDPA_PASS_FAILURE_LOG=$OUT/failures_$i.log timeout ${TEST_TIMEOUT:-300} python3 -m pytest -p no:cacheprovider -v $shard" > "$OUT/tests_$i.log" 2>&1 &
  done
  wait
  for f in "$OUT"/tests_*.log; do
    echo "== $f"; grep -E "(FAILED|ERROR) tests/" "$f" | sort -u | head -30; tail -2 "$f"
  done
fi
if [ -n "${2:-}" ]; then
  timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/attention.py --out "$OUT" $2 2>&1 | tee "$OUT/bench.log" | tail -40
fi
if [ -n "${3:-}" ]; then
  gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
  timeout "${DIST_BENCH_TIMEOUT:-400}" python3 -m torch.distributed.run --standalone --nproc_per_node "$gpus" \
    benchmarks/distributed.py --out "$OUT" $3 2>&1 | tee "$OUT/dist_bench.log" | tail -30
fi
