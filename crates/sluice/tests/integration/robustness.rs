//! Faults and hostile input, as a careless or hostile user would bring them (the reproductions
//! in `shared/repro/bad-input`): a job ends promptly with the original message, a failed or
//! stopped job publishes nothing, limits turn runaway queries into errors, and weak messages
//! name what is wrong. Every run has a timeout, so a hang fails the test.

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn sluice() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
}

/// How a run ended: its status, its stderr, and how long it took.
struct Ended {
    status: ExitStatus,
    stderr: String,
    took: Duration,
}

/// Runs `cmd` to its end, killing it (and failing the test) after `limit`. With `signal`, sends
/// it that signal (`TERM`, `INT`) after the given delay.
fn run(mut cmd: Command, limit: Duration, signal: Option<(&str, Duration)>) -> Ended {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    let mut signalled = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if let Some((name, after)) = signal {
            if !signalled && started.elapsed() >= after {
                signalled = true;
                let sent = Command::new("kill")
                    .args([&format!("-{name}"), &child.id().to_string()])
                    .status()
                    .unwrap();
                assert!(sent.success());
            }
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("still running after {limit:?}: {}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ended {
        status,
        stderr: reader.join().unwrap(),
        took: started.elapsed(),
    }
}

fn script(dir: &Path, name: &str, sql: &str) -> Command {
    let path = dir.join(name);
    std::fs::write(&path, sql).unwrap();
    let mut cmd = sluice();
    cmd.arg("run").arg(&path);
    cmd
}

/// `n` rows of `id,v` as CSV.
fn csv_rows(path: &Path, n: usize) {
    let text: String = (0..n).map(|i| format!("{i},{}\n", i % 1000)).collect();
    std::fs::write(path, text).unwrap();
}

/// Every file in a sink folder, hidden ones too.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn visible_lines(dir: &Path) -> usize {
    files_in(dir)
        .iter()
        .filter(|n| !n.starts_with('.'))
        .map(|n| {
            std::fs::read_to_string(dir.join(n))
                .unwrap()
                .lines()
                .count()
        })
        .sum()
}

/// A worker's panic used to hang a job of two workers forever (the other waited for it), and
/// with one worker the message was `Any { .. }`. Now the job ends at once, non-zero, with the
/// panic's text, place and operator. (`SLUICE_FAULT` is a test-only hook of the
/// `fault-injection` feature.)
#[test]
fn a_worker_panic_ends_the_job_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    csv_rows(&dir.path().join("in.csv"), 300_000);
    let sql = format!(
        "SET 'table.exec.mini-batch.size' = '256';
         CREATE TABLE src (id BIGINT, v BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}',
           'format' = 'csv', 'source.split-size' = '64kb');
         CREATE TABLE out (id BIGINT, v BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         INSERT INTO out SELECT id, v + 1 FROM src WHERE v >= 0;",
        dir.path().join("in.csv").display(),
        dir.path().join("out").display()
    );
    for (workers, fault) in [
        (2, "panic:1:2000"),
        (1, "panic:0:2000"),
        (2, "panic:0:50000"),
        // While building the dataflow (a connector that panics when it opens).
        (1, "build:0:0"),
        (2, "build:1:0"),
    ] {
        let mut cmd = script(dir.path(), "panic.sql", &sql);
        cmd.args(["--workers", &workers.to_string()])
            .env("SLUICE_FAULT", fault);
        let end = run(cmd, Duration::from_secs(60), None);
        assert_eq!(end.status.code(), Some(1), "{fault}: {}", end.stderr);
        let worker = &fault[6..7];
        assert!(
            end.stderr.contains(&format!(
                "error: worker {worker} panicked: injected fault: worker {worker} panics"
            )) && (fault.starts_with("build") || end.stderr.contains("in operator")),
            "{fault}: {}",
            end.stderr
        );
        assert!(
            end.took < Duration::from_secs(30),
            "{fault}: took {:?}",
            end.took
        );
        // A failed job leaves nothing behind in its sink, visible or hidden.
        assert_eq!(files_in(&dir.path().join("out")), Vec::<String>::new());
    }
}

