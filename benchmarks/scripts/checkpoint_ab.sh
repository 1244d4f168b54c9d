#!/usr/bin/env bash
# Checkpoint overhead, measured in alternating pairs (drift on a shared machine cancels out):
# the groupby-1m job with and without a checkpoint every second, back to back, PAIRS times per
# worker count. Prints the job seconds of each pair and the median throughput loss.
# Usage: benchmarks/scripts/checkpoint_ab.sh [EVENTS] [PAIRS]   (needs a release build)
set -euo pipefail
events="${1:-20000000}"
pairs="${2:-6}"
sluice="${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}/release/sluice"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
job="CREATE TABLE clicks (user_id BIGINT, amount DOUBLE) WITH ('connector' = 'datagen', 'rows-per-second' = '0',
  'number-of-rows' = '$events', 'fields.user_id.min' = '1', 'fields.user_id.max' = '1000000',
  'fields.amount.min' = '1', 'fields.amount.max' = '1000');
CREATE TABLE sink (user_id BIGINT, n BIGINT, total DOUBLE) WITH ('connector' = 'blackhole');
INSERT INTO sink SELECT user_id, COUNT(*), SUM(amount) FROM clicks GROUP BY user_id;"
printf '%s\n' "$job" > "$work/plain.sql"
printf "SET 'execution.checkpointing.interval' = '1 s';\nSET 'execution.checkpointing.dir' = '%s';\n%s\n" \
  "$work/ck" "$job" > "$work/ckpt.sql"
seconds() { "$sluice" run "$1" --workers "$2" 2>&1 | sed -n 's/---- job finished in \([0-9.]*\) s/\1/p'; }
for w in 1 2; do
  ratios=()
  for _ in $(seq "$pairs"); do
    rm -rf "$work/ck"
    a=$(seconds "$work/ckpt.sql" "$w")
    b=$(seconds "$work/plain.sql" "$w")
    echo "workers $w: with checkpoints ${a} s, without ${b} s"
    ratios+=("$a/$b")
  done
  python3 -c "import statistics,sys; r=[eval(x) for x in sys.argv[1:]]; m=statistics.median(r); print(f'workers $w: median slowdown {m:.3f}x, throughput loss {(1-1/m)*100:.1f}%')" "${ratios[@]}"
done
