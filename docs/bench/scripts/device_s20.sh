#!/bin/bash
# Session 20's GPU-host run: (0) the CUDA tests of the changed build paths (the keys resident on the device across
# the build stages, the Triton pruning, the repair's parents), (1) the Triton pruning with and without its prefetch
# against the torch ops (prune_bench.py), (2) a standalone layer build with the keys resident (the default, which
# also warms numba's cache of the build kernels before the timed runs), then with a copy per stage
# (resident_keys=false, session 19's), (3) 128K at the defaults, (4) 512K at the defaults (out of GPU memory in
# session 19 before the builds sized their chunks by the headroom), (5) offload/full for the ratios, (6) 128K with
# the builds' streams at high priority (--build-priority high), (7) 128K at the defaults again (the spread between
# processes). It outlives one call: poll again with `bash .carry/run/device_s20.sh 540` within 30 s of each return.
# For the device tool: carry .carry/f (the faiss wheel) and .carry/run (this script and device_lib.sh).
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_index.py tests/test_prune_triton.py tests/test_gpumem.py -k "resident or cuda or nearest_rows or triton or headroom" > $RUN/out/tests.log 2>&1
python3 docs/bench/scripts/prune_bench.py --json $RUN/out/prune_bench.json > $RUN/out/prune_bench.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 > $RUN/out/layer_build.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 resident_keys=false > $RUN/out/layer_build_copies.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
${B%128K}512K --steps 32 --warmup 2 --methods retrieval --index roar --json $RUN/out/d512k.json > $RUN/out/d512k.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-priority high --json $RUN/out/d128k_hi.json > $RUN/out/d128k_hi.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k_2.json > $RUN/out/d128k_2.log 2>&1
EOS
device_poll "${1:-540}" prune_bench layer_build layer_build_copies d128k d512k ref d128k_hi d128k_2
