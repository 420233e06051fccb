#!/bin/bash
# The next GPU-host run (written in session 22), most decisive first (the machine may be taken back, or the
# session's device time spent, before the end): (0) the CUDA tests of the changed parts (pruning warps, the "auto"
# hand-off, the chunk record); (1) why two builds at a time after the prefill took 1.6 s per 128K layer against
# 1.03 s for one build alone (session 22): the same layer built 8 times two at a time and one at a time under the
# 24 GB budget with a 16 GiB stand-in of the model, then two at a time with no budget (layer_build_profile.py
# --layers), and the standalone profile with the one-warp pruning; (2) 128K at the new defaults (asynchronous
# hand-off), then with the builds after the prefill one at a time; (3) the pruning kernel's warps (prune_bench.py)
# and the fused search call's host time outside its kernel on this host (search_call_overhead.py);
# (4) 512K at the defaults (the asynchronous hand-off there); (5) offload/full for the ratios. It outlives one
# call: poll again with `bash .carry/run/device_s22_next.sh 300` within 30 s of each return. Carry .carry/f (the
# faiss wheel) and .carry/run (this script and device_lib.sh); the results come back as out.tgz.
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
python3 -m pytest -q -p no:cacheprovider tests/test_prune_triton.py tests/test_gpumem.py tests/test_prefill.py -k "triton or warps or chunk or handoff or held or builds" > $RUN/out/tests.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 --layers 8 --workers 2 --budget-gib 24 --fill-gib 16 > $RUN/out/lb_w2_budget.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 --layers 8 --workers 1 --budget-gib 24 --fill-gib 16 > $RUN/out/lb_w1_budget.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 --layers 8 --workers 2 > $RUN/out/lb_w2.log 2>&1
python3 docs/bench/scripts/layer_build_profile.py 131072 2048 > $RUN/out/layer_build.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --build-schedule after_prefill --build-workers 1 --json $RUN/out/d128k_after_w1.json > $RUN/out/d128k_after_w1.log 2>&1
python3 docs/bench/scripts/prune_bench.py --json $RUN/out/prune_bench.json > $RUN/out/prune_bench.log 2>&1
python3 docs/bench/scripts/search_call_overhead.py 131072 > $RUN/out/search_overhead.log 2>&1
${B%128K}512K --steps 32 --warmup 2 --methods retrieval --index roar --json $RUN/out/d512k.json > $RUN/out/d512k.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
EOS
device_poll "${1:-540}" lb_w2_budget lb_w1_budget lb_w2 layer_build d128k d128k_after_w1 prune_bench search_overhead d512k ref
