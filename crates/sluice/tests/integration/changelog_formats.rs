//! The changelog formats `debezium-json` and `canal-json` read as updating tables: an updating
//! result written in one format and read back in the same format folds to the batch answer,
//! hand-written records with every kind of change fold to hand-checked rows, and bad records
//! name their file and line.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::common;

/// Runs `script` in this process; its SELECT's changelog folded.
fn run_folded(script: &str, workers: usize) -> Result<BTreeMap<Vec<String>, i64>, String> {
    let plan = sluice_sql::plan_script(script).map_err(|e| e.to_string())?;
    common::run_folded(plan, workers, Duration::from_secs(120)).map(|(_, rows)| rows)
}

/// 20 000 orders of 300 users: `(user, amount in cents)`, as JSON lines.
fn orders(path: &Path) -> Vec<(i64, i64)> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let rows: Vec<(i64, i64)> = (0..20_000)
        .map(|_| {
            (
                rng.random_range(1..=300i64),
                rng.random_range(1..=50_000i64),
            )
        })
        .collect();
    let text: String = rows
        .iter()
        .enumerate()
        .map(|(i, (u, a))| format!("{{\"id\":{i},\"user_id\":{u},\"amount\":{a}}}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
    rows
}

/// The batch answer of the query over the per-user totals: users and their total per bucket of
/// order counts (`n / 10`).
fn buckets(orders: &[(i64, i64)]) -> BTreeMap<Vec<String>, i64> {
    let mut per_user: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (u, a) in orders {
        let e = per_user.entry(*u).or_default();
        e.0 += 1;
        e.1 += a;
    }
    let mut per_bucket: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (n, total) in per_user.values() {
        let e = per_bucket.entry(n / 10).or_default();
        e.0 += 1;
        e.1 += total;
    }
    per_bucket
        .into_iter()
        .map(|(b, (users, total))| (vec![b.to_string(), users.to_string(), total.to_string()], 1))
        .collect()
}

/// An updating aggregation written as `debezium-json` (and as `canal-json`) by 2 workers, read
/// back as a changelog table by 1 and 3 workers, and aggregated again: the result is the batch
/// answer. The written changes hold updates (`-U`/`+U` pairs), so reading them right means
/// retracting each user's old total.
#[test]
fn an_updating_result_written_and_read_back_folds_to_the_batch_answer() {
    for format in ["debezium-json", "canal-json"] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("orders.json");
        let rows = orders(&input);
        let totals = dir.path().join("totals");
        let script = format!(
            "CREATE TABLE orders (id BIGINT, user_id BIGINT, amount BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
             CREATE TABLE totals (user_id BIGINT, n BIGINT, total BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = '{format}');
             INSERT INTO totals SELECT user_id, COUNT(*), SUM(amount) FROM orders GROUP BY user_id;",
            input.display(),
            totals.display()
        );
        let (ok, stderr) = common::run_cli(dir.path(), &script, 2, Duration::from_secs(120));
        assert!(ok, "{format}: {stderr}");
        let written: String = std::fs::read_dir(&totals)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        let update = if format == "debezium-json" {
            "\"op\":\"u\""
        } else {
            "\"type\":\"UPDATE\""
        };
        assert!(
            written.contains(update),
            "{format}: no update record written"
        );
        for workers in [1, 3] {
            let got = run_folded(
                &format!(
                    "CREATE TABLE totals (user_id BIGINT, n BIGINT, total BIGINT)
                       WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = '{format}');
                     SELECT n / 10, COUNT(*), SUM(total) FROM totals GROUP BY n / 10;",
                    totals.display()
                ),
                workers,
            )
            .unwrap();
            assert_eq!(got, buckets(&rows), "{format}, {workers} workers");
        }
    }
}

/// Hand-written Canal records: inserts of two rows in one record, an update whose `old` holds
/// only the changed field, a delete, a DDL record, and a change of another table (skipped by
/// `canal-json.table.include`).
#[test]
fn canal_records_of_every_kind_fold_to_the_hand_checked_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("binlog.json");
    let records = [
        r#"{"data":[{"id":1,"name":"scooter","weight":5.5},{"id":2,"name":"car battery","weight":8.1}],"old":null,"database":"shop","table":"products","isDdl":false,"type":"INSERT"}"#,
        r#"{"data":[{"id":3,"name":"hammer","weight":0.75}],"old":null,"database":"shop","table":"products","isDdl":false,"type":"INSERT"}"#,
        r#"{"data":[{"id":9,"name":"other","weight":1.0}],"old":null,"database":"shop","table":"orders","isDdl":false,"type":"INSERT"}"#,
        r#"{"data":null,"old":null,"database":"shop","table":"products","isDdl":true,"type":"ALTER","sql":"ALTER TABLE products ADD c INT"}"#,
        r#"{"data":[{"id":1,"name":"scooter","weight":5.15}],"old":[{"weight":5.5}],"database":"shop","table":"products","isDdl":false,"type":"UPDATE"}"#,
        r#"{"data":[{"id":2,"name":"car battery","weight":8.1}],"old":null,"database":"shop","table":"products","isDdl":false,"type":"DELETE"}"#,
    ];
    std::fs::write(&path, records.join("\n") + "\n").unwrap();
    let table = |extra: &str| {
        format!(
            "CREATE TABLE products (id BIGINT, name STRING, weight DOUBLE)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'canal-json'{extra});",
            path.display()
        )
    };
    let got = run_folded(
        &(table(", 'canal-json.table.include' = 'prod.*'")
            + "SELECT id, name, weight FROM products;"),
        1,
    )
    .unwrap();
    let w = |v: f64| format!("{v:.11e}");
    let row = |id: &str, name: &str, v: f64| (vec![id.into(), name.into(), w(v)], 1);
    let want: BTreeMap<Vec<String>, i64> =
        [row("1", "scooter", 5.15), row("3", "hammer", 0.75)].into();
    assert_eq!(got, want);
    // The same records through an aggregation: the update retracts the old weight.
    let got = run_folded(
        &(table(
            ", 'canal-json.database.include' = 'shop', 'canal-json.table.include' = 'products'",
        ) + "SELECT COUNT(*), SUM(weight) FROM products;"),
        2,
    )
    .unwrap();
    assert_eq!(got, [(vec!["2".into(), w(5.9)], 1)].into());
    // Without the table filter, the other table's row counts too.
    let got = run_folded(&(table("") + "SELECT COUNT(*) FROM products;"), 1).unwrap();
    assert_eq!(got, [(vec!["3".into()], 1)].into());
}