/// SIGTERM always ends a job: one whose worker hangs is ended after the grace period, with
/// 128 + 15 and a message saying so.
#[test]
fn sigterm_ends_a_hung_job() {
    let dir = tempfile::tempdir().unwrap();
    csv_rows(&dir.path().join("in.csv"), 100_000);
    let sql = format!(
        "CREATE TABLE src (id BIGINT, v BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'csv');
         CREATE TABLE out (id BIGINT) WITH ('connector' = 'blackhole');
         INSERT INTO out SELECT id FROM src WHERE v > 3;",
        dir.path().join("in.csv").display()
    );
    let mut cmd = script(dir.path(), "hang.sql", &sql);
    cmd.args(["--workers", "2"]).env("SLUICE_FAULT", "hang:0:1");
    let end = run(
        cmd,
        Duration::from_secs(40),
        Some(("TERM", Duration::from_secs(2))),
    );
    assert_eq!(end.status.code(), Some(143), "{}", end.stderr);
    assert!(
        end.stderr.contains("did not stop within 10 s of SIGTERM"),
        "{}",
        end.stderr
    );
}

/// A job stopped by SIGTERM before its input ended used to exit 0 and publish part of its
/// result as ordinary files (`19_*`). Now it exits 143, says it was stopped, and publishes
/// nothing unless `'sink.publish-on-stop'` asks for it.
#[test]
fn a_stopped_job_says_so_and_publishes_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let total = 2_000_000;
    csv_rows(&dir.path().join("in.csv"), total);
    for publish in [false, true] {
        let out = dir.path().join(format!("out-{publish}"));
        let option = if publish {
            ", 'sink.publish-on-stop' = 'true'"
        } else {
            ""
        };
        let sql = format!(
            "SET 'table.exec.mini-batch.size' = '16';
             CREATE TABLE src (id BIGINT, v BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'csv');
             CREATE TABLE out (id BIGINT, v BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json'{option});
             INSERT INTO out SELECT id, v FROM src;",
            dir.path().join("in.csv").display(),
            out.display()
        );
        let cmd = script(dir.path(), "stop.sql", &sql);
        let end = run(
            cmd,
            Duration::from_secs(60),
            Some(("TERM", Duration::from_millis(1500))),
        );
        assert_eq!(end.status.code(), Some(143), "{}", end.stderr);
        assert!(
            end.stderr
                .contains("stopped by SIGTERM before the input ended"),
            "{}",
            end.stderr
        );
        let lines = visible_lines(&out);
        if publish {
            assert!(lines > 0 && lines < total, "published {lines} rows");
            assert!(files_in(&out).iter().all(|n| !n.starts_with('.')));
        } else {
            assert_eq!(files_in(&out), Vec::<String>::new(), "{}", end.stderr);
        }
    }
}

/// A malformed line near the end used to leave 65–83 K of 100 K rows published (`11_*`): a
/// failed job publishes nothing, with one worker or two, and the error names file and line.
#[test]
fn a_failed_job_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..100_000 {
        if i == 90_000 {
            text.push_str("{\"order_id\": 90000, \"amount\": oops}\n");
        } else {
            text.push_str(&format!("{{\"order_id\": {i}, \"amount\": {i}.5}}\n"));
        }
    }
    std::fs::write(dir.path().join("in.jsonl"), text).unwrap();
    for workers in ["1", "2"] {
        let out = dir.path().join(format!("out{workers}"));
        let sql = format!(
            "SET 'table.exec.mini-batch.size' = '512';
             CREATE TABLE src (order_id BIGINT, amount DOUBLE) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
             CREATE TABLE o (order_id BIGINT, amount DOUBLE) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json',
               'sink.rolling-policy.file-size' = '64kb');
             INSERT INTO o SELECT order_id, amount FROM src;",
            dir.path().join("in.jsonl").display(),
            out.display()
        );
        let mut cmd = script(dir.path(), "fail.sql", &sql);
        cmd.args(["--workers", workers]);
        let end = run(cmd, Duration::from_secs(60), None);
        assert_eq!(end.status.code(), Some(1), "{}", end.stderr);
        assert!(end.stderr.contains("in.jsonl:90001"), "{}", end.stderr);
        assert_eq!(files_in(&out), Vec::<String>::new(), "{workers} workers");
    }
}

