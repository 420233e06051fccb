#!/bin/bash
# The next GPU-host run (docs/BENCHMARKS.md, session 17, "left undone"): (1) 32K then 128K at the defaults, both
# processes after a first one has filled inductor's cache, to confirm that the in-process compile backend leaves
# no stalled steps (decode_ms_steps); (2) the 128K build with the graph projection on the CPU kernels
# (`roar:projection=kernel`; with CUDA it runs in torch on the GPU by default: 68-71 s of projection and 34-38 s
# of reverse edges summed over the 32 layers in session 17, against 4.4 s + 0.28 s for one layer on the dev VM's 2
# cores; session 9 measured torch 3x faster than the kernel in isolation, this compares them inside the decode
# benchmark, two builds beside the prefill), same machine; (3) offload / full for the same-run ratios.
# For the device tool: carry .carry/f (the faiss wheel) and .carry/run (this script and device_lib.sh).
. "$(dirname "$0")/device_lib.sh"
device_start <<EOS
${B%128K}32K --steps 16 --warmup 4 --methods retrieval --index roar --json $RUN/out/fill_cache.json > $RUN/out/fill_cache.log 2>&1
${B%128K}32K --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d32k.json > $RUN/out/d32k.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar --json $RUN/out/d128k.json > $RUN/out/d128k.log 2>&1
$B --steps 64 --warmup 4 --methods retrieval --index roar:projection=kernel --json $RUN/out/d128k_kernel.json > $RUN/out/d128k_kernel.log 2>&1
$B --steps 32 --warmup 2 --methods offload,full --unbudgeted-reference --json $RUN/out/ref.json > $RUN/out/ref.log 2>&1
EOS
device_poll "${1:-540}" d32k d128k d128k_kernel ref
