//! Bad input: each mistake gets a non-zero exit and a message that names it.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `script` with `sluice run`; a run that takes over a minute is killed and fails the test.
fn sluice(script: &str, dir: &Path) -> Output {
    let file = dir.join("job.sql");
    std::fs::write(&file, script).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.arg("run").arg(&file);
    crate::common::output_within(cmd, std::time::Duration::from_secs(60))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn orders_ddl(path: &Path, extra: &str) -> String {
    format!(
        "CREATE TABLE orders (id BIGINT, category STRING, amount DOUBLE, ts TIMESTAMP(3),\n  WATERMARK FOR ts AS ts - INTERVAL '1' SECOND\n) \
         WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json'{extra});\n",
        path.display()
    )
}

fn fails_with(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "message should mention {n:?}; got: {err}");
    }
}

fn write_orders(dir: &Path, lines: &[&str]) -> std::path::PathBuf {
    let p = dir.join("orders.json");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

const GOOD: &str = r#"{"id": 1, "category": "a", "amount": 2.5, "ts": "2026-11-11 00:00:01.000"}"#;

#[test]
fn malformed_sql_names_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let o = sluice("SET 'a' = 'b';\nSELECT id\n  FROM t WHERE );", dir.path());
    fails_with(&o, &["line 3, column 16"]);
}

#[test]
fn unknown_column_and_table() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_orders(dir.path(), &[GOOD]);
    let o = sluice(
        &format!("{}SELECT nope FROM orders;", orders_ddl(&data, "")),
        dir.path(),
    );
    fails_with(&o, &["nope", "line 4"]);
    let o = sluice(
        &format!("{}SELECT id FROM missing;", orders_ddl(&data, "")),
        dir.path(),
    );
    fails_with(&o, &["missing", "not found"]);
}

#[test]
fn type_mismatch_on_insert() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_orders(dir.path(), &[GOOD]);
    let script = format!(
        "{}CREATE TABLE out (t DATE) WITH ('connector' = 'print');\nINSERT INTO out SELECT amount > 1 FROM orders;",
        orders_ddl(&data, "")
    );
    fails_with(
        &sluice(&script, dir.path()),
        &["INSERT INTO out", "Boolean", "Date32"],
    );
}

#[test]
fn unknown_connector_option() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_orders(dir.path(), &[GOOD]);
    let o = sluice(
        &format!(
            "{}SELECT id FROM orders;",
            orders_ddl(&data, ", 'json.ignore-parse-errrors' = 'true'")
        ),
        dir.path(),
    );
    fails_with(
        &o,
        &[
            "table 'orders'",
            "unknown option 'json.ignore-parse-errrors'",
        ],
    );
}

#[test]
fn missing_input_file() {
    let dir = tempfile::tempdir().unwrap();
    let o = sluice(
        &format!(
            "{}SELECT id FROM orders;",
            orders_ddl(&dir.path().join("nothing.json"), "")
        ),
        dir.path(),
    );
    fails_with(&o, &["nothing.json", "No such file"]);
}

