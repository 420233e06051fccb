#!/bin/bash
# The 128K A/B of the residual on the device vs the CPU on a lent GPU host (docs/BENCHMARKS.md, "The residual
# estimate on the device"), with narrower beams as --variant runs on the same prefill and index, then the CUDA tests
# and offload/full for the ratios. For the device tool: carry the faiss wheel in .carry/f and this script; the first
# call starts the runs in the background, each call waits up to $1 seconds and copies the results so far to $OUT.
W=${1:-540}
if [ ! -d /tmp/run ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/f/*.whl
  mkdir -p /tmp/run/out && cp -r . /tmp/run/src
  cd /tmp/run/src
  export PYTHONPATH=/tmp/site:/tmp/run/src PYTHONUNBUFFERED=1
  (lscpu | grep -i "model name"; nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, transformers, numba; print(torch.__version__, transformers.__version__, numba.__version__)") > /tmp/run/out/machine.txt 2>&1
  B="python3 -m retrieval_attention.cli bench decode --shape llama3-8b --gpu-memory-budget 24GB --cuda-graphs --context 128K"
  V="--variant residual_on=cpu --variant ef=96 --variant ef=64 --variant residual_samples=0 --variant residual_on=device"
  cat > /tmp/run/go.sh <<EOS
$B --steps 64 --warmup 4 --methods retrieval --index roar --residual-on device $V --json /tmp/run/out/ab.json > /tmp/run/out/ab.log 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_decode_loop.py -k cuda > /tmp/run/out/tests.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json /tmp/run/out/ref.json > /tmp/run/out/ref.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --no-align --json /tmp/run/out/noalign.json > /tmp/run/out/noalign.log 2>&1
echo done > /tmp/run/out/DONE
EOS
  setsid nohup bash /tmp/run/go.sh > /dev/null 2>&1 &
  cd - > /dev/null
fi
for i in $(seq 1 $((W / 10))); do [ -f /tmp/run/out/DONE ] && break; sleep 10; done
cp /tmp/run/out/* $OUT/ 2>/dev/null; cat /tmp/run/out/machine.txt; tail -n 5 /tmp/run/out/tests.log; for f in ab ref noalign; do echo "== $f"; tail -c 2500 /tmp/run/out/$f.log 2>/dev/null | tr '\r' '\n' | grep -v "it/s\|layer/s" | tail -n 25; done; ls /tmp/run/out