/// Two INSERTs into one filesystem table (`12_*`) used to fail half-way with "No such file or
/// directory" and publish half the rows: each INSERT now writes its own part files, with and
/// without checkpoints.
#[test]
fn two_inserts_into_one_table_write_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    csv_rows(&dir.path().join("in.csv"), 50_000);
    for checkpoints in [false, true] {
        let out = dir.path().join(format!("out-{checkpoints}"));
        let settings = if checkpoints {
            format!(
                "SET 'execution.checkpointing.interval' = '100 ms';
                 SET 'execution.checkpointing.dir' = '{}';",
                dir.path().join(format!("ck-{checkpoints}")).display()
            )
        } else {
            String::new()
        };
        let sql = format!(
            "{settings}
             SET 'table.exec.mini-batch.size' = '500';
             CREATE TABLE src (id BIGINT, v BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'csv');
             CREATE TABLE o (a BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json',
               'sink.rolling-policy.file-size' = '64kb');
             INSERT INTO o SELECT id FROM src;
             INSERT INTO o SELECT id + 100000 FROM src;",
            dir.path().join("in.csv").display(),
            out.display()
        );
        let mut cmd = script(dir.path(), "two.sql", &sql);
        cmd.args(["--workers", "2"]);
        let end = run(cmd, Duration::from_secs(120), None);
        assert!(end.status.success(), "{}", end.stderr);
        let mut got: Vec<i64> = vec![];
        for name in files_in(&out) {
            assert!(!name.starts_with('.'), "left behind: {name}");
            for line in std::fs::read_to_string(out.join(&name)).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                got.push(v["a"].as_i64().unwrap());
            }
        }
        got.sort();
        let want: Vec<i64> = (0..50_000).chain(100_000..150_000).collect();
        assert!(got == want, "checkpoints {checkpoints}: {} rows", got.len());
    }
}

/// Plans that used to overflow the stack (SIGABRT) or run away are refused with a message, or
/// run: a 4,000-term OR of equalities (now an IN list), a 5,000-term `+` chain, 150 nested views,
/// a HOP of 1 ms over a day, and pieces of one byte.
#[test]
fn runaway_plans_are_refused_or_flattened() {
    let ddl = "CREATE TABLE t (id BIGINT, v BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts) \
               WITH ('connector' = 'filesystem', 'path' = '/tmp/none.json', 'format' = 'json');\n";
    let refused = |sql: String, want: &str| {
        let e = sluice_sql::plan_script(&sql)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(want), "{e}");
    };
    let ors: Vec<String> = (0..4000).map(|i| format!("id = {i}")).collect();
    sluice_sql::plan_script(&format!(
        "{ddl}SELECT id FROM t WHERE {};",
        ors.join(" OR ")
    ))
    .unwrap();
    let plus: Vec<String> = (0..5000).map(|_| "v".to_string()).collect();
    refused(
        format!("{ddl}SELECT {} FROM t;", plus.join(" + ")),
        "nests deeper than 256 levels",
    );
    let mut views = ddl.to_string();
    views.push_str("CREATE VIEW v0 AS SELECT * FROM t;\n");
    for i in 1..150 {
        views.push_str(&format!("CREATE VIEW v{i} AS SELECT * FROM v{};\n", i - 1));
    }
    views.push_str("SELECT * FROM v149;");
    refused(
        views,
        "levels of views over views, more than the limit of 64",
    );
    refused(
        format!(
            "{ddl}SELECT COUNT(*), HOP_START(ts, INTERVAL '1' MILLISECOND, INTERVAL '1' DAY) FROM t \
             GROUP BY HOP(ts, INTERVAL '1' MILLISECOND, INTERVAL '1' DAY);"
        ),
        "more than the limit of 10000",
    );
}

