//! One job as a timely cluster of two processes on 127.0.0.1 gives the same committed output as
//! one process. Batches cross processes as Arrow IPC, so this also checks the wire encoding.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

fn script(data: &Path, out: &Path) -> String {
    format!(
        "CREATE TABLE orders (order_id BIGINT, user_id BIGINT, category STRING, province STRING, amount DOUBLE, \
           event_time TIMESTAMP(3), WATERMARK FOR event_time AS event_time - INTERVAL '5' SECOND) \
         WITH ('connector' = 'filesystem', 'path' = '{data}', 'format' = 'json');\n\
         CREATE TABLE per_window (ws TIMESTAMP(3), category STRING, n BIGINT, total DOUBLE) \
         WITH ('connector' = 'filesystem', 'path' = '{out}/per_window', 'format' = 'json');\n\
         CREATE TABLE per_user (user_id BIGINT, n BIGINT) \
         WITH ('connector' = 'filesystem', 'path' = '{out}/per_user', 'format' = 'debezium-json');\n\
         INSERT INTO per_window SELECT TUMBLE_START(event_time, INTERVAL '1' SECOND), category, COUNT(*), SUM(amount) \
           FROM orders GROUP BY TUMBLE(event_time, INTERVAL '1' SECOND), category;\n\
         INSERT INTO per_user SELECT user_id, COUNT(*) FROM orders GROUP BY user_id;\n",
        data = data.display(),
        out = out.display()
    )
}

/// Generated orders as four JSON files, each a later stretch of event time (files are read in
/// name order, so no row is late for a single reader either).
fn write_input(dir: &Path) {
    for part in 0..4 {
        let out = dir.parent().unwrap().join(format!("gen-{part}"));
        let sql = format!(
            "CREATE TABLE gen (order_id BIGINT, user_id BIGINT, category STRING, province STRING, amount DOUBLE, event_time TIMESTAMP(3)) \
             WITH ('connector' = 'ecommerce', 'rows-per-second' = '0', 'number-of-rows' = '10000', 'seed' = '{part}', \
                   'max-out-of-orderness' = '2 s', 'start-time' = '2026-11-11 00:0{part}:00');\n\
             CREATE TABLE files (order_id BIGINT, user_id BIGINT, category STRING, province STRING, amount DOUBLE, event_time TIMESTAMP(3)) \
             WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');\n\
             INSERT INTO files SELECT * FROM gen;",
            out.display()
        );
        let file = dir.parent().unwrap().join(format!("gen-{part}.sql"));
        std::fs::write(&file, sql).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let produced = std::fs::read_dir(&out)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::rename(produced, dir.join(format!("orders-{part}.json"))).unwrap();
    }
}

use crate::common;

/// Starts `sql` as a cluster of two processes on free loopback ports, each with `workers`
/// workers and the extra environment `env`; stdout discarded, stderr piped.
fn start_two(
    dir: &Path,
    sql: &Path,
    workers: usize,
    env: &[(&str, &str)],
) -> Vec<std::process::Child> {
    let hosts = dir.join("hosts.txt");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1:{}\n127.0.0.1:{}\n",
            common::free_port(),
            common::free_port()
        ),
    )
    .unwrap();
    (0..2)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["run", sql.to_str().unwrap(), "--processes", "2"])
                .args(["--workers", &workers.to_string()])
                .args(["--process-id", &i.to_string()])
                .args(["--hosts", hosts.to_str().unwrap()])
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// The committed rows of a sink folder, float sums rounded (their order of addition differs).
fn committed(dir: &Path) -> BTreeMap<String, i64> {
    common::committed_rows(dir, |row| {
        if let Some(t) = row.get("total").and_then(|t| t.as_f64()) {
            row["total"] = serde_json::Value::String(format!("{t:.4}"));
        }
    })
}

