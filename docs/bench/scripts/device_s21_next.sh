#!/bin/bash
# The next GPU-host run (docs/BENCHMARKS.md, session 20, "not measured"): (0) the CUDA tests of the build paths and
# the held builds, (0b) the pruning kernel's variants (prune_bench.py: early exit, 1/2/4/8 warps per program),
# (1) a standalone layer build (warms numba's cache of the build kernels), (2) 128K at the defaults,
# (3) 128K with the builds held until the prefill is done (--build-schedule after_prefill: session 20 measured the
# prefill at 17.7 s without builds and 37-43 s beside them), (4) 512K with the builds after the prefill, then (5) at
# the defaults (not measured since session 11: OOM in session 19, then a crash of every GPU build in session 20),
# (6) offload/full for the ratios. It outlives one call: poll again with `bash .carry/run/device_s21_next.sh 540`
# within 30 s of each return. For the device tool: carry .carry/f (the faiss wheel) and .carry/run (this script
# and device_lib.sh).
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_index.py tests/test_prune_triton.py tests/test_prefill.py tests/test_gpumem.py -k "resident or cuda or held or builds or headroom or triton" > $RUN/out/tests.log 2>&1
python3 docs/bench/scripts/prune_bench.py --json $RUN/out/prune_bench.json > $RUN/out/prune_bench.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 > $RUN/out/layer_build.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-schedule after_prefill --json $RUN/out/d128k_after.json > $RUN/out/d128k_after.log 2>&1
${B%128K}512K --steps 32 --warmup 2 --methods retrieval --index roar --build-schedule after_prefill --json $RUN/out/d512k_after.json > $RUN/out/d512k_after.log 2>&1
${B%128K}512K --steps 32 --warmup 2 --methods retrieval --index roar --json $RUN/out/d512k.json > $RUN/out/d512k.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
EOS
device_poll "${1:-540}" prune_bench layer_build d128k d128k_after d512k_after d512k ref
