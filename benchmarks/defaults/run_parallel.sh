#!/usr/bin/env bash
# Run the defaults sweep in parallel: every (dataset, config) pair in its own process, one CPU thread
# each, all on one device; each appends its JSON line to OUTFILE as soon as it is done.
# Usage: run_parallel.sh CACHE OUTFILE DEVICE "ds1 ds2" "cfg1 cfg2 ..." [extra sweep args]
# (a config is a name from sweep.py's CONFIGS or NAME={json overrides}); SWEEP_TIMEOUT bounds each process.
set -u
cache=$1; out=$2; device=$3; datasets=$4; configs=$5; shift 5
here=$(cd "$(dirname "$0")" && pwd)
logs=$(dirname "$out")/logs; mkdir -p "$logs"
for ds in $datasets; do  # data and teachers first, once per dataset
  python "$here/sweep.py" --dataset "$ds" --cache "$cache" --device "$device" --prepare-only &
done
wait
for ds in $datasets; do
  for c in $configs; do
    tag="$ds-${c%%=*}"
    timeout "${SWEEP_TIMEOUT:-100000}" python "$here/sweep.py" --dataset "$ds" --config "$c" --cache "$cache" \
      --device "$device" --quiet --out "$out" "$@" > "$logs/$tag.log" 2>&1 &
  done
done
wait
for f in "$logs"/*.log; do
  if ! grep -q '^{' "$f"; then echo "== $f"; tail -3 "$f"; fi
done
