#!/usr/bin/env bash
# The lent-GPU entry point: install the carried wheels, then run_parallel.sh with the given arguments.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
exec bash benchmarks/defaults/run_parallel.sh "$@"