#[test]
fn malformed_json_line_is_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_orders(
        dir.path(),
        &[GOOD, GOOD, r#"{"id": 3, "amount": "lots"#, GOOD],
    );
    let o = sluice(
        &format!("{}SELECT id FROM orders;", orders_ddl(&data, "")),
        dir.path(),
    );
    fails_with(
        &o,
        &[
            "orders.json:3",
            "malformed JSON",
            "json.ignore-parse-errors",
        ],
    );

    let o = sluice(
        &format!(
            "{}SELECT id FROM orders;",
            orders_ddl(&data, ", 'json.ignore-parse-errors' = 'true'")
        ),
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.matches("| +I |").count(),
        3,
        "the three good rows are printed: {out}"
    );
    assert!(
        stderr(&o).contains("records skipped             1"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn updating_result_into_append_only_sink_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_orders(dir.path(), &[GOOD]);
    let script = format!(
        "{}CREATE TABLE out (category STRING, n BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');\n\
         INSERT INTO out SELECT category, COUNT(*) FROM orders GROUP BY category;",
        orders_ddl(&data, ""),
        dir.path().join("out").display()
    );
    fails_with(
        &sluice(&script, dir.path()),
        &["updating result", "debezium-json"],
    );
}

#[test]
fn order_by_without_limit_is_rejected_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_orders(dir.path(), &[GOOD]);
    let o = sluice(
        &format!(
            "{}SELECT id FROM orders ORDER BY amount;",
            orders_ddl(&data, "")
        ),
        dir.path(),
    );
    fails_with(&o, &["ORDER BY", "remove it"]);
}

#[test]
fn debezium_sink_folds_to_the_final_counts() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        r#"{"id": 1, "category": "a", "amount": 1, "ts": "2026-11-11 00:00:01.000"}"#,
        r#"{"id": 2, "category": "b", "amount": 1, "ts": "2026-11-11 00:00:02.000"}"#,
        r#"{"id": 3, "category": "a", "amount": 1, "ts": "2026-11-11 00:00:03.000"}"#,
    ];
    let data = write_orders(dir.path(), &rows);
    let out = dir.path().join("out");
    let script = format!(
        "{}CREATE TABLE out (category STRING, n BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'debezium-json');\n\
         INSERT INTO out SELECT category, COUNT(*) FROM orders GROUP BY category;",
        orders_ddl(&data, ""),
        out.display()
    );
    let o = sluice(&script, dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        files.iter().all(|f| !f.starts_with('.')),
        "no in-progress file is left: {files:?}"
    );
    let mut state = std::collections::BTreeMap::new();
    for f in files {
        for line in std::fs::read_to_string(out.join(f)).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if !v["before"].is_null() {
                state.remove(v["before"]["category"].as_str().unwrap());
            }
            if !v["after"].is_null() {
                state.insert(
                    v["after"]["category"].as_str().unwrap().to_string(),
                    v["after"]["n"].as_i64().unwrap(),
                );
            }
        }
    }
    assert_eq!(
        state,
        [("a".to_string(), 2), ("b".to_string(), 1)]
            .into_iter()
            .collect()
    );
}

#[test]
fn checkpoint_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_orders(dir.path(), &[GOOD]);
    let script = format!(
        "SET 'execution.checkpointing.interval' = '1s';\n{}SELECT id FROM orders;",
        orders_ddl(&data, "")
    );
    fails_with(
        &sluice(&script, dir.path()),
        &["'execution.checkpointing.dir' is not"],
    );
    let script = format!(
        "SET 'a' = 'b';\n{}SELECT id FROM orders;",
        orders_ddl(&data, "")
    );
    fails_with(
        &sluice(&script, dir.path()),
        &["line 1", "SET 'a': unknown option"],
    );
    let ckpt = dir.path().join("ckpt");
    let with = |setting: &str| {
        format!(
            "SET 'execution.checkpointing.interval' = '1s';\nSET 'execution.checkpointing.dir' = '{}';\n{setting}\n{}SELECT id FROM orders;",
            ckpt.display(),
            orders_ddl(&data, "")
        )
    };
    let cases = [
        (
            "SET 'execution.checkpointing.snapshot-compression' = 'lz4';",
            "SET 'execution.checkpointing.snapshot-compression' = 'lz4': the value must be 'true' or 'false'",
        ),
        (
            "SET 's3.endpont' = 'http://127.0.0.1:9000';",
            "SET 's3.endpont': unknown option; did you mean 's3.endpoint'?",
        ),
    ];
    for (setting, error) in cases {
        fails_with(&sluice(&with(setting), dir.path()), &[error]);
    }
    let bucketless = format!(
        "SET 'execution.checkpointing.interval' = '1s';\nSET 'execution.checkpointing.dir' = 's3://';\n{}SELECT id FROM orders;",
        orders_ddl(&data, "")
    );
    fails_with(&sluice(&bucketless, dir.path()), &["names no bucket"]);
}

