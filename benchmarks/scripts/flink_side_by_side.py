#!/usr/bin/env python3
"""Runs the same queries on the same input file in Apache Flink and in Sluice, one after the
other, with the same parallelism, and prints a table: query, Flink events/s, Sluice events/s,
ratio.

The input and the Flink side come from the peer harness in ../shared/peers/flink (see its
README): `gen_bids.py` writes a deterministic bid file, `run_flink.py` runs each query as a Flink
SQL job (local mini-cluster, bounded filesystem source with a watermark, blackhole sink). Sluice
runs the harness's Flink SQL text unchanged, over the same CSV file, into a blackhole sink.

    benchmarks/flink_side_by_side.py --rows 1000000 --parallelism 1,2 --repeat 3

Needs the peer venv (`../shared/peers/flink/setup.sh`) and a release build of Sluice
(`cargo build --release`; the binary is looked up in $CARGO_TARGET_DIR or target/). Results go
to $PEER_HOME/side-by-side/<rows>-<timestamp>/ as JSON lines and a Markdown table.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEER = os.environ.get("PEER_DIR", os.path.join(REPO, "..", "shared", "peers", "flink"))
PEER_HOME = os.environ.get("PEER_HOME", os.path.expanduser("~/.cache/sluice-peers/flink"))

# Output columns of each harness query, for Sluice's blackhole sink (Sluice casts to them).
SINK_COLUMNS = {
    "q0": "auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, url STRING, date_time TIMESTAMP(3), extra STRING",
    "q1": "auction BIGINT, bidder BIGINT, price DOUBLE, date_time TIMESTAMP(3), extra STRING",
    "q2": "auction BIGINT, price BIGINT",
    "q_tumble": "window_start TIMESTAMP(3), sum_price BIGINT, num BIGINT",
    "q5": "window_start TIMESTAMP(3), window_end TIMESTAMP(3), auction BIGINT, num BIGINT",
    "q5_rn": "window_start TIMESTAMP(3), window_end TIMESTAMP(3), auction BIGINT, num BIGINT",
    "q7": "window_start TIMESTAMP(3), window_end TIMESTAMP(3), auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP(3)",
    "q7_rn": "window_start TIMESTAMP(3), window_end TIMESTAMP(3), auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP(3)",
    "q_groupby": "channel STRING, num BIGINT, sum_price BIGINT, max_price BIGINT",
    "q_distinct": "auction BIGINT, bidders BIGINT",
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sluice_binary():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    for path in (os.path.join(target, "release", "sluice"),
                 os.path.expanduser("~/.cache/sluice-target/release/sluice")):
        if os.path.exists(path):
            return path
    sys.exit("no release build of sluice: run `cargo build --release` first")


def run_sluice(binary, csv_path, name, flink_sql, parallelism, workdir):
    script = f"""
CREATE TABLE bids (auction BIGINT, bidder BIGINT, price BIGINT, channel STRING, url STRING,
  date_time TIMESTAMP(3), extra STRING,
  WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND)