/// A 4,000-term OR chain runs and counts what `IN` would; deep JSON records are malformed
/// records (skipped and counted with `json.ignore-parse-errors`, an error naming file and line
/// without), never a stack overflow.
#[test]
fn long_chains_run_and_deep_records_are_bad_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..1000 {
        if i == 500 {
            let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
            text.push_str(&format!("{{\"id\": 500, \"v\": {deep}}}\n"));
        } else {
            text.push_str(&format!("{{\"id\": {i}, \"v\": {i}}}\n"));
        }
    }
    std::fs::write(dir.path().join("in.json"), text).unwrap();
    let ors: Vec<String> = (0..4000).map(|i| format!("v = {}", i * 2)).collect();
    for ignore in [true, false] {
        let sql = format!(
            "CREATE TABLE t (id BIGINT, v BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json'{});
             CREATE TABLE o (id BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
             INSERT INTO o SELECT id FROM t WHERE {};",
            dir.path().join("in.json").display(),
            if ignore {
                ", 'json.ignore-parse-errors' = 'true'"
            } else {
                ""
            },
            dir.path().join(format!("o-{ignore}")).display(),
            ors.join(" OR ")
        );
        let end = run(
            script(dir.path(), "deep.sql", &sql),
            Duration::from_secs(60),
            None,
        );
        if ignore {
            assert!(end.status.success(), "{}", end.stderr);
            assert!(
                end.stderr.contains("records skipped             1"),
                "{}",
                end.stderr
            );
            // The even values among 0..1000 (all below 8,000): 500, less the skipped row's.
            assert_eq!(visible_lines(&dir.path().join("o-true")), 499);
        } else {
            assert_eq!(end.status.code(), Some(1), "{}", end.stderr);
            assert!(
                end.stderr.contains("in.json:501") && end.stderr.contains("deeper than 1000"),
                "{}",
                end.stderr
            );
        }
    }
}

/// A 65,536-character column alias panicked in the table printer (`01_*`).
#[test]
fn a_huge_column_alias_prints() {
    let dir = tempfile::tempdir().unwrap();
    let alias = "x".repeat(65_536);
    let end = run(
        script(
            dir.path(),
            "alias.sql",
            &format!("SELECT id AS {alias} FROM (VALUES (1), (2)) AS t(id);"),
        ),
        Duration::from_secs(60),
        None,
    );
    assert!(end.status.success(), "{}", end.stderr);
}

/// Malformed CSV of every shape, with `csv.ignore-parse-errors` on and off: a short row, a long
/// one, a bad number, and an unclosed quote (which runs to the end of the piece). One of them
/// used to spin with memory growing by gigabytes a second (`07_*`).
#[test]
fn malformed_csv_never_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let shapes = [
        ("short", "1,a\n2\n3,c\n", 2, "short.csv:2"),
        ("long", "1,a\n2,b,extra\n3,c\n", 2, "long.csv:2"),
        ("number", "1,a\nx,b\n3,c\n", 2, "number.csv:2"),
        ("quote", "1,a\n2,\"b\n3,c\n", 1, "quote.csv:2"),
    ];
    for (name, text, good, location) in shapes {
        let path = dir.path().join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        for ignore in [true, false] {
            let sql = format!(
                "CREATE TABLE src (id BIGINT, s STRING) WITH ('connector' = 'filesystem', 'path' = '{}', \
                 'format' = 'csv'{});
                 SELECT * FROM src;",
                path.display(),
                if ignore {
                    ", 'csv.ignore-parse-errors' = 'true'"
                } else {
                    ""
                }
            );
            let end = run(
                script(dir.path(), "csv.sql", &sql),
                Duration::from_secs(30),
                None,
            );
            if ignore {
                assert!(end.status.success(), "{name}: {}", end.stderr);
                assert!(
                    end.stderr
                        .contains(&format!("rows read     src                      {good}")),
                    "{name}: {}",
                    end.stderr
                );
            } else {
                assert_eq!(end.status.code(), Some(1), "{name}: {}", end.stderr);
                assert!(end.stderr.contains(location), "{name}: {}", end.stderr);
            }
        }
    }
}

