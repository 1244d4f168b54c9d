#!/usr/bin/env python3
"""Nexmark q0-q22 side by side: Apache Flink and Sluice on the same files, same parallelism.

    python3 benchmarks/nexmark_side_by_side.py [--events 1000000] [-p 1,2] [--repeat 3]
                                               [-q q0,q5] [--skip-flink]

Sluice's `nexmark` connector writes the Person, Auction and Bid streams of --events events
(1 : 3 : 46) once, as one CSV file per stream, under ~/.cache/sluice-peers/nexmark/<events>.
Both engines then read those files with their filesystem connector (the DDL of
benchmarks/queries/nexmark/ddl.sql with `'connector' = 'filesystem'`, the same 4 s watermark) and run
each benchmarks/queries/nexmark/qN.sql unchanged (blackhole sinks; q10 writes its partitioned files,
q13's side table is the same 10 000-row file for both). Flink runs in the peer harness's
pyflink venv (../shared/peers/flink/setup.sh), one JVM for all of its runs, after a warm-up
query per parallelism; its "job only" time is Flink's net job runtime, Sluice's the
`job finished in` figure. The engines take turns query by query (Flink's runs of a query in a
JVM of their own, then Sluice's), so that both see about the same state of a shared machine,
whose speed drifts by tens of percent within an hour; Sluice never runs beside a live Flink JVM
(its background threads). Rates count every event of the three streams. q6 is left out: Flink
cannot run it (a ROWS window over an updating input).

Prints a Markdown table (median of --repeat runs) and writes every run as JSON lines.
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
QUERIES = os.path.join(REPO, "benchmarks", "queries", "nexmark")
PEER_HOME = os.environ.get("PEER_HOME", os.path.expanduser("~/.cache/sluice-peers/flink"))
DATA_HOME = os.path.expanduser("~/.cache/sluice-peers/nexmark")
QUERIES = ["q%d" % i for i in range(23) if i != 6]
STREAMS = ["person", "auction", "bid"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sluice_binary():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/sluice-target"))
    path = os.path.join(target, "release", "sluice")
    if not os.path.exists(path):
        sys.exit("no release build of sluice: run `cargo build --release -p sluice` first")
    return path


def file_ddl(data):
    """ddl.sql with the streams read from the CSV files instead of the generator."""
    ddl = open(os.path.join(QUERIES, "ddl.sql")).read()
    for s in STREAMS:
        ddl = ddl.replace(
            "WITH ('connector' = 'nexmark', 'nexmark.table' = '%s', 'nexmark.events' = '{events}')" % s,
            "WITH ('connector' = 'filesystem', 'path' = '%s', 'format' = 'csv')"
            % os.path.join(data, s))
    if "'nexmark'" in ddl:
        sys.exit("benchmarks/queries/nexmark/ddl.sql changed: cannot point its tables at files")
    return strip_comments(ddl)


def strip_comments(sql):
    return "\n".join(l for l in sql.splitlines() if not l.lstrip().startswith("--"))


def statements(sql):
    return [s.strip() for s in sql.split(";") if s.strip()]


def write_data(binary, events):
    data = os.path.join(DATA_HOME, str(events))
    done = os.path.join(data, "done.json")
    if os.path.exists(done):
        return data
    log(f"writing {events} Nexmark events as CSV into {data}")
    ddl = strip_comments(open(os.path.join(QUERIES, "ddl.sql")).read())
    ddl = ddl.replace("{events}", str(events))
    sinks = []
    for s in STREAMS:
        cols = re.search(r"CREATE TABLE %s \((.*?),\s*WATERMARK" % s, ddl, re.S).group(1)
        sinks.append(
            "CREATE TABLE %s_file (%s) WITH ('connector' = 'filesystem', 'path' = '%s', "
            "'format' = 'csv', 'sink.rolling-policy.file-size' = '64gb');\n"
            "INSERT INTO %s_file SELECT * FROM %s;" % (s, cols, os.path.join(data, s), s, s))
    script = os.path.join(DATA_HOME, f"write-{events}.sql")
    os.makedirs(DATA_HOME, exist_ok=True)
    with open(script, "w") as f:
        f.write(ddl + "\n" + "\n".join(sinks) + "\n")
    # One worker: one file per stream, in event-time order as generated.
    subprocess.run([binary, "run", script, "--workers", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    side = os.path.join(data, "out", "side_input")
    os.makedirs(side, exist_ok=True)
    with open(os.path.join(side, "side.json"), "w") as f:
        for k in range(10_000):
            f.write(json.dumps({"key": k, "value": "side-%d" % k}) + "\n")
    json.dump({"events": events}, open(done, "w"))
    return data


def query_sql(name, data):
    sql = strip_comments(open(os.path.join(QUERIES, name + ".sql")).read())
    return sql.replace("{out}", os.path.join(data, "out"))


def run_sluice(binary, name, data, parallelism, work):
    script = os.path.join(work, f"{name}.sql")
    with open(script, "w") as f:
        f.write(file_ddl(data) + "\n" + query_sql(name, data) + "\n")
    p = subprocess.run([binary, "run", script, "--workers", str(parallelism)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        return {"status": "error", "error": p.stderr.strip()[-500:]}
    m = re.search(r"job finished in ([0-9.]+) s", p.stderr)
    return {"status": "ok", "job_seconds": float(m.group(1))}


# --- the Flink side: this file run by the peer venv's python with --flink-runner -------------

def for_flink(sql):
    """Flink's parser reserves DATETIME: the column is quoted (the Nexmark suite's Flink DDL
    quotes it too), and local paths become file:// URLs."""
    sql = re.sub(r"(?<!`)\bdateTime\b(?!`)", "`dateTime`", sql)
    return sql.replace("'path' = '/", "'path' = 'file:///")


