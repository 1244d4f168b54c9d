#!/usr/bin/env python3
"""The jdbc connector's throughput against the local PostgreSQL and MariaDB.

Usage: python3 benchmarks/scripts/jdbc_bench.py --sluice target/release/sluice [--runs 3]

Scenarios (each run by `sluice run`, the engines' variants taking turns, medians of --runs):
- upsert: an updating aggregation with 100 K keys (COUNT and SUM per key over 2 M generated
  rows) into a keyed table, without checkpoints at several flush sizes, and with 1 s
  checkpoints (one transaction per checkpoint); the same query into a blackhole for reference.
  Reported: input events/s, and the rows the sink received per second.
- append: 2 M distinct keys into a keyed table (every row an upsert that inserts).
- lookup: 2 M orders LEFT JOINed FOR SYSTEM_TIME AS OF with a 100 K-row customer table, without a
  cache and with a partial cache holding every key, against a blackhole.

Needs psql and mariadb (the clients) and the servers on 127.0.0.1 (trust / root without a
password). Databases `sluice_bench` are created in both and dropped at the end.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

PG = "jdbc:postgresql://127.0.0.1:5432/sluice_bench"
MY = "jdbc:mysql://127.0.0.1:3306/sluice_bench"


def psql(sql, db="sluice_bench"):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-q", "-v",
                    "ON_ERROR_STOP=1", "-c", sql], check=True, stdout=subprocess.DEVNULL)


def mariadb(sql, db="sluice_bench"):
    args = ["mariadb", "-h", "127.0.0.1", "-u", "root"]
    if db:
        args.append(db)
    subprocess.run(args + ["-e", sql], check=True)


def setup():
    psql("DROP DATABASE IF EXISTS sluice_bench WITH (FORCE)", db="postgres")
    psql("CREATE DATABASE sluice_bench", db="postgres")
    mariadb("DROP DATABASE IF EXISTS sluice_bench; CREATE DATABASE sluice_bench", db=None)
    psql("CREATE TABLE customers (id bigint PRIMARY KEY, province text, level int);"
         "INSERT INTO customers SELECT g, 'p' || (g % 31), g % 5 FROM generate_series(0, 99999) g;"
         "ANALYZE customers")


def reset_tables():
    psql("DROP TABLE IF EXISTS totals, sluice_sink_progress;"
         "CREATE TABLE totals (k bigint PRIMARY KEY, n bigint, total bigint)")
    mariadb("DROP TABLE IF EXISTS totals, sluice_sink_progress;"
            "CREATE TABLE totals (k BIGINT PRIMARY KEY, n BIGINT, total BIGINT)")


def run(sluice, script, workers):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "job.sql")
        with open(path, "w") as f:
            f.write(script.replace("{dir}", d))
        started = time.monotonic()
        p = subprocess.run([sluice, "run", "--workers", str(workers), path],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.monotonic() - started
        if p.returncode != 0:
            sys.exit(f"job failed:\n{script}\n{p.stderr}")
        m = re.search(r"job finished in ([0-9.]+) s", p.stderr)
        secs = float(m.group(1)) if m else wall
        written = sum(int(n) for n in re.findall(r"rows written\s+\S+\s+(\d+)", p.stderr))
        return secs, written


GEN = ("CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '{n}', "
       "'fields.id.kind' = 'sequence', 'rows-per-second' = '0');")


def upsert_script(sink, n, flush=None, checkpoints=False):
    pre = ""
    if checkpoints:
        pre = ("SET 'execution.checkpointing.interval' = '1 s';"
               "SET 'execution.checkpointing.dir' = '{dir}/ck';")
    opts = {"blackhole": "'connector' = 'blackhole'",
            "pg": f"'connector' = 'jdbc', 'url' = '{PG}', 'table-name' = 'totals'",
            "my": f"'connector' = 'jdbc', 'url' = '{MY}', 'table-name' = 'totals'"}[sink]
    if flush is not None and sink != "blackhole":
        opts += f", 'sink.buffer-flush.max-rows' = '{flush}'"
    return (pre + GEN.format(n=n) +
            f"CREATE TABLE totals (k BIGINT, n BIGINT, total BIGINT, PRIMARY KEY (k) NOT ENFORCED) WITH ({opts});"
            "INSERT INTO totals SELECT id % 100000, COUNT(*), SUM(id) FROM gen GROUP BY id % 100000;")


def append_script(sink, n):
    opts = {"blackhole": "'connector' = 'blackhole'",
            "pg": f"'connector' = 'jdbc', 'url' = '{PG}', 'table-name' = 'totals', 'sink.buffer-flush.max-rows' = '50000'",
            "my": f"'connector' = 'jdbc', 'url' = '{MY}', 'table-name' = 'totals', 'sink.buffer-flush.max-rows' = '50000'"}[sink]
    return (GEN.format(n=n) +
            f"CREATE TABLE totals (k BIGINT, n BIGINT, total BIGINT, PRIMARY KEY (k) NOT ENFORCED) WITH ({opts});"
            "INSERT INTO totals SELECT id AS k, 1 AS n, id AS total FROM gen;")


def lookup_script(cache, n):
    opts = {"none": "",
            "partial": ", 'lookup.cache' = 'PARTIAL', 'lookup.partial-cache.max-rows' = '200000'"}
    if cache == "blackhole":
        join = "SELECT o.id, CAST(o.id % 31 AS STRING) FROM orders o"
        dim = ""
    else:
        dim = ("CREATE TABLE customers (id BIGINT, province STRING, level INT, PRIMARY KEY (id) NOT ENFORCED) "
               f"WITH ('connector' = 'jdbc', 'url' = '{PG}', 'table-name' = 'customers'{opts[cache]});")
        join = ("SELECT o.id, c.province FROM orders o LEFT JOIN customers FOR SYSTEM_TIME AS OF o.pt AS c "
                "ON o.id % 100000 = c.id")
    return ("CREATE TABLE gen (id BIGINT) WITH ('connector' = 'datagen', "
            f"'number-of-rows' = '{n}', 'fields.id.kind' = 'sequence', 'rows-per-second' = '0');"
            "CREATE VIEW orders AS SELECT id, PROCTIME() AS pt FROM gen;" + dim +
            "CREATE TABLE out (id BIGINT, province STRING) WITH ('connector' = 'blackhole');"
            f"INSERT INTO out {join};")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args()
    setup()
    results = []

    def measure(name, variants, n):
        times = {v: [] for v in variants}
        rows = {v: [] for v in variants}
        for _ in range(a.runs):
            for v, script in variants.items():
                reset_tables()
                secs, written = run(a.sluice, script, a.workers)
                times[v].append(secs)
                rows[v].append(written)
        for v in variants:
            t = statistics.median(times[v])
            w = statistics.median(rows[v])
            r = {"scenario": name, "variant": v, "events": n, "seconds": round(t, 3),
                 "events_per_s": round(n / t), "sink_rows": int(w), "sink_rows_per_s": round(w / t),
                 "runs": times[v]}
            results.append(r)
            print(json.dumps(r), flush=True)

    n = 2_000_000
    measure("upsert 100K keys", {
        "blackhole": upsert_script("blackhole", n),
        "pg flush 100": upsert_script("pg", n, 100),
        "pg flush 10000": upsert_script("pg", n, 10000),
        "pg flush by 1 s interval": upsert_script("pg", n, 0),
        "pg checkpoints 1s": upsert_script("pg", n, checkpoints=True),
        "mariadb flush 100": upsert_script("my", n, 100),
        "mariadb flush 10000": upsert_script("my", n, 10000),
        "mariadb flush by 1 s interval": upsert_script("my", n, 0),
        "mariadb checkpoints 1s": upsert_script("my", n, checkpoints=True),
    }, n)
    n = 2_000_000
    measure("distinct keys", {
        "blackhole": append_script("blackhole", n),
        "pg": append_script("pg", n),
        "mariadb": append_script("my", n),
    }, n)
    measure("lookup join 100K customers", {
        "no join": lookup_script("blackhole", n),
        "no cache": lookup_script("none", n),
        "partial cache": lookup_script("partial", n),
    }, n)
    if a.out:
        with open(a.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    psql("DROP DATABASE IF EXISTS sluice_bench WITH (FORCE)", db="postgres")
    mariadb("DROP DATABASE IF EXISTS sluice_bench", db=None)


if __name__ == "__main__":
    main()