/// Command lines out of bounds are refused at once: `--workers 100000` used to allocate 3 GB
/// before a thread started (`18_*`), and `--workers 0`, `--processes 0`, a process id beyond
/// the count and `--fresh` with `--from-checkpoint` were accepted.
#[test]
fn out_of_bounds_command_lines_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sql");
    std::fs::write(&path, "SELECT * FROM (VALUES (1)) AS t(a);").unwrap();
    let cases: [(&[&str], &str); 6] = [
        (
            &["--workers", "100000"],
            "--workers 100000: give between 1 and 512",
        ),
        (&["--workers", "0"], "--workers 0"),
        (&["--processes", "0"], "--processes 0"),
        (
            &["--processes", "2", "--process-id", "5"],
            "--process-id 5 must be below --processes 2",
        ),
        (
            &[
                "--fresh",
                "--from-checkpoint",
                "/tmp/x/chk-0000000000000001",
            ],
            "give one of them",
        ),
        (&["--workers", "2"], ""),
    ];
    for (args, want) in cases {
        let mut cmd = sluice();
        cmd.arg("run").arg(&path).args(args);
        let end = run(cmd, Duration::from_secs(30), None);
        if want.is_empty() {
            assert!(end.status.success(), "{}", end.stderr);
        } else {
            assert_eq!(end.status.code(), Some(1), "{args:?}: {}", end.stderr);
            assert!(end.stderr.contains(want), "{args:?}: {}", end.stderr);
        }
    }
}

