#!/usr/bin/env bash
# A/B of whole package trees through `dsaserve bench one-batch` on a rank slice, rounds alternating the trees.
#   git archive REV dsaserve | tar -x -C /tmp/old          # a tree to compare (any folder holding dsaserve/)
#   bash benchmarks/ab_trees.sh 2 "old=/tmp/old new=." --arch deepseek_v32 --tp 8 --layers 8 -- \
#       --kv-cache-dtype fp8_e4m3 --batch-size 16 --input-len 4096 --output-len 32
# Arguments: ROUNDS "NAME=FOLDER ..." rank_slice.py's arguments -- bench one-batch's arguments (--model-path and
# --load-format are set). Each run's output goes to $OUT (or ./ab_out)/ab_NAME_ROUND.txt; its table rows print.
# `python -P`: `python -m` would put the current folder first on sys.path, so every side would import the
# tree the command runs in (two past A/Bs did, docs/benchmarks.md); each run prints the package it imports.
set -u
rounds=$1; trees=$2; shift 2
slice=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do slice+=("$1"); shift; done; shift
out=${OUT:-ab_out}; mkdir -p "$out"
python benchmarks/rank_slice.py /tmp/ab_slice "${slice[@]}" > "$out/slice.txt" 2>&1 || { cat "$out/slice.txt"; exit 1; }
for round in $(seq "$rounds"); do
  for named in $trees; do
    name=${named%%=*}; folder=$(cd "${named#*=}" && pwd)
    file=$out/ab_${name}_$round.txt
    path=$folder${PYTHONPATH:+:$PYTHONPATH}
    PYTHONPATH=$path python -P -m dsaserve bench one-batch --model-path /tmp/ab_slice --load-format dummy "$@" \
      > "$file" 2>&1
    code=$?  # (trees older than the bench's own "dsaserve from" line: the import is checked the same way here)
    echo "$name round $round: exit $code, $(PYTHONPATH=$path python -P -c 'import dsaserve; print(dsaserve.__file__)')"
    grep -E -A12 "^batch" "$file" | grep -E "^ +[0-9]"
  done
done