def flink_runner(args):
    from pyflink.table import EnvironmentSettings, TableEnvironment
    data = args.data
    for p in [int(x) for x in args.parallelism.split(",")]:
        t_env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
        conf = t_env.get_config()
        conf.set("parallelism.default", str(p))
        conf.set("table.exec.resource.default-parallelism", str(p))
        conf.set("table.local-time-zone", "UTC")
        for s in statements(file_ddl(data)):
            t_env.execute_sql(for_flink(s))
        names = args.queries.split(",")
        for k in range(args.repeat + 1):  # the first round warms the JVM up: q0 only
            for name in (names if k > 0 else ["q0"]):
                rec = {"engine": "flink", "query": name, "parallelism": p, "run": k - 1}
                try:
                    inserts = []
                    for s in statements(query_sql(name, data)):
                        s = for_flink(s)
                        if s.upper().startswith("INSERT"):
                            inserts.append(s)
                        else:
                            table = re.match(r"CREATE TABLE (\w+)", s)
                            if table:
                                t_env.execute_sql("DROP TABLE IF EXISTS %s" % table.group(1))
                            t_env.execute_sql(s)
                    t0 = time.perf_counter()
                    result = t_env.execute_sql(inserts[0])
                    client = result.get_job_client()
                    result.wait(int(args.timeout * 1000))
                    rec["seconds"] = time.perf_counter() - t0
                    jer = client.get_job_execution_result().result()
                    rec["job_seconds"] = jer.get_net_runtime() / 1000.0
                    rec["status"] = "ok"
                except Exception as e:  # noqa: BLE001  (planner errors, timeouts)
                    rec.update(status="error", error=str(e)[:800])
                if k > 0:
                    print(json.dumps(rec), flush=True)
                log(f"flink p={p} {name}: {rec.get('job_seconds', rec.get('error', '')[:200])}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--parallelism", "-p", default="1,2")
    ap.add_argument("--queries", "-q", default=",".join(QUERIES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--skip-flink", action="store_true")
    ap.add_argument("--flink-runner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flink_runner:
        return flink_runner(args)

    binary = sluice_binary()
    data = write_data(binary, args.events)
    names = args.queries.split(",")
    pars = [int(p) for p in args.parallelism.split(",")]
    out = os.path.join(DATA_HOME, "runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    results = []
    python = os.path.join(PEER_HOME, "venv", "bin", "python")
    if not args.skip_flink and not os.path.exists(python):
        sys.exit(f"no peer venv at {python}: run ../shared/peers/flink/setup.sh first")
    flink_log = open(os.path.join(out, "flink.log"), "w")
    for name in names:
        if not args.skip_flink:
            log(f"flink: {name} at p={args.parallelism}")
            r = subprocess.run([python, os.path.abspath(__file__), "--flink-runner", "--data",
                                data, "-p", args.parallelism, "-q", name,
                                "--repeat", str(args.repeat), "--timeout", str(args.timeout)],
                               capture_output=True, text=True)
            flink_log.write(r.stderr)
            results += [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
        for p in pars:
            for k in range(args.repeat):
                rec = run_sluice(binary, name, data, p, out)
                rec.update({"engine": "sluice", "query": name, "parallelism": p, "run": k})
                log(f"sluice p={p} {name} run {k}: {rec.get('job_seconds', rec.get('error'))}")
                results.append(rec)
    flink_log.close()
    for rec in results:
        if rec.get("status") == "ok":
            rec["events_per_s"] = round(args.events / rec["job_seconds"])
        rec["events"] = args.events
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for rec in results:
            f.write(json.dumps(rec) + "\n")

    def median(engine, n, p):
        v = [r["events_per_s"] for r in results if r["engine"] == engine and r["query"] == n
             and r["parallelism"] == p and r.get("status") == "ok"]
        return statistics.median(v) if v else None

    print(f"Input: {args.events} Nexmark events (person, auction, bid CSV files), median of "
          f"{args.repeat} runs, job-only events/s\n")
    print("| query | parallelism | Flink events/s | Sluice events/s | Sluice / Flink |")
    print("|---|---|---|---|---|")
    for p in pars:
        for n in names:
            f, s = median("flink", n, p), median("sluice", n, p)
            ratio = f"{s / f:.1f}x" if f and s else "-"
            fmt = lambda v: f"{v:,.0f}" if v else "error"  # noqa: E731
            print(f"| {n} | {p} | {fmt(f) if not args.skip_flink else '-'} | {fmt(s)} | {ratio} |")
    log(f"results in {out}")


if __name__ == "__main__":
    main()
