//! Filesystem tables on S3-compatible storage (`'path' = 's3://bucket/prefix'`), against moto's
//! server on loopback: Parquet written partitioned with checkpoints and read back (by Sluice, and
//! by pyarrow from the objects themselves), a killed job's Parquet output exact after a rerun,
//! CSV rolled without checkpoints, a watched prefix picking up new objects, and bad setups.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{committed_rows, run_cli, run_job, Changelog, S3Server};
use crate::parquet_files::{check_in_pyarrow, orders};

/// boto3 (signed requests, as the objects are private to the account that wrote them): copies
/// the visible objects under a prefix into a folder, keys as paths, and prints the keys of the
/// hidden ones as a JSON list.
const DOWNLOAD: &str = r#"
import json, os, sys
import boto3
endpoint, bucket, prefix, root = sys.argv[1:5]
s3 = boto3.client('s3', endpoint_url=endpoint, aws_access_key_id='test',
                  aws_secret_access_key='test', region_name='us-east-1')
hidden = []
for page in s3.get_paginator('list_objects_v2').paginate(Bucket=bucket, Prefix=prefix):
    for o in page.get('Contents', []):
        key = o['Key']
        if key.rsplit('/', 1)[-1].startswith('.'):
            hidden.append(key)
            continue
        path = os.path.join(root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s3.download_file(bucket, key, path)
print(json.dumps(hidden))
"#;

/// Copies the visible objects under `prefix` into `dir` (keys as paths) with boto3; returns the
/// keys of hidden ones (unpublished output).
fn download(s3: &S3Server, bucket: &str, prefix: &str, dir: &Path) -> Vec<String> {
    let mut cmd = std::process::Command::new(crate::parquet_files::python());
    cmd.args(["-c", DOWNLOAD, &s3.endpoint, bucket, prefix])
        .arg(dir);
    let out = crate::common::output_within(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The table options that point a table at the test server (instead of the job's `SET`s).
fn s3_options(s3: &S3Server) -> String {
    format!(
        "'s3.endpoint' = '{}', 's3.access-key' = 'test', 's3.secret-key' = 'test',
         's3.region' = 'us-east-1', 's3.path.style.access' = 'true'",
        s3.endpoint
    )
}

/// 40,000 orders into a Parquet table on S3 PARTITIONED BY day, with checkpoints on 2 workers
/// (objects sealed per checkpoint and published when it commits), S3 configured by the job's
/// `SET`s. Every object ends published; pyarrow reads the objects into the orders, with
/// statistics; Sluice reads the table back from S3 (configured by table options this time) into
/// the same rows as a local JSON copy the first job wrote.
#[test]
fn parquet_on_s3_round_trips_and_reads_in_pyarrow() {
    let s3 = S3Server::start("lake");
    let dir = tempfile::tempdir().unwrap();
    const ROWS: i64 = 40_000;
    let (text, want, columns) = orders(ROWS);
    let input = dir.path().join("orders.json");
    std::fs::write(&input, text).unwrap();
    let script = format!(
        "{settings}
         SET 'execution.checkpointing.interval' = '200 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         CREATE TABLE src ({columns}) WITH ('connector' = 'filesystem', 'path' = '{input}', 'format' = 'json');
         CREATE TABLE pq ({columns}) PARTITIONED BY (day)
           WITH ('connector' = 'filesystem', 'path' = 's3://lake/orders', 'format' = 'parquet',
                 'parquet.row-group.max-rows' = '4096');
         CREATE TABLE direct ({columns}) WITH ('connector' = 'filesystem', 'path' = '{direct}', 'format' = 'json');
         INSERT INTO pq SELECT * FROM src;
         INSERT INTO direct SELECT * FROM src;",
        settings = s3.settings(),
        ckpt = dir.path().join("ck").display(),
        input = input.display(),
        direct = dir.path().join("direct").display(),
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");

    let copy = dir.path().join("copy");
    let hidden = download(&s3, "lake", "orders/", &copy);
    assert!(hidden.is_empty(), "unpublished objects left: {hidden:?}");
    check_in_pyarrow(&copy.join("orders"), &want, ROWS as u64 / 4096);

    let back = dir.path().join("back");
    let script = format!(
        "CREATE TABLE pq ({columns}) PARTITIONED BY (day)
           WITH ('connector' = 'filesystem', 'path' = 's3://lake/orders/', 'format' = 'parquet', {options});
         CREATE TABLE back ({columns}) WITH ('connector' = 'filesystem', 'path' = '{back}', 'format' = 'json');
         INSERT INTO back SELECT * FROM pq;",
        options = s3_options(&s3),
        back = back.display(),
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    let direct = committed_rows(&dir.path().join("direct"), |_| {});
    assert_eq!(direct.values().sum::<i64>(), ROWS);
    assert_eq!(committed_rows(&back, |_| {}), direct);
}

/// A job writing Parquet to S3 with checkpoints (a paced generator, 2 workers) killed mid-way
/// more than once, then rerun to the end: the published objects hold every row once, and no
/// hidden object (sealed for a checkpoint that never committed, or committed but not yet
/// published when the job died) is left.
#[test]
fn killed_and_rerun_parquet_on_s3_is_exact() {
    let s3 = S3Server::start("lake");
    let dir = tempfile::tempdir().unwrap();
    const ROWS: i64 = 300_000;
    let script = |d: &Path, table: &str| {
        format!(
            "{settings}
             SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{ckpt}';
             CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '{ROWS}',
               'rows-per-second' = '100000', 'fields.id.kind' = 'sequence');
             CREATE TABLE pq (id BIGINT, category STRING)
               WITH ('connector' = 'filesystem', 'path' = 's3://lake/{table}', 'format' = 'parquet');
             INSERT INTO pq SELECT id, CONCAT('c', CAST(id % 13 AS STRING)) FROM src;",
            settings = s3.settings(),
            ckpt = d.join("checkpoints").display(),
        )
    };
    let whole = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (ok, stderr) = run_cli(
        whole.path(),
        &script(whole.path(), "whole"),
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
    std::fs::write(&file, script(&run, "pq")).unwrap();
    let kills = crate::common::kill_runs(&run, &file, 2, took);
    assert!(kills >= 1, "the job should have been killed mid-way");
    let (ok, stderr) = run_cli(&run, &script(&run, "pq"), 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    let keys = s3.keys("lake", "pq/");
    assert!(
        !keys.iter().any(|k| k.starts_with("pq/.")),
        "unpublished objects left: {keys:?}"
    );
    // Read back by Sluice from S3: every id once.
    let back = dir.path().join("back");
    let (ok, stderr) = run_cli(
        dir.path(),
        &format!(
            "{settings}
             CREATE TABLE pq (id BIGINT, category STRING) WITH ('connector' = 'filesystem', 'path' = 's3://lake/pq', 'format' = 'parquet');
             CREATE TABLE back (n BIGINT, ids BIGINT, lo BIGINT, hi BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'debezium-json');
             INSERT INTO back SELECT COUNT(*), COUNT(DISTINCT id), MIN(id), MAX(id) FROM pq;",
            back.display(),
            settings = s3.settings(),
        ),
        1,
        Duration::from_secs(120),
    );
    assert!(ok, "{stderr}");
    let rows = committed_rows(&back, |_| {});
    let want = serde_json::json!({"n": ROWS, "ids": ROWS, "lo": 0, "hi": ROWS - 1}).to_string();
    assert_eq!(rows, [(want, 1)].into_iter().collect());
}

/// Without checkpoints a CSV sink on S3 rolls its files by size (uploaded hidden) and publishes
/// them all when the job ends; Sluice reads the CSV objects back into the rows a local JSON copy
/// holds.
#[test]
fn csv_on_s3_rolls_and_publishes_at_the_end() {
    let s3 = S3Server::start("lake");
    let dir = tempfile::tempdir().unwrap();
    const ROWS: i64 = 20_000;
    let (text, _, columns) = orders(ROWS);
    let input = dir.path().join("orders.json");
    std::fs::write(&input, text).unwrap();
    let script = format!(
        "CREATE TABLE src ({columns}) WITH ('connector' = 'filesystem', 'path' = '{input}', 'format' = 'json');
         CREATE TABLE out ({columns}) WITH ('connector' = 'filesystem', 'path' = 's3://lake/csv',
           'format' = 'csv', 'sink.rolling-policy.file-size' = '64kb', {options});
         CREATE TABLE direct ({columns}) WITH ('connector' = 'filesystem', 'path' = '{direct}', 'format' = 'json');
         INSERT INTO out SELECT * FROM src;
         INSERT INTO direct SELECT * FROM src;",
        options = s3_options(&s3),
        input = input.display(),
        direct = dir.path().join("direct").display(),
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    let keys = s3.keys("lake", "csv/");
    assert!(
        keys.iter().all(|k| !k.starts_with("csv/.")),
        "unpublished objects left: {keys:?}"
    );
    // A file rolls once a batch takes it past 64 KB: the 20,000 rows arrive in a few batches.
    assert!(keys.len() >= 3, "64 KB files should have rolled: {keys:?}");

    let back = dir.path().join("back");
    let script = format!(
        "CREATE TABLE csv ({columns}) WITH ('connector' = 'filesystem', 'path' = 's3://lake/csv', 'format' = 'csv', {options});
         CREATE TABLE back ({columns}) WITH ('connector' = 'filesystem', 'path' = '{back}', 'format' = 'json');
         INSERT INTO back SELECT * FROM csv;",
        options = s3_options(&s3),
        back = back.display(),
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    let direct = committed_rows(&dir.path().join("direct"), |_| {});
    assert_eq!(direct.values().sum::<i64>(), ROWS);
    assert_eq!(committed_rows(&back, |_| {}), direct);
}

/// `'source.monitor-interval'` on an S3 prefix: objects put there while the job runs are read,
/// and hidden ones (a writer's in-progress output, `_SUCCESS`) never are.
#[test]
fn a_watched_s3_prefix_reads_new_objects() {
    let s3 = S3Server::start("feed");
    let lines = |ids: std::ops::Range<i64>| -> Vec<u8> {
        ids.map(|i| format!("{{\"id\": {i}}}\n"))
            .collect::<String>()
            .into_bytes()
    };
    s3.put("feed", "clicks/a.json", &lines(0..100));
    s3.put("feed", "clicks/.b.json.inprogress", b"not json");
    s3.put("feed", "clicks/_SUCCESS", b"not json either");
    s3.put("feed", "elsewhere/c.json", &lines(1000..1010));
    let sql = format!(
        "{settings}
         CREATE TABLE clicks (id BIGINT) WITH ('connector' = 'filesystem', 'path' = 's3://feed/clicks',
           'format' = 'json', 'source.monitor-interval' = '100 ms');
         SELECT id FROM clicks;",
        settings = s3.settings()
    );
    let plan = sluice_sql::plan_script(&sql).unwrap();
    let log = Arc::new(Changelog::default());
    let control = sluice_engine::JobControl::new();
    let options = sluice_engine::JobOptions {
        workers: 2,
        control: control.clone(),
        ..Default::default()
    };
    let job = {
        let log = log.clone();
        std::thread::spawn(move || run_job(plan, options, log, Duration::from_secs(90)))
    };
    let wait_for = |n: usize| {
        let started = Instant::now();
        while log.rows(0).len() < n && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(100);
    s3.put("feed", "clicks/d.json", &lines(100..250));
    wait_for(250);
    // Time for anything that should not be read to arrive.
    std::thread::sleep(Duration::from_millis(500));
    control.cancel();
    job.join().unwrap().unwrap();
    let mut ids: Vec<i64> = log.rows(0).iter().map(|r| r[0].parse().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (0..250).collect::<Vec<_>>());
}

/// Bad setups fail before any row moves, naming what is wrong: a bucket that does not exist
/// (the path), and `s3.*` options on a local path.
#[test]
fn s3_setup_errors_name_the_path_and_option() {
    let s3 = S3Server::start("lake");
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{settings}
         CREATE TABLE src (id BIGINT) WITH ('connector' = 'filesystem', 'path' = 's3://no-such-bucket/x', 'format' = 'json');
         CREATE TABLE out (id BIGINT) WITH ('connector' = 'blackhole');
         INSERT INTO out SELECT * FROM src;",
        settings = s3.settings()
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 1, Duration::from_secs(60));
    assert!(!ok);
    assert!(
        stderr.contains("s3://no-such-bucket/x") && stderr.contains("src"),
        "{stderr}"
    );

    let script = format!(
        "CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '10');
         CREATE TABLE out (id BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json',
           's3.endpoint' = '{}');
         INSERT INTO out SELECT * FROM src;",
        dir.path().join("out").display(),
        s3.endpoint
    );
    let (ok, stderr) = run_cli(dir.path(), &script, 1, Duration::from_secs(60));
    assert!(!ok);
    assert!(
        stderr.contains("'s3.endpoint' applies to S3 paths"),
        "{stderr}"
    );
}