/// Debezium records with `schema-include` envelopes, snapshot reads (`r`) and deletes fold to
/// the hand-checked table; an envelope without the option set is an error that names it.
#[test]
fn debezium_envelopes_snapshot_reads_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cdc.json");
    let records = [
        r#"{"schema":{},"payload":{"before":null,"after":{"id":1,"v":"a"},"op":"r"}}"#,
        r#"{"schema":{},"payload":{"before":null,"after":{"id":2,"v":"b"},"op":"c"}}"#,
        r#"{"schema":{},"payload":{"before":{"id":1,"v":"a"},"after":{"id":1,"v":"a2"},"op":"u"}}"#,
        r#"{"schema":{},"payload":{"before":{"id":2,"v":"b"},"after":null,"op":"d"}}"#,
    ];
    std::fs::write(&path, records.join("\n") + "\n").unwrap();
    let script = |extra: &str| {
        format!(
            "CREATE TABLE t (id BIGINT, v STRING)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'debezium-json'{extra});
             SELECT id, v FROM t;",
            path.display()
        )
    };
    let got = run_folded(&script(", 'debezium-json.schema-include' = 'true'"), 2).unwrap();
    assert_eq!(got, [(vec!["1".into(), "a2".into()], 1)].into());
    let err = run_folded(&script(""), 1).unwrap_err();
    assert!(err.contains("cdc.json:1"), "{err}");
    assert!(
        err.contains("'debezium-json.schema-include' = 'true'"),
        "{err}"
    );
}

/// A record with an unknown operation, or an update without its old row, fails the job naming
/// the file and line; `debezium-json.ignore-parse-errors` skips and counts such records.
#[test]
fn bad_change_records_name_their_file_and_line_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cdc.json");
    let records = [
        r#"{"before":null,"after":{"id":1,"v":"a"},"op":"c"}"#,
        r#"{"before":null,"after":{"id":2,"v":"b"},"op":"x"}"#,
        r#"{"before":null,"after":{"id":1,"v":"a2"},"op":"u"}"#,
        r#"{"before":null,"after":{"id":"not a number","v":"c"},"op":"c"}"#,
        r#"{"before":null,"after":{"id":4,"v":"d"},"op":"c"}"#,
    ];
    std::fs::write(&path, records.join("\n") + "\n").unwrap();
    let script = |extra: &str| {
        format!(
            "CREATE TABLE t (id BIGINT, v STRING)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'debezium-json'{extra});
             SELECT id, v FROM t;",
            path.display()
        )
    };
    let err = run_folded(&script(""), 1).unwrap_err();
    assert!(err.contains("cdc.json:2"), "{err}");
    assert!(err.contains("unknown operation 'op' = 'x'"), "{err}");
    assert!(err.contains("'debezium-json.ignore-parse-errors'"), "{err}");
    // Without the bad operation, the update without `before` is next.
    let fixed = dir.path().join("fixed.json");
    std::fs::write(&fixed, [records[0], records[2]].join("\n") + "\n").unwrap();
    let err = run_folded(
        &script("").replace(&path.display().to_string(), &fixed.display().to_string()),
        1,
    )
    .unwrap_err();
    assert!(err.contains("fixed.json:2"), "{err}");
    assert!(err.contains("REPLICA IDENTITY"), "{err}");
    // Skipped: the three bad records (an unknown op, an update without its old row, a value
    // of the wrong type); the good rows remain.
    let plan =
        sluice_sql::plan_script(&script(", 'debezium-json.ignore-parse-errors' = 'true'")).unwrap();
    let (summary, got) = common::run_folded(plan, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(
        got,
        [
            (vec!["1".into(), "a".into()], 1),
            (vec!["4".into(), "d".into()], 1)
        ]
        .into()
    );
    assert_eq!(summary.records_skipped, 3);
}

/// A changelog table cannot feed what needs an append-only input (a window TVF), and an
/// updating result cannot go to a plain `json` sink: both are refused at planning.
#[test]
fn a_changelog_table_is_an_updating_input_to_the_planner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cdc.json");
    std::fs::write(&path, "").unwrap();
    let err = sluice_sql::plan_script(&format!(
        "CREATE TABLE t (id BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'debezium-json');
         SELECT window_start, COUNT(*) FROM TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), INTERVAL '1' MINUTE))
         GROUP BY window_start, window_end;",
        path.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("append-only"), "{err}");
}
