#!/bin/bash
# Next GPU-host measurement (docs/BENCHMARKS.md, session 16, "What would close the remaining gap"): where the fused
# search call's time goes at 128K. (1) the 128K decode at the defaults (compiled ops, two builds since session 16)
# with --variant ef=64 / ef=96: each record's search_call_ms splits the CPU search into Python, thread start, the
# busiest / average worker's tasks, join and the rest; (2) bench kernels on 8 synthetic 128K layers at 1, 8 and 16
# threads (call_parts_ms per thread count); (3) offload/full for the same-run ratios; (4) 32K with and without
# the residual estimate, then with it again (session 16: its CPU search took 56.3 ms with the device residual and
# 35.8 ms without, a gap 128K did not show).
# For the device tool: carry the faiss wheel in .carry/f, this script and device_lib.sh; the first call starts the
# runs in the background, each call waits up to $1 seconds and copies the results so far to $OUT.
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
$B --steps 64 --warmup 4 --methods retrieval --index roar --variant ef=64 --variant ef=96 --json $RUN/out/decode.json > $RUN/out/decode.log 2>&1
python3 -m retrieval_attention.cli bench kernels --keys 128K --shape llama3-8b --ef 64,128 --steps 16 --train-queries 1024 --layers 8 --threads 1,8,16 --residual-on device --json $RUN/out/kernels.json > $RUN/out/kernels.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
${B%128K}32K --steps 64 --warmup 4 --methods retrieval --index roar --variant residual_samples=0 --variant residual_on=device --json $RUN/out/decode32k.json > $RUN/out/decode32k.log 2>&1
EOS
device_poll "${1:-540}" decode kernels ref decode32k
