//! The `parquet` format of the filesystem connector: written (partitioned, with checkpoints) and
//! read back by Sluice, and read by an independent reader (pyarrow).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{committed_rows, run_cli};

/// pyarrow's reading of a partitioned Parquet table: every row as a JSON line, sorted, then a
/// line saying whether every column chunk has min/max statistics and how many row groups.
const PYARROW: &str = r#"
import json, os, sys
import pyarrow.parquet as pq
root = sys.argv[1]
rows, stats, groups = [], True, 0
for folder, _, files in os.walk(root):
    for name in files:
        if name.startswith('.'):
            continue
        path = os.path.join(folder, name)
        day = os.path.basename(folder).split('=', 1)[1]
        meta = pq.ParquetFile(path).metadata
        groups += meta.num_row_groups
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                s = meta.row_group(g).column(c).statistics
                stats = stats and s is not None and s.has_min_max
        for r in pq.read_table(path).to_pylist():
            rows.append(json.dumps({'id': r['id'], 'category': r['category'],
                                    'amount': str(r['amount']),
                                    'ts': r['ts'].strftime('%Y-%m-%d %H:%M:%S.%f'),
                                    'day': day}, sort_keys=True, separators=(',', ':')))
for line in sorted(rows):
    print(line)
print(json.dumps({'statistics': stats, 'row_groups': groups}))
"#;

pub(crate) fn python() -> String {
    let python = std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/sluice-tools/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    assert!(
        Path::new(&python).exists(),
        "no Python with pyarrow at {python}: `bash .ci/run` installs it"
    );
    python
}

/// `rows` orders over 3 days as JSON lines, and each row as the [`PYARROW`] script prints it,
/// sorted; and the table's columns.
pub(crate) fn orders(rows: i64) -> (String, Vec<String>, &'static str) {
    let mut want: Vec<String> = vec![];
    let mut text = String::new();
    for i in 0..rows {
        let category = format!("c{}", i % 7);
        let amount = format!("{}.{:02}", i % 1000, i % 100);
        let ts = format!(
            "2026-11-{:02} {:02}:{:02}:{:02}.{:03}",
            11 + i % 3,
            i % 24,
            i % 60,
            (i / 60) % 60,
            i % 1000
        );
        let day = format!("2026-11-{:02}", 11 + i % 3);
        text.push_str(&format!(
            "{{\"id\":{i},\"category\":\"{category}\",\"amount\":{amount},\"ts\":\"{ts}\",\"day\":\"{day}\"}}\n"
        ));
        // pyarrow prints microseconds: .250 as .250000.
        let ts_py = format!("{ts}000");
        want.push(
            serde_json::json!({"id": i, "category": category, "amount": amount, "ts": ts_py, "day": day})
                .to_string(),
        );
    }
    want.sort();
    let columns = "id BIGINT, category STRING, amount DECIMAL(10, 2), ts TIMESTAMP(3), day STRING";
    (text, want, columns)
}