/// Messages that were weak: a misspelled option, a duplicate key, a CSV option on a JSON table,
/// a negative rate, an impossible precision, a device as input, an empty path (which wrote into
/// the current directory, `13_*`), a raw system error.
#[test]
fn weak_messages_name_what_is_wrong() {
    let cases = [
        (
            "CREATE TABLE t (a BIGINT) WITH ('connector' = 'filesystem', 'paht' = '/tmp/x.json', 'format' = 'json'); SELECT * FROM t;",
            "unknown option 'paht' (did you mean 'path'?)",
        ),
        (
            "CREATE TABLE t (a BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '5', 'number-of-rows' = '6'); SELECT * FROM t;",
            "option 'number-of-rows' is given twice",
        ),
        (
            "CREATE TABLE t (a BIGINT) WITH ('connector' = 'filesystem', 'path' = '/tmp', 'format' = 'json', 'csv.ignore-parse-errors' = 'true'); SELECT * FROM t;",
            "unknown option 'csv.ignore-parse-errors' (did you mean 'json.ignore-parse-errors'?)",
        ),
        (
            "CREATE TABLE t (a BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '-5'); SELECT * FROM t;",
            "'rows-per-second' = '-5' must be a number of at least 0",
        ),
        (
            "CREATE TABLE t (a TIMESTAMP(42)) WITH ('connector' = 'datagen'); SELECT * FROM t;",
            "precision of a timestamp must be between 0 and 9",
        ),
        (
            "CREATE TABLE t (a BIGINT) WITH ('connector' = 'filesystem', 'path' = '/dev/zero', 'format' = 'json'); SELECT * FROM t;",
            "neither a file nor a directory",
        ),
        (
            "CREATE TABLE t (a BIGINT) WITH ('connector' = 'filesystem', 'path' = '/tmp', 'format' = 'json', 'source.split-size' = '1b'); SELECT * FROM t;",
            "below the minimum of 64kb",
        ),
        (
            "CREATE TABLE o (a BIGINT) WITH ('connector' = 'filesystem', 'path' = '  ', 'format' = 'json'); \
             INSERT INTO o SELECT * FROM (VALUES (CAST(1 AS BIGINT))) AS v(a);",
            "option 'path' is empty: name a file or directory",
        ),
        (
            "SET 'execution.checkpointing.interval' = '1 s'; SET 'execution.checkpointing.dir' = '/dev/null/ck'; \
             SELECT * FROM (VALUES (1)) AS v(a);",
            "'execution.checkpointing.dir' = '/dev/null/ck': /dev/null/ck: a part of this path is a file where a directory was expected",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (sql, want) in cases {
        let end = run(
            script(dir.path(), "m.sql", sql),
            Duration::from_secs(30),
            None,
        );
        assert_eq!(end.status.code(), Some(1), "{sql}: {}", end.stderr);
        assert!(end.stderr.contains(want), "{sql}: {}", end.stderr);
    }
}

/// The resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A constant-key join's output used to be built whole per input batch (8,192 rows times every
/// row of the other side), growing by about 1 GB/s (`17_*`). It now streams in bounded batches:
/// 3 K × 3 K rows give all 9 M pairs, and 50 K × 50 K rows (2.5 G pairs) run in flat memory.
#[test]
fn a_join_streams_its_output_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let script_for = |rows: usize, name: &str| {
        let input = dir.path().join(format!("{name}.csv"));
        let text: String = (0..rows)
            .map(|i| format!("{i},1,2026-11-11 00:00:00.000\n"))
            .collect();
        std::fs::write(&input, text).unwrap();
        format!(
            "CREATE TABLE l (id BIGINT, k BIGINT, ts TIMESTAMP(3)) WITH ('connector' = 'filesystem', 'path' = '{p}', 'format' = 'csv');
             CREATE TABLE r (id BIGINT, k BIGINT, ts TIMESTAMP(3)) WITH ('connector' = 'filesystem', 'path' = '{p}', 'format' = 'csv');
             CREATE TABLE bh (a BIGINT, b BIGINT) WITH ('connector' = 'blackhole');
             INSERT INTO bh SELECT l.id, r.id FROM l JOIN r ON l.k = r.k;",
            p = input.display()
        )
    };
    let mut cmd = script(dir.path(), "small.sql", &script_for(3_000, "small"));
    cmd.args(["--workers", "2"]);
    let end = run(cmd, Duration::from_secs(120), None);
    assert!(end.status.success(), "{}", end.stderr);
    assert!(
        end.stderr
            .contains("rows written  bh                       9000000"),
        "{}",
        end.stderr
    );
    let path = dir.path().join("big.sql");
    std::fs::write(&path, script_for(50_000, "big")).unwrap();
    let mut child = sluice()
        .arg("run")
        .arg(&path)
        .args(["--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss(child.id()));
    }
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(still_running, "2.5 G pairs take longer than 4 s");
    assert!(peak < 400 << 20, "peak resident memory {} MB", peak >> 20);
}

/// Past `'sluice.memory.limit'` a job fails, naming the operator with the largest state,
/// instead of growing until the system kills it.
#[test]
fn the_memory_limit_fails_a_job_naming_its_largest_state() {
    let dir = tempfile::tempdir().unwrap();
    let sql = "SET 'sluice.memory.limit' = '200mb';
         CREATE TABLE g (id BIGINT, v BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '0',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '1', 'fields.id.end' = '50000000');
         CREATE TABLE o (id BIGINT, n BIGINT) WITH ('connector' = 'blackhole');
         INSERT INTO o SELECT id, COUNT(*) FROM g GROUP BY id;";
    let mut cmd = script(dir.path(), "mem.sql", sql);
    cmd.args(["--workers", "2"]);
    let end = run(cmd, Duration::from_secs(120), None);
    assert_eq!(end.status.code(), Some(1), "{}", end.stderr);
    assert!(
        end.stderr.contains(
            "more than 'sluice.memory.limit' = 200 MB; the largest state is Aggregate on worker"
        ),
        "{}",
        end.stderr
    );
    // Top-N state is measured too (bytes, not only keys).
    let top = sql.replace(
        "INSERT INTO o SELECT id, COUNT(*) FROM g GROUP BY id;",
        "INSERT INTO o SELECT id, v FROM (SELECT id, v, ROW_NUMBER() OVER (PARTITION BY id ORDER BY v DESC) AS rn FROM g) \
         WHERE rn <= 1;",
    );
    assert_ne!(top, sql);
    let mut cmd = script(dir.path(), "top.sql", &top);
    cmd.args(["--workers", "2"]);
    let end = run(cmd, Duration::from_secs(120), None);
    assert_eq!(end.status.code(), Some(1), "{}", end.stderr);
    assert!(
        end.stderr.contains("the largest state is TopN on worker")
            && end.stderr.contains(" MB in "),
        "{}",
        end.stderr
    );
    let bad = script(dir.path(), "bad.sql", &sql.replace("'200mb'", "'lots'"));
    let end = run(bad, Duration::from_secs(30), None);
    assert!(
        end.stderr
            .contains("'sluice.memory.limit' = 'lots' is not a size"),
        "{}",
        end.stderr
    );
}

/// Rows in flight are counted where they wait: between workers ("exchange into Join") and
/// inside an operator (a join's input that waits while its output budget runs out, rows
/// held for a checkpoint). Everything counted in is counted out by the end of the job, and no
/// peak exceeds the bytes the job moved.
#[test]
fn rows_in_flight_are_counted_where_they_wait() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rows.csv");
    let rows = 3_000;
    let text: String = (0..rows).map(|i| format!("{i},1\n")).collect();
    std::fs::write(&input, text).unwrap();
    let sql = format!(
        "SET 'execution.checkpointing.interval' = '20 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         CREATE TABLE l (id BIGINT, k BIGINT) WITH ('connector' = 'filesystem', 'path' = '{p}', 'format' = 'csv');
         CREATE TABLE r (id BIGINT, k BIGINT) WITH ('connector' = 'filesystem', 'path' = '{p}', 'format' = 'csv');
         CREATE TABLE bh (a BIGINT, b BIGINT) WITH ('connector' = 'blackhole');
         INSERT INTO bh SELECT l.id, r.id FROM l JOIN r ON l.k = r.k;",
        ckpt = dir.path().join("ckpt").display(),
        p = input.display()
    );
    let plan = sluice_sql::plan_script(&sql).unwrap();
    let metrics = sluice_engine::JobMetrics::new();
    let options = sluice_engine::JobOptions {
        workers: 2,
        metrics: metrics.clone(),
        ..Default::default()
    };
    let summary = crate::common::run_job(
        plan,
        options,
        std::sync::Arc::new(crate::common::Folded::default()),
        Duration::from_secs(120),
    )
    .unwrap();
    assert_eq!(
        summary.rows_written.get("bh"),
        Some(&((rows * rows) as u64))
    );
    let in_flight = metrics.in_flight();
    // Two BIGINT columns: at least 16 bytes a row, and Arrow's buffers are padded to 64.
    let moved = 2 * rows as i64 * 64 + (1 << 20);
    let exchange = in_flight["exchange into Join"];
    assert!(exchange.1 > 0 && exchange.1 <= moved, "{in_flight:?}");
    let join_peak: i64 = (0..2)
        .filter_map(|w| in_flight.get(&format!("Join on worker {w}")))
        .map(|(_, peak)| *peak)
        .max()
        .unwrap_or(0);
    assert!(join_peak > 0 && join_peak <= moved, "{in_flight:?}");
    for (place, (now, _)) in &in_flight {
        assert_eq!(
            *now, 0,
            "{place} still counts rows in flight: {in_flight:?}"
        );
    }
}
