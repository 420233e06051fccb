#!/bin/bash
# Next GPU-host measurement (docs/BENCHMARKS.md, session 16, "What would close the remaining gap"): where the fused
# search call's time goes at 128K. (1) the 128K decode at the defaults (compiled ops, two builds since session 16)
# with --variant ef=64 / ef=96: each record's search_call_ms splits the CPU search into Python, thread start, the
# busiest / average worker's tasks, join and the rest; (2) bench kernels on 8 synthetic 128K layers at 1, 8 and 16
# threads (call_parts_ms per thread count); (3) offload/full for the same-run ratios; (4) 32K with and without
# the residual estimate, then with it again (session 16: its CPU search took 56.3 ms with the device residual and
# 35.8 ms without, a gap 128K did not show).
# For the device tool: carry the faiss wheel in .carry/f and this script; the first call starts the runs in the
# background, each call waits up to $1 seconds and copies the results so far to $OUT.
W=${1:-540}
if [ ! -d /tmp/run ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/f/*.whl
  mkdir -p /tmp/run/out && cp -r . /tmp/run/src
  cd /tmp/run/src
  export PYTHONPATH=/tmp/site:/tmp/run/src PYTHONUNBUFFERED=1
  (lscpu | grep -i "model name"; nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, transformers, numba, triton; print(torch.__version__, transformers.__version__, numba.__version__, triton.__version__)"; python3 -c "import numba; from retrieval_attention.index.kernels import choose_threading_layer; choose_threading_layer(); print('numba threading layer', numba.threading_layer())") > /tmp/run/out/machine.txt 2>&1
  B="python3 -m retrieval_attention.cli bench decode --shape llama3-8b --gpu-memory-budget 24GB --cuda-graphs --context 128K"
  cat > /tmp/run/go.sh <<EOS
$B --steps 64 --warmup 4 --methods retrieval --index roar --variant ef=64 --variant ef=96 --json /tmp/run/out/decode.json > /tmp/run/out/decode.log 2>&1
python3 -m retrieval_attention.cli bench kernels --keys 128K --shape llama3-8b --ef 64,128 --steps 16 --train-queries 1024 --layers 8 --threads 1,8,16 --residual-on device --json /tmp/run/out/kernels.json > /tmp/run/out/kernels.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json /tmp/run/out/ref.json > /tmp/run/out/ref.log 2>&1
python3 -m retrieval_attention.cli bench decode --shape llama3-8b --gpu-memory-budget 24GB --cuda-graphs --context 32K --steps 64 --warmup 4 --methods retrieval --index roar --variant residual_samples=0 --variant residual_on=device --json /tmp/run/out/decode32k.json > /tmp/run/out/decode32k.log 2>&1
echo done > /tmp/run/out/DONE
EOS
  setsid nohup bash /tmp/run/go.sh > /dev/null 2>&1 &
  cd - > /dev/null
fi
for i in $(seq 1 $((W / 10))); do [ -f /tmp/run/out/DONE ] && break; sleep 10; done
cp /tmp/run/out/* $OUT/ 2>/dev/null; cat /tmp/run/out/machine.txt; for f in decode kernels ref decode32k; do echo "== $f"; tail -c 3000 /tmp/run/out/$f.log 2>/dev/null | tr '\r' '\n' | grep -v "it/s\|layer/s\|store/s" | tail -n 25; done; ls /tmp/run/out
