#!/usr/bin/env python3
"""Load on `sluice serve`: tenants x pipelines on one server, then concurrent readers.

Measures, on this machine:
  - time from submitting CREATE MATERIALIZED VIEW to the first row of the view (per pipeline);
  - resident memory of an idle pipeline's process (one with no input: its generator is at 1 row/s);
  - p50/p99 latency of Postgres-wire SELECTs and REST reads of a view, with N concurrent clients
    (half on each interface) for a fixed time.

Needs asyncpg and aiohttp (pip install asyncpg aiohttp) and a release build of sluice:
  python3 benchmarks/scripts/serve_load.py --sluice $CARGO_TARGET_DIR/release/sluice \\
      --tenants 5 --pipelines 8 --clients 50 --seconds 30
Prints one JSON object with the figures (and writes it with --json FILE).
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

import aiohttp
import asyncpg

ADMIN_PASSWORD = "bench-admin"
ADMIN_TOKEN = "sluice_bench_token_00000000000000000000000000000000"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def pct(values, p):
    values = sorted(values)
    if not values:
        return None
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def main(args):
    data = tempfile.mkdtemp(prefix="sluice-load-")
    pg_port, http_port = free_port(), free_port()
    env = dict(os.environ, SLUICE_ADMIN_PASSWORD=ADMIN_PASSWORD, SLUICE_ADMIN_TOKEN=ADMIN_TOKEN)
    server = subprocess.Popen(
        [args.sluice, "serve", "--data-dir", data, "--pg-port", str(pg_port),
         "--http-port", str(http_port), "--max-parallelism", str(args.tenants * args.pipelines + 8)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        while "Postgres wire" not in server.stdout.readline():
            pass
        dsn = dict(host="127.0.0.1", port=pg_port)
        admin = await asyncpg.connect(user="admin", password=ADMIN_PASSWORD, **dsn)
        tenants = [f"t{i}" for i in range(args.tenants)]
        for t in tenants:
            await admin.execute(f"CREATE TENANT {t}")
            await admin.execute(f"CREATE USER u_{t} WITH PASSWORD 'pw' IN TENANT {t} ROLE owner")
        first_result = []
        views = []
        for t in tenants:
            conn = await asyncpg.connect(user=f"u_{t}", password="pw", **dsn)
            await conn.execute(
                "CREATE TABLE orders (order_id BIGINT, province STRING, amount DOUBLE) "
                f"WITH ('connector' = 'ecommerce', 'rows-per-second' = '{args.rate}')")
            await conn.execute("CREATE TABLE quiet (id BIGINT) WITH ('connector' = 'datagen', "
                               "'rows-per-second' = '1', 'fields.id.kind' = 'sequence', "
                               "'fields.id.start' = '1', 'fields.id.end' = '1000000000')")
            for p in range(args.pipelines):
                name = f"v{p}"
                source = "quiet" if (t == tenants[0] and p == 0) else "orders"
                query = ("SELECT COUNT(*) AS n FROM quiet" if source == "quiet" else
                         "SELECT province, COUNT(*) AS orders, SUM(amount) AS gmv FROM orders GROUP BY province")
                start = time.monotonic()
                await conn.execute(f"CREATE MATERIALIZED VIEW {name} AS {query}")
                while not await conn.fetch(f"SELECT * FROM {name} LIMIT 1"):
                    await asyncio.sleep(0.02)
                first_result.append(time.monotonic() - start)
                views.append((t, name))
            await conn.close()
        # The idle pipeline: one row a second.
        await asyncio.sleep(5)
        rows = await admin.fetch("SHOW PIPELINES")
        idle_pid = next(int(r["pid"]) for r in rows if r["tenant"] == tenants[0] and r["pipeline"] == "v0")
        busy_pids = [int(r["pid"]) for r in rows if r["pid"] and not (r["tenant"] == tenants[0] and r["pipeline"] == "v0")]
        idle_rss = rss_kib(idle_pid)
        busy_rss = statistics.median([rss_kib(p) for p in busy_pids])
        server_rss = rss_kib(server.pid)
        # Readers: half over the wire, half over REST, each on a view of its tenant.
        tokens = {}
        for t in tenants:
            conn = await asyncpg.connect(user=f"u_{t}", password="pw", **dsn)
            tokens[t] = (await conn.fetch("CREATE TOKEN"))[0]["token"]
            await conn.close()
        pg_lat, rest_lat = [], []
        errors = 0
        deadline = time.monotonic() + args.seconds

        async def pg_client(i):
            nonlocal errors
            t, v = views[(i * 7) % len(views)]
            if (t, v) == (tenants[0], "v0"):
                t, v = tenants[0], "v1"
            conn = await asyncpg.connect(user=f"u_{t}", password="pw", **dsn)
            while time.monotonic() < deadline:
                s = time.monotonic()
                try:
                    await conn.fetch(f"SELECT province, orders, gmv FROM {v} ORDER BY gmv DESC LIMIT 10")
                    pg_lat.append(time.monotonic() - s)
                except Exception:
                    errors += 1
            await conn.close()

        async def rest_client(i, session):
            nonlocal errors
            t, v = views[(i * 5 + 3) % len(views)]
            if (t, v) == (tenants[0], "v0"):
                t, v = tenants[0], "v1"
            url = f"http://127.0.0.1:{http_port}/v1/views/{v}/rows"
            headers = {"Authorization": f"Bearer {tokens[t]}"}
            while time.monotonic() < deadline:
                s = time.monotonic()
                try:
                    async with session.get(url, headers=headers) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            continue
                    rest_lat.append(time.monotonic() - s)
                except Exception:
                    errors += 1

        async with aiohttp.ClientSession() as session:
            half = args.clients // 2
            await asyncio.gather(*[pg_client(i) for i in range(half)],
                                 *[rest_client(i, session) for i in range(args.clients - half)])
        status = await admin.fetch("SHOW PIPELINES")
        running = sum(1 for r in status if r["status"] == "running")
        await admin.close()
        ms = lambda x: round(x * 1000, 2) if x is not None else None
        result = {
            "tenants": args.tenants, "pipelines_per_tenant": args.pipelines,
            "rows_per_second_per_pipeline": args.rate, "pipelines_running": running,
            "first_result_ms": {"p50": ms(pct(first_result, 50)), "p99": ms(pct(first_result, 99)),
                                "max": ms(max(first_result))},
            "idle_pipeline_rss_mib": round(idle_rss / 1024, 1),
            "busy_pipeline_rss_mib_median": round(busy_rss / 1024, 1),
            "server_rss_mib": round(server_rss / 1024, 1),
            "clients": args.clients, "seconds": args.seconds,
            "pg_select": {"requests": len(pg_lat), "p50_ms": ms(pct(pg_lat, 50)), "p99_ms": ms(pct(pg_lat, 99))},
            "rest_rows": {"requests": len(rest_lat), "p50_ms": ms(pct(rest_lat, 50)), "p99_ms": ms(pct(rest_lat, 99))},
            "errors": errors,
            "machine_cores": os.cpu_count(),
        }
        print(json.dumps(result, indent=1))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--pipelines", type=int, default=8)
    ap.add_argument("--rate", type=int, default=200, help="orders/s of each pipeline's generator")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--json")
    asyncio.run(main(ap.parse_args()))
