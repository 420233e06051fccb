# Shared by the device_*.sh scripts (sourced, not run): the lent GPU host runs a script's benchmark commands in the
# background, and each call of the device tool waits for them and copies what they wrote so far to $OUT (a call
# may last at most 10 minutes; the machine stays warm ~30 s between calls). Carry this file with the script and
# the faiss wheel in .carry/f.
RUN=/tmp/run
B="python3 -m retrieval_attention.cli bench decode --shape llama3-8b --gpu-memory-budget 24GB --cuda-graphs --context 128K"

# device_start: on the machine's first call, run the commands read from stdin (one shell line per run, writing
# under $RUN/out) in the background from a copy of the working tree, after installing the carried wheel and
# recording the machine in $RUN/out/machine.txt; on later calls do nothing.
device_start() {
  [ -d $RUN ] && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/f/*.whl
  mkdir -p $RUN/out && cp -r . $RUN/src
  # each command's start time goes to times.txt (with the command's last 70 characters)
  (while IFS= read -r l; do printf 'echo "$(date +%%T) %s" >> %s/out/times.txt\n%s\n' "${l:$(( ${#l} > 70 ? ${#l} - 70 : 0 ))}" "$RUN" "$l"; done
   echo "echo done > $RUN/out/DONE; date +%T >> $RUN/out/times.txt") > $RUN/go.sh
  (
    cd $RUN/src || exit 1
    export PYTHONPATH=/tmp/site:$RUN/src PYTHONUNBUFFERED=1
    (lscpu | grep -i "model name"; nvidia-smi --query-gpu=name --format=csv,noheader
     python3 -c "import torch, transformers, numba, triton; print(torch.__version__, transformers.__version__, numba.__version__, triton.__version__)"
     python3 -c "import numba; from retrieval_attention.index.kernels import choose_threading_layer; choose_threading_layer(); print('numba threading layer', numba.threading_layer())"
    ) > $RUN/out/machine.txt 2>&1
    setsid nohup bash $RUN/go.sh > /dev/null 2>&1 &
  )
}

# device_poll W NAME...: wait up to W seconds for the runs to finish, pack $RUN/out into $OUT/out.tgz, and print the machine,
# the end of tests.log (if any) and the end of each NAME.log without progress bars.
device_poll() {
  local w=$1 f i
  shift
  for i in $(seq 1 $((w / 10))); do [ -f $RUN/out/DONE ] && break; sleep 10; done
  # the device tool returns at most 8 files per call: everything travels as one archive
  tar czf "$OUT/out.tgz" -C $RUN out
  cat $RUN/out/machine.txt
  tail -n 5 $RUN/out/tests.log 2>/dev/null
  cat $RUN/out/times.txt 2>/dev/null
  for f in "$@"; do
    echo "== $f"
    tail -c 3000 $RUN/out/$f.log 2>/dev/null | tr '\r' '\n' | grep -v "it/s\|layer/s\|store/s" | tail -n 25
  done
  ls $RUN/out
}
