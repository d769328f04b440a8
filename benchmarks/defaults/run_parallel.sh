#!/usr/bin/env bash
# Run the defaults sweep in parallel: every (dataset, config) pair in its own process, one CPU thread
# each, all on one device. Usage: run_parallel.sh CACHE OUTFILE DEVICE "ds1 ds2" "cfg1 cfg2 ..." [extra sweep args]
set -u
cache=$1; out=$2; device=$3; datasets=$4; configs=$5; shift 5
here=$(cd "$(dirname "$0")" && pwd)
for ds in $datasets; do  # data and teachers first, once per dataset
  python "$here/sweep.py" --dataset "$ds" --cache "$cache" --prepare-only &
done
wait
tmp=$(mktemp -d)
for ds in $datasets; do
  for c in $configs; do
    python "$here/sweep.py" --dataset "$ds" --config "$c" --cache "$cache" --device "$device" --quiet \
      --out "$tmp/$ds-${c//[^A-Za-z0-9_]/_}.jsonl" "$@" > "$tmp/$ds-${c//[^A-Za-z0-9_]/_}.log" 2>&1 &
  done
done
wait
cat "$tmp"/*.jsonl >> "$out"
for f in "$tmp"/*.log; do
  if ! grep -q '^{' "$f"; then echo "== $f"; tail -5 "$f"; fi
done
