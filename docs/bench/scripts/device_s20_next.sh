#!/bin/bash
# The next GPU-host run (docs/BENCHMARKS.md, session 19, "not measured"): the Triton pruning with and without its
# prefetch against the torch ops (prune_bench.py), (0) a standalone layer build first, so numba's
# cache of the build kernels is warm before any timed run (session 19's instance B compiled them inside its 128K
# run), (1) 128K at the defaults (the builds' GPU chunks sized by the headroom since session 19), twice, to see the
# spread between processes, (2) 128K with the builds' streams at high priority (--build-priority high), (3) 512K at
# the defaults (out of GPU memory in session 19 before the headroom change), (4) offload/full for the ratios. It
# outlives one call: poll again with `bash .carry/run/device_s20_next.sh 540` within 30 s of each return.
# For the device tool: carry .carry/f (the faiss wheel) and .carry/run (this script and device_lib.sh).
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 docs/bench/scripts/prune_bench.py --json $RUN/out/prune_bench.json > $RUN/out/prune_bench.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 > $RUN/out/layer_build.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-priority high --json $RUN/out/d128k_hi.json > $RUN/out/d128k_hi.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k_2.json > $RUN/out/d128k_2.log 2>&1
${B%128K}512K --steps 32 --warmup 2 --methods retrieval --index roar --json $RUN/out/d512k.json > $RUN/out/d512k.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
EOS
device_poll "${1:-540}" prune_bench layer_build d128k d128k_hi d128k_2 d512k ref