#[test]
fn two_processes_equal_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("orders");
    std::fs::create_dir(&data).unwrap();
    write_input(&data);

    let single = dir.path().join("single");
    let single_sql = dir.path().join("single.sql");
    std::fs::write(&single_sql, script(&data, &single)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", single_sql.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary = String::from_utf8_lossy(&o.stderr);
    assert!(
        summary.contains("late rows dropped           0"),
        "{summary}"
    );

    let cluster = dir.path().join("cluster");
    let cluster_sql = dir.path().join("cluster.sql");
    std::fs::write(&cluster_sql, script(&data, &cluster)).unwrap();
    let children = start_two(dir.path(), &cluster_sql, 2, &[]);
    for child in children {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    for sink in ["per_window", "per_user"] {
        let want = committed(&single.join(sink));
        assert!(
            want.len() > 100,
            "{sink}: the single-process answer is too small to prove anything"
        );
        let got = committed(&cluster.join(sink));
        let missing: Vec<_> = want
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .take(3)
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|(k, v)| want.get(*k) != Some(v))
            .take(3)
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{sink}: {} rows vs {}; first missing {missing:?}; first extra {extra:?}",
            got.len(),
            want.len()
        );
    }
}

/// Waits for a child with a deadline (killing it and failing the test after it); its status
/// and stderr.
fn wait_within(
    mut child: std::process::Child,
    limit: std::time::Duration,
) -> (std::process::ExitStatus, String) {
    let started = std::time::Instant::now();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, reader.join().unwrap());
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("still running after {limit:?}: {}", reader.join().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A panic in one process of a cluster used to leave the others waiting for it forever. Now
/// every process ends promptly and non-zero: the failed one with the panic's message, the other
/// saying that it lost a peer. (`SLUICE_FAULT` is the test-only hook of `fault-injection`.)
#[test]
fn a_failure_in_one_process_ends_the_whole_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let rows: String = (0..300_000).map(|i| format!("{i},{}\n", i % 100)).collect();
    std::fs::write(&input, rows).unwrap();
    let sql = dir.path().join("job.sql");
    std::fs::write(
        &sql,
        format!(
            "SET 'table.exec.mini-batch.size' = '256';
             CREATE TABLE src (id BIGINT, v BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'csv',
               'source.split-size' = '64kb');
             CREATE TABLE out (v BIGINT, n BIGINT) WITH ('connector' = 'blackhole');
             INSERT INTO out SELECT v, COUNT(*) FROM src WHERE id >= 0 GROUP BY v;",
            input.display()
        ),
    )
    .unwrap();
    let children = start_two(dir.path(), &sql, 1, &[("SLUICE_FAULT", "panic:1:2000")]);
    let ends: Vec<_> = children
        .into_iter()
        .map(|c| wait_within(c, std::time::Duration::from_secs(60)))
        .collect();
    let (status, stderr) = &ends[1];
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: worker 1 panicked: injected fault"),
        "{stderr}"
    );
    let (status, stderr) = &ends[0];
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("lost its connection to another process of the cluster"),
        "{stderr}"
    );
}

/// An address in `--hosts` that does not resolve is an error at once (timely would retry
/// connecting forever).
#[test]
fn an_unresolvable_host_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("job.sql");
    std::fs::write(&sql, "SELECT * FROM (VALUES (1)) AS t(a);").unwrap();
    let hosts = dir.path().join("hosts.txt");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1:{}\nno-such-host.invalid:7000\n",
            common::free_port()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", sql.to_str().unwrap(), "--processes", "2"])
        .args(["--process-id", "0", "--hosts", hosts.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = wait_within(child, std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("'no-such-host.invalid:7000' does not resolve"),
        "{stderr}"
    );
}

/// A peer process killed with SIGKILL ends the others promptly too, saying they lost it.
#[test]
fn a_killed_peer_ends_the_whole_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let sql = dir.path().join("job.sql");
    // Unbounded: the cluster runs until something ends it.
    std::fs::write(
        &sql,
        "CREATE TABLE g (id BIGINT, v BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '20000');
         CREATE TABLE out (v BIGINT, n BIGINT) WITH ('connector' = 'blackhole');
         INSERT INTO out SELECT v % 100, COUNT(*) FROM g GROUP BY v % 100;",
    )
    .unwrap();
    let mut children = start_two(dir.path(), &sql, 1, &[]);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let mut victim = children.pop().unwrap();
    assert!(
        victim.try_wait().unwrap().is_none(),
        "process 1 ended early"
    );
    victim.kill().unwrap();
    victim.wait().unwrap();
    let started = std::time::Instant::now();
    let (status, stderr) = wait_within(children.pop().unwrap(), std::time::Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("lost its connection to another process of the cluster"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
