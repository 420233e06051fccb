#!/bin/bash
# Session 15's GPU measurements (docs/BENCHMARKS.md, "Fewer training queries, two background builds, compiled decode
# ops"), not run yet: the 128K decode with the defaults (8,192 training queries per graph since session 15, one
# build worker) and --variant decode_compile=1 / 0 on the same prefill and index; the CUDA tests; two build
# workers; the old training-query count (--max-train-queries 16384) for the build A/B; offload/full for the ratios.
# Order: the runs needed for the targets first (defaults, tests, offload/full), then the A/Bs.
# For the device tool: carry the faiss wheel in .carry/f and this script; the first call starts the runs in the
# background, each call waits up to $1 seconds and copies the results so far to $OUT.
W=${1:-540}
if [ ! -d /tmp/run ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/f/*.whl
  mkdir -p /tmp/run/out && cp -r . /tmp/run/src
  cd /tmp/run/src
  export PYTHONPATH=/tmp/site:/tmp/run/src PYTHONUNBUFFERED=1
  (lscpu | grep -i "model name"; nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, transformers, numba, triton; print(torch.__version__, transformers.__version__, numba.__version__, triton.__version__)"; which gcc cc) > /tmp/run/out/machine.txt 2>&1
  B="python3 -m retrieval_attention.cli bench decode --shape llama3-8b --gpu-memory-budget 24GB --cuda-graphs --context 128K"
  cat > /tmp/run/go.sh <<EOS
$B --steps 64 --warmup 4 --methods retrieval --index roar --variant decode_compile=1 --variant decode_compile=0 --json /tmp/run/out/new.json > /tmp/run/out/new.log 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_decode_loop.py tests/test_prefill.py -k "cuda or compiled or build_workers or wait_for_builds" > /tmp/run/out/tests.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json /tmp/run/out/ref.json > /tmp/run/out/ref.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-workers 2 --json /tmp/run/out/two_workers.json > /tmp/run/out/two_workers.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --max-train-queries 16384 --json /tmp/run/out/old_train.json > /tmp/run/out/old_train.log 2>&1
echo done > /tmp/run/out/DONE
EOS
  setsid nohup bash /tmp/run/go.sh > /dev/null 2>&1 &
  cd - > /dev/null
fi
for i in $(seq 1 $((W / 10))); do [ -f /tmp/run/out/DONE ] && break; sleep 10; done
cp /tmp/run/out/* $OUT/ 2>/dev/null; cat /tmp/run/out/machine.txt; tail -n 5 /tmp/run/out/tests.log; for f in new ref two_workers old_train; do echo "== $f"; tail -c 2500 /tmp/run/out/$f.log 2>/dev/null | tr '\r' '\n' | grep -v "it/s\|layer/s\|store/s" | tail -n 25; done; ls /tmp/run/out
