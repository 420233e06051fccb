#!/bin/bash
# Session 21's GPU-host run, ordered so that what decides the open questions comes first (the machine may be taken
# back, or the session's device time spent, before the end): (0) the CUDA tests of the held builds and the
# asynchronous hand-off, (0b) the layer-by-layer prefill of 6 layers at 128K per hand-off mode, with the calls that
# synchronise it with the device (prefill_syncs.py; its roar builds also fill numba's on-disk cache of the build
# kernels), (1) 128K with the builds after the prefill (--build-schedule after_prefill) with the asynchronous
# (--handoff async) and the synchronous hand-off, (2) 512K with the builds after the prefill, (3) the pruning
# kernel's variants (prune_bench.py), 128K at the defaults, offload/full for the ratios, (4) a standalone layer build and
# 128K overlapped builds with the asynchronous hand-off. It outlives one call: poll again with
# `bash .carry/run/device_s21.sh 300` within 30 s of each return. Carry .carry/f (the faiss wheel) and .carry/run
# (this script and device_lib.sh); the results come back as out.tgz.
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_prefill.py -k "handoff or held or builds" > $RUN/out/tests.log 2>&1
python3 docs/bench/scripts/prefill_syncs.py 131072 6 > $RUN/out/prefill_syncs.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-schedule after_prefill --handoff async --json $RUN/out/d128k_after_async.json > $RUN/out/d128k_after_async.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-schedule after_prefill --json $RUN/out/d128k_after.json > $RUN/out/d128k_after.log 2>&1
${B%128K}512K --steps 32 --warmup 2 --methods retrieval --index roar --build-schedule after_prefill --json $RUN/out/d512k_after.json > $RUN/out/d512k_after.log 2>&1
python3 docs/bench/scripts/prune_bench.py --json $RUN/out/prune_bench.json > $RUN/out/prune_bench.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 > $RUN/out/layer_build.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --handoff async --json $RUN/out/d128k_async.json > $RUN/out/d128k_async.log 2>&1
EOS
device_poll "${1:-540}" prefill_syncs d128k_after_async d128k_after d512k_after prune_bench d128k ref layer_build d128k_async