/// pyarrow's reading of the partitioned Parquet table under `root` ([`PYARROW`]) checked
/// against `want`: every row, statistics in every column chunk, and at least `min_groups` row
/// groups.
pub(crate) fn check_in_pyarrow(root: &Path, want: &[String], min_groups: u64) {
    let out = crate::common::output_within(
        {
            let mut c = Command::new(python());
            c.args(["-c", PYARROW]).arg(root);
            c
        },
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let summary: serde_json::Value = serde_json::from_str(&lines.pop().unwrap()).unwrap();
    assert_eq!(lines.len(), want.len());
    let wrong: Vec<_> = lines
        .iter()
        .zip(want)
        .filter(|(g, w)| g != w)
        .take(3)
        .collect();
    assert!(wrong.is_empty(), "pyarrow read (got, want): {wrong:?}");
    assert_eq!(summary["statistics"], true, "{summary}");
    assert!(
        summary["row_groups"].as_u64().unwrap() >= min_groups,
        "{summary}"
    );
}

/// 40,000 orders over 3 days into a table PARTITIONED BY day, with checkpoints (files sealed
/// and published per checkpoint) on 2 workers. pyarrow reads every row back, with statistics in
/// every column chunk; Sluice reads the table back (2 workers) into the same rows as a JSON copy
/// written by the first job.
#[test]
fn parquet_round_trips_and_reads_in_pyarrow() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.json");
    const ROWS: i64 = 40_000;
    let (text, want, columns) = orders(ROWS);
    std::fs::write(&input, text).unwrap();
    let pq_dir = dir.path().join("pq");
    let script = format!(
        "SET 'execution.checkpointing.interval' = '200 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         CREATE TABLE src ({columns}) WITH ('connector' = 'filesystem', 'path' = '{input}', 'format' = 'json');
         CREATE TABLE pq ({columns}) PARTITIONED BY (day)
           WITH ('connector' = 'filesystem', 'path' = '{pq}', 'format' = 'parquet',
                 'parquet.row-group.max-rows' = '4096');
         CREATE TABLE direct ({columns}) WITH ('connector' = 'filesystem', 'path' = '{direct}', 'format' = 'json');
         INSERT INTO pq SELECT * FROM src;
         INSERT INTO direct SELECT * FROM src;",
        ckpt = dir.path().join("ck").display(),
        input = input.display(),
        pq = pq_dir.display(),
        direct = dir.path().join("direct").display(),
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");

    check_in_pyarrow(&pq_dir, &want, ROWS as u64 / 4096);

    let back = dir.path().join("back");
    let script = format!(
        "CREATE TABLE pq ({columns}) PARTITIONED BY (day)
           WITH ('connector' = 'filesystem', 'path' = '{pq}', 'format' = 'parquet');
         CREATE TABLE back ({columns}) WITH ('connector' = 'filesystem', 'path' = '{back}', 'format' = 'json');
         INSERT INTO back SELECT * FROM pq;",
        pq = pq_dir.display(),
        back = back.display(),
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    let direct = committed_rows(&dir.path().join("direct"), |_| {});
    assert_eq!(direct.values().sum::<i64>(), ROWS);
    assert_eq!(committed_rows(&back, |_| {}), direct);

    // A table whose column the files lack (NOT NULL) is an error naming the file and column.
    let script = format!(
        "CREATE TABLE pq ({columns}, extra BIGINT NOT NULL) PARTITIONED BY (day)
           WITH ('connector' = 'filesystem', 'path' = '{pq}', 'format' = 'parquet');
         CREATE TABLE out (id BIGINT) WITH ('connector' = 'blackhole');
         INSERT INTO out SELECT id FROM pq;",
        pq = pq_dir.display(),
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 1, Duration::from_secs(60));
    assert!(!ok);
    assert!(
        stderr.contains(".parquet") && stderr.contains("no column 'extra'"),
        "{stderr}"
    );
}

/// A job killed while writing Parquet with checkpoints (a paced generator, 2 workers), then
/// rerun: the published files hold
/// every row once (no torn file is ever visible: each is whole, with its footer, when published).
#[test]
fn killed_and_rerun_parquet_output_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    const ROWS: i64 = 300_000;
    let script = |d: &Path| {
        format!(
            "SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{ckpt}';
             CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '{ROWS}',
               'rows-per-second' = '100000', 'fields.id.kind' = 'sequence');
             CREATE TABLE pq (id BIGINT, category STRING) WITH ('connector' = 'filesystem', 'path' = '{pq}', 'format' = 'parquet');
             INSERT INTO pq SELECT id, CONCAT('c', CAST(id % 13 AS STRING)) FROM src;",
            ckpt = d.join("checkpoints").display(),
            pq = d.join("pq").display(),
        )
    };
    let whole = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (ok, stderr) = run_cli(
        whole.path(),
        &script(whole.path()),
        2,
        Duration::from_secs(120),
    );
    assert!(ok, "{stderr}");
    let took = started.elapsed().as_millis() as u64;
    assert!(
        took > 1_000,
        "the job must run long enough to be killed: {took} ms"
    );
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let file = run.join("job.sql");
    std::fs::write(&file, script(&run)).unwrap();
    let kills = crate::common::kill_runs(&run, &file, 2, took);
    assert!(kills >= 1, "the job should have been killed mid-way");
    let (ok, stderr) = run_cli(&run, &script(&run), 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    // Read back by Sluice: every id once.
    let back = dir.path().join("back");
    let (ok, stderr) = run_cli(
        dir.path(),
        &format!(
            "CREATE TABLE pq (id BIGINT, category STRING) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'parquet');
             CREATE TABLE back (n BIGINT, ids BIGINT, lo BIGINT, hi BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'debezium-json');
             INSERT INTO back SELECT COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM pq;",
            run.join("pq").display(),
            back.display()
        ),
        1,
        Duration::from_secs(120),
    );
    assert!(ok, "{stderr}");
    let rows = committed_rows(&back, |_| {});
    let want = serde_json::json!({"n": ROWS, "ids": ROWS, "lo": 0, "hi": ROWS - 1}).to_string();
    assert_eq!(rows, [(want, 1)].into_iter().collect());
}