/// `sluice bench --baseline`: a result more than 10% slower than the baseline fails the run and
/// names the query; one that is not passes.
#[test]
fn bench_baseline_flags_regressions() {
    let dir = tempfile::tempdir().unwrap();
    let bench = |rate: f64| {
        let baseline = dir.path().join(format!("baseline-{rate}.jsonl"));
        std::fs::write(
            &baseline,
            format!("{{\"benchmark\":\"q2\",\"workers\":1,\"events_per_s\":{rate}}}\n"),
        )
        .unwrap();
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args([
                "bench",
                "nexmark",
                "--events",
                "20000",
                "--runs",
                "1",
                "--workers",
                "1",
            ])
            .args(["--only", "q2", "--baseline"])
            .arg(&baseline)
            .output()
            .unwrap()
    };
    // No machine runs q2 at a trillion events per second.
    fails_with(&bench(1e12), &["more than 10% slower", "q2 (1 workers)"]);
    let o = bench(1.0);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("baseline 1"));
    // A baseline that is not JSON lines of results is an error that names the line.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"benchmark\": \"q2\"}\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "bench",
            "nexmark",
            "--events",
            "1000",
            "--only",
            "q2",
            "--baseline",
        ])
        .arg(&bad)
        .output()
        .unwrap();
    fails_with(&o, &["bad.jsonl:1", "events_per_s"]);
}

/// `sluice explain FILE` prints the plan without running anything, and a script's `EXPLAIN`
/// statement prints its statement's plan instead of running it.
#[test]
fn explain_prints_the_plan_without_running() {
    let dir = tempfile::tempdir().unwrap();
    // The input does not exist: nothing may try to read it.
    let missing = dir.path().join("no-such-dir");
    let ddl = orders_ddl(&missing, "");
    let query = "SELECT window_start, COUNT(*) FROM TABLE(HOP(TABLE orders, DESCRIPTOR(ts), INTERVAL '1' SECOND, INTERVAL '5' SECOND)) GROUP BY window_start, window_end, category;";
    let path = dir.path().join("q.sql");
    std::fs::write(&path, format!("{ddl}\n{query}")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("explain")
        .arg(&path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("WindowAggregate"), "{out}");
    assert!(
        out.contains("rule hop-slicing: panes of 1 s merged into windows of 5 s"),
        "{out}"
    );
    let o = sluice(&format!("{ddl}\nEXPLAIN {query}"), dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("WindowAggregate"));
}

/// `EXPLAIN ANALYZE` runs its statement and then prints the plan with the rows each node
/// produced on all workers; a SELECT's own rows are not printed. The counts are checked by hand:
/// ids 1..=1000, of which 333 are multiples of 3, in 10 groups by `id % 10`.
#[test]
fn explain_analyze_reports_rows_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("q.sql");
    std::fs::write(
        &script,
        "CREATE TABLE s (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '1000',
           'rows-per-second' = '0', 'fields.id.kind' = 'sequence', 'fields.id.start' = '1');
         EXPLAIN ANALYZE SELECT id % 10 AS k, COUNT(*) AS n FROM s WHERE id % 3 = 0 GROUP BY id % 10;",
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["run", "--workers", "2"]).arg(&script);
    let o = crate::common::output_within(cmd, std::time::Duration::from_secs(60));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let rows = |node: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.contains(node))
            .unwrap_or_else(|| panic!("no {node} in {out}"));
        line.split("rows=").nth(1).unwrap().trim().parse().unwrap()
    };
    assert_eq!(rows("Scan s"), 1000, "{out}");
    assert_eq!(rows("Filter"), 333, "{out}");
    // One insert per group at least; updates retract and insert, so at most 1 + 2 per row.
    let changes = rows("GroupAggregate");
    assert!((10..=10 + 2 * 323).contains(&changes), "{out}");
    // The SELECT's changelog is counted, not printed: no row of the result table.
    assert!(
        !out.lines()
            .any(|l| l.starts_with('|') || l.starts_with('+')),
        "{out}"
    );
}

