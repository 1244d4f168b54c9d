#!/usr/bin/env python3
"""The CDC sources' throughput against the local PostgreSQL (postgres-cdc) and MariaDB (mysql-cdc).

Usage: python3 benchmarks/scripts/cdc_bench.py --sluice target/release/sluice [--rows 2000000] [--runs 3]

One job per source and run: `SELECT category, COUNT(*), SUM(amount) FROM orders GROUP BY category`
over the CDC table into a jdbc table of the same database (37 keys, flushed every 100 ms, no
checkpoints). The sink table is polled every 50 ms, and a phase ends when it equals the
database's own GROUP BY. Phases:
- snapshot: `--rows` rows in the table before the start; from the process start to equality;
- insert: `--rows` more rows inserted in one transaction; from its commit to equality;
- update: every row's amount changed in one transaction (a -U and a +U each); from its commit to
  equality.
Reported: change rows per second of each phase (the sources' rate, the aggregation is light).
PostgreSQL and MariaDB take turns; medians of --runs.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def psql(sql, db="sluice_cdc_bench"):
    p = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-qAt", "-v",
                        "ON_ERROR_STOP=1", "-c", sql], check=True, capture_output=True, text=True)
    return p.stdout.strip()


def mariadb(sql, db="sluice_cdc_bench"):
    args = ["mariadb", "-h", "127.0.0.1", "-u", "root", "-N", "-B"]
    if db:
        args.append(db)
    p = subprocess.run(args + ["-e", sql], check=True, capture_output=True, text=True)
    return p.stdout.strip()


ANSWER = "SELECT category, COUNT(*), SUM(amount) FROM orders GROUP BY category ORDER BY category"
GOT = "SELECT category, n, total FROM totals ORDER BY category"


class Pg:
    name = "postgres-cdc"

    def setup(self, rows):
        psql("DROP DATABASE IF EXISTS sluice_cdc_bench WITH (FORCE)", db="postgres")
        psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
             "WHERE slot_name = 'sluice_cdc_bench'", db="postgres")
        psql("CREATE DATABASE sluice_cdc_bench", db="postgres")
        psql("CREATE TABLE orders (id bigint PRIMARY KEY, category text NOT NULL, amount bigint NOT NULL);"
             "ALTER TABLE orders REPLICA IDENTITY FULL;"
             "CREATE TABLE totals (category text PRIMARY KEY, n bigint, total bigint);"
             f"INSERT INTO orders SELECT i, 'c' || (i % 37), (i::bigint * 7919) % 1000 FROM generate_series(1, {rows}) i")

    def source(self):
        return ("'connector' = 'postgres-cdc', 'hostname' = '127.0.0.1', 'username' = 'postgres', "
                "'database-name' = 'sluice_cdc_bench', 'table-name' = 'orders', "
                "'slot.name' = 'sluice_cdc_bench'")

    def sink_url(self):
        return "jdbc:postgresql://127.0.0.1:5432/sluice_cdc_bench"

    def query(self, sql):
        return psql(sql)

    def insert(self, start, rows):
        psql(f"INSERT INTO orders SELECT i, 'c' || (i % 37), (i::bigint * 7919) % 1000 "
             f"FROM generate_series({start}, {start + rows - 1}) i")

    def update(self):
        psql("UPDATE orders SET amount = amount + 1")

    def drop(self):
        psql("DROP DATABASE IF EXISTS sluice_cdc_bench WITH (FORCE)", db="postgres")
        psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
             "WHERE slot_name = 'sluice_cdc_bench'", db="postgres")


class My:
    name = "mysql-cdc"

    def setup(self, rows):
        mariadb("DROP DATABASE IF EXISTS sluice_cdc_bench; CREATE DATABASE sluice_cdc_bench", db=None)
        mariadb("CREATE TABLE orders (id BIGINT PRIMARY KEY, category VARCHAR(20) NOT NULL, amount BIGINT NOT NULL);"
                "CREATE TABLE totals (category VARCHAR(20) PRIMARY KEY, n BIGINT, total BIGINT);"
                f"INSERT INTO orders SELECT seq, CONCAT('c', seq % 37), (seq * 7919) % 1000 FROM seq_1_to_{rows}")

    def source(self):
        return ("'connector' = 'mysql-cdc', 'hostname' = '127.0.0.1', 'username' = 'root', "
                "'database-name' = 'sluice_cdc_bench', 'table-name' = 'orders', 'server-id' = '5999'")

    def sink_url(self):
        return "jdbc:mysql://127.0.0.1:3306/sluice_cdc_bench"

    def query(self, sql):
        return mariadb(sql)

    def insert(self, start, rows):
        mariadb(f"INSERT INTO orders SELECT seq, CONCAT('c', seq % 37), (seq * 7919) % 1000 "
                f"FROM seq_{start}_to_{start + rows - 1}")

    def update(self):
        mariadb("UPDATE orders SET amount = amount + 1")

    def drop(self):
        mariadb("DROP DATABASE IF EXISTS sluice_cdc_bench", db=None)


def wait_equal(db, proc, limit=600):
    want = db.query(ANSWER)
    started = time.monotonic()
    while db.query(GOT) != want:
        if proc.poll() is not None:
            sys.exit(f"{db.name}: the job ended:\n{proc.stderr.read()}")
        if time.monotonic() - started > limit:
            sys.exit(f"{db.name}: no equality within {limit} s")
        time.sleep(0.05)
    return time.monotonic()


def run_once(sluice, db, rows, workers):
    db.setup(rows)
    script = (
        f"CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT, PRIMARY KEY (id) NOT ENFORCED)"
        f"  WITH ({db.source()});"
        f"CREATE TABLE totals (category STRING, n BIGINT, total BIGINT, PRIMARY KEY (category) NOT ENFORCED)"
        f"  WITH ('connector' = 'jdbc', 'url' = '{db.sink_url()}', 'table-name' = 'totals', 'username' = "
        f"'{'root' if db.name == 'mysql-cdc' else 'postgres'}', 'sink.buffer-flush.interval' = '100 ms');"
        "INSERT INTO totals SELECT category, COUNT(*), SUM(amount) FROM orders GROUP BY category;")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "job.sql")
        with open(path, "w") as f:
            f.write(script)
        started = time.monotonic()
        proc = subprocess.Popen([sluice, "run", "--workers", str(workers), path],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            snapshot = wait_equal(db, proc) - started
            db.insert(rows + 1, rows)
            committed = time.monotonic()
            insert = wait_equal(db, proc) - committed
            db.update()
            committed = time.monotonic()
            update = wait_equal(db, proc) - committed
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    db.drop()
    return {
        "source": db.name,
        "rows": rows,
        "workers": workers,
        "snapshot_rows_per_s": rows / snapshot,
        "insert_rows_per_s": rows / insert,
        "update_changes_per_s": 4 * rows / update,
        "snapshot_s": snapshot,
        "insert_s": insert,
        "update_s": update,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    results = []
    for _ in range(args.runs):
        for db in (Pg(), My()):
            r = run_once(args.sluice, db, args.rows, args.workers)
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    for name in ("postgres-cdc", "mysql-cdc"):
        mine = [r for r in results if r["source"] == name]
        print(f"{name}: snapshot {statistics.median(r['snapshot_rows_per_s'] for r in mine):,.0f} rows/s, "
              f"insert {statistics.median(r['insert_rows_per_s'] for r in mine):,.0f} rows/s, "
              f"update {statistics.median(r['update_changes_per_s'] for r in mine):,.0f} change rows/s")


if __name__ == "__main__":
    main()