WITH ('connector' = 'filesystem', 'path' = '{csv_path}', 'format' = 'csv');
CREATE TABLE sink_{name} ({SINK_COLUMNS[name]}) WITH ('connector' = 'blackhole');
INSERT INTO sink_{name}
{flink_sql};
"""
    path = os.path.join(workdir, f"{name}.sql")
    with open(path, "w") as f:
        f.write(script)
    started = time.time()
    p = subprocess.run([binary, "run", path, "--workers", str(parallelism)],
                       capture_output=True, text=True)
    wall = time.time() - started
    if p.returncode != 0:
        return {"status": "error", "error": p.stderr.strip()[-500:], "wall_seconds": wall}
    m = re.search(r"job finished in ([0-9.]+) s", p.stderr)
    rows = re.search(r"rows read\s+bids\s+(\d+)", p.stderr)
    return {"status": "ok", "seconds": float(m.group(1)), "rows": int(rows.group(1)),
            "wall_seconds": round(wall, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--parallelism", "-p", default="1,2")
    ap.add_argument("--queries", "-q", default=None, help="comma-separated; default: all harness queries")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per query and engine (median)")
    ap.add_argument("--skip-flink", action="store_true", help="only run Sluice")
    args = ap.parse_args()

    sys.path.insert(0, PEER)
    from queries import DEFAULT_ORDER, QUERIES  # noqa: E402  (the harness's query texts)

    names = args.queries.split(",") if args.queries else DEFAULT_ORDER
    pars = [int(p) for p in args.parallelism.split(",")]
    python = os.path.join(PEER_HOME, "venv", "bin", "python")
    if not os.path.exists(python):
        sys.exit(f"no peer venv at {python}: run {PEER}/setup.sh first")
    data = os.path.join(PEER_HOME, "data", str(args.rows))
    meta = os.path.join(data, "bids.meta.json")
    if not (os.path.exists(meta) and json.load(open(meta)).get("rows") == args.rows):
        log(f"generating {args.rows} bids into {data}")
        subprocess.run([python, os.path.join(PEER, "gen_bids.py"), data, "--rows", str(args.rows)],
                       check=True)
    csv_path = os.path.join(data, "bids.csv")
    out = os.path.join(PEER_HOME, "side-by-side", f"{args.rows}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    binary = sluice_binary()
    results = []

    for p in pars:
        if not args.skip_flink:
            log(f"flink p={p}: {','.join(names)}")
            r = subprocess.run([python, os.path.join(PEER, "run_flink.py"), "--data", data,
                                "-p", str(p), "--queries", ",".join(names),
                                "--repeat", str(args.repeat), "--format", "csv"],
                               capture_output=True, text=True)
            with open(os.path.join(out, f"flink-p{p}.log"), "w") as f:
                f.write(r.stderr)
            for line in r.stdout.splitlines():
                rec = json.loads(line)
                rec["engine"] = "flink"
                results.append(rec)
        for n in names:
            for k in range(args.repeat):
                rec = run_sluice(binary, csv_path, n, QUERIES[n]["flink"], p, out)
                rec.update({"engine": "sluice", "query": n, "parallelism": p, "run": k})
                if rec["status"] == "ok":
                    rec["events_per_s"] = round(args.rows / rec["seconds"])
                log(f"sluice p={p} {n} run {k}: {rec.get('events_per_s', rec.get('error'))}")
                results.append(rec)

    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for rec in results:
            f.write(json.dumps(rec) + "\n")

    def median(engine, n, p, key="events_per_s"):
        v = [r[key] for r in results if r["engine"] == engine and r["query"] == n
             and r["parallelism"] == p and r.get(key)]
        return statistics.median(v) if v else None

    lines = [f"Input: {args.rows} bids (peer gen_bids.py, CSV), median of {args.repeat} runs, "
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores.", "",
             "Flink's first column includes submitting the job; its job-only column, like Sluice's "
             "number, is the job's own run time (Sluice: `job finished in`, without process start "
             "and planning). The ratio uses the job-only figures.", "",
             "| query | parallelism | Flink events/s | Flink events/s (job only) | Sluice events/s | Sluice / Flink (job only) |",
             "|---|---|---|---|---|---|"]
    for p in pars:
        for n in names:
            f_all, f_job = median("flink", n, p), median("flink", n, p, "job_events_per_s")
            s = median("sluice", n, p)
            ratio = f"{s / f_job:.1f}x" if s and f_job else "-"
            fmt = lambda v: f"{v:,.0f}" if v else "-"  # noqa: E731
            lines.append(f"| {n} | {p} | {fmt(f_all)} | {fmt(f_job)} | {fmt(s)} | {ratio} |")
    table = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    log(f"results in {out}")


if __name__ == "__main__":
    main()