/// `--progress always` logs the status every second when stderr is not a terminal: rows read
/// per source and their rate (here about the generator's 2,000 rows/s); `never` logs nothing,
/// and `auto` off a terminal only every 10 s (so nothing in a 3 s run).
#[test]
fn progress_lines_report_rows_read_and_their_rate() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("gen.sql");
    std::fs::write(
        &script,
        "CREATE TABLE g (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '2000', 'number-of-rows' = '6000');
         CREATE TABLE bh (id BIGINT) WITH ('connector' = 'blackhole');
         INSERT INTO bh SELECT id FROM g;",
    )
    .unwrap();
    let lines = |mode: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("run")
            .arg(&script)
            .args(["--progress", mode])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
            .lines()
            .filter(|l| l.starts_with("progress: "))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let always = lines("always");
    assert!(always.len() >= 2, "{always:?}");
    let rates: Vec<f64> = always
        .iter()
        .filter_map(|l| {
            let rate = l.split(" (").nth(1)?.split("/s)").next()?;
            let (n, unit) = rate.split_once(' ').unwrap_or((rate, ""));
            let n: f64 = n.parse().ok()?;
            Some(if unit == "K" { n * 1e3 } else { n })
        })
        .collect();
    assert!(
        rates.iter().any(|r| (1_000.0..=3_000.0).contains(r)),
        "a rate near 2,000 rows/s: {always:?}"
    );
    assert!(always[0].contains("read g "), "{always:?}");
    assert!(lines("never").is_empty());
    assert!(lines("auto").is_empty());
}

/// `--log-format json`: everything on stderr is one JSON object per line (warnings, the
/// engine's checkpoint lines, the summary, and the error of a failing job), so that a collector
/// can parse it; the text format marks warnings and errors.
#[test]
fn log_lines_are_json_objects_with_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    // 2,000 rows at 10,000 a second: a few checkpoints happen.
    let script = format!(
        "SET 'parallelism.default' = '4';\nSET 'execution.checkpointing.interval' = '50 ms';\n\
         SET 'execution.checkpointing.dir' = '{}';\n\
         CREATE TABLE orders (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '2000', 'rows-per-second' = '10000');\n\
         SELECT COUNT(*) AS n FROM orders;",
        dir.path().join("ck").display(),
    );
    let file = dir.path().join("job.sql");
    std::fs::write(&file, &script).unwrap();
    let run = |format: &str, file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["--log-format", format, "run", "--fresh"])
            .arg(file)
            .output()
            .unwrap()
    };
    let o = run("json", &file);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stderr(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let with = |level: &str, text: &str| {
        lines
            .iter()
            .any(|v| v["level"] == level && v["message"].as_str().is_some_and(|m| m.contains(text)))
    };
    assert!(
        with("WARN", "'parallelism.default' is a Flink option"),
        "{lines:?}"
    );
    assert!(with("INFO", "committed"), "a checkpoint line: {lines:?}");
    assert!(
        with("INFO", "rows read     orders"),
        "the summary: {lines:?}"
    );

    let o = run("text", &file);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .lines()
            .any(|l| l.starts_with("warning: ")
                && l.contains("'parallelism.default' is a Flink option")),
        "{}",
        stderr(&o)
    );

    let bad = dir.path().join("bad.sql");
    std::fs::write(&bad, "SELECT nope FROM nowhere;").unwrap();
    let o = run("json", &bad);
    assert!(!o.status.success());
    let last: serde_json::Value = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["message"].as_str().unwrap().contains("nowhere"),
        "{last}"
    );
}
