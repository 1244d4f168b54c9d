//! The redis sink against the Redis server on 127.0.0.1:6379 (every test uses keys of its own).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{free_port, output_within};

const URL: &str = "redis://127.0.0.1:6379/0";

/// Keys no other test or run uses.
fn prefix(test: &str) -> String {
    format!(
        "sluice-test:{test}:{}:{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn connection() -> redis::Connection {
    redis::Client::open(URL)
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("the Redis server on 127.0.0.1:6379")
}

fn run(dir: &Path, script: &str, workers: usize) -> (bool, String) {
    let file = dir.join("job.sql");
    std::fs::write(&file, script).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["run", "--workers", &workers.to_string()])
        .arg(&file);
    let o = output_within(cmd, Duration::from_secs(60));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Orders of 3 categories; categories kept while they have at most 2 orders (HAVING), one row
/// at a time (mini-batch 1) so that a category is written, then deleted once it passes 2. The
/// hash holds the batch answer: every category with at most 2 orders, with its count and total,
/// and none other. The same result as string keys of JSON rows holds the same.
#[test]
fn an_updating_result_leaves_exactly_the_final_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.json");
    let orders: Vec<(String, i64)> = (0..40).map(|i| (format!("c{}", i * i % 7), i)).collect();
    let lines: Vec<String> = orders
        .iter()
        .map(|(c, a)| format!(r#"{{"category":"{c}","amount":{a}}}"#))
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (c, a) in &orders {
        let e = want.entry(c.clone()).or_default();
        e.0 += 1;
        e.1 += a;
    }
    want.retain(|_, (n, _)| *n <= 6);
    assert!(!want.is_empty() && want.len() < 7, "{want:?}");
    let p = prefix("updating");
    let script = format!(
        "SET 'table.exec.mini-batch.size' = '1';
         CREATE TABLE orders (category STRING, amount BIGINT)
           WITH ('connector' = 'filesystem', 'path' = '{input}', 'format' = 'json');
         CREATE TABLE by_hash (category STRING, n BIGINT, total BIGINT)
           WITH ('connector' = 'redis', 'url' = '{URL}', 'command' = 'hset',
             'key' = '{p}:h', 'field' = '{{category}}');
         CREATE TABLE by_key (category STRING, n BIGINT, total BIGINT)
           WITH ('connector' = 'redis', 'url' = '{URL}', 'key' = '{p}:k:{{category}}');
         CREATE TABLE ranked (category STRING, total BIGINT)
           WITH ('connector' = 'redis', 'url' = '{URL}', 'command' = 'zadd',
             'key' = '{p}:z', 'member' = '{{category}}', 'score' = 'total');
         INSERT INTO by_hash SELECT category, COUNT(*), SUM(amount) FROM orders
           GROUP BY category HAVING COUNT(*) <= 6;
         INSERT INTO by_key SELECT category, COUNT(*), SUM(amount) FROM orders
           GROUP BY category HAVING COUNT(*) <= 6;
         INSERT INTO ranked SELECT category, SUM(amount) FROM orders
           GROUP BY category HAVING COUNT(*) <= 6;",
        input = input.display()
    );
    let (ok, stderr) = run(dir.path(), &script, 2);
    assert!(ok, "{stderr}");
    let mut con = connection();
    let hash: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{p}:h"))
        .query(&mut con)
        .unwrap();
    let got: BTreeMap<String, (i64, i64)> = hash
        .iter()
        .map(|(field, json)| {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(v["category"], field.as_str());
            (
                field.clone(),
                (v["n"].as_i64().unwrap(), v["total"].as_i64().unwrap()),
            )
        })
        .collect();
    assert_eq!(got, want);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}:k:*"))
        .query(&mut con)
        .unwrap();
    let mut got = BTreeMap::new();
    for k in keys {
        let json: String = redis::cmd("GET").arg(&k).query(&mut con).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let category = k.rsplit(':').next().unwrap().to_string();
        got.insert(
            category,
            (v["n"].as_i64().unwrap(), v["total"].as_i64().unwrap()),
        );
    }
    assert_eq!(got, want);
    let ranked: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(format!("{p}:z"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut con)
        .unwrap();
    let mut want_ranked: Vec<(String, f64)> = want
        .iter()
        .map(|(c, (_, t))| (c.clone(), *t as f64))
        .collect();
    want_ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    assert_eq!(ranked, want_ranked);
    let _: () = redis::cmd("DEL")
        .arg(format!("{p}:h"))
        .arg(format!("{p}:z"))
        .query(&mut con)
        .unwrap();
}

/// A server that cannot be reached fails the job within the connect timeout, naming the URL; a
/// template naming a column the table lacks, and an append-only command fed an updating
/// result, are errors naming them.
#[test]
fn bad_targets_fail_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = format!("redis://127.0.0.1:{}/0", free_port());
    let p = prefix("bad");
    let cases = [
        (
            format!("'url' = '{nobody}', 'key' = '{p}', 'sluice.connect-timeout' = '2 s'"),
            "SELECT id FROM src",
            format!("cannot reach Redis at '{nobody}'"),
        ),
        (
            format!("'url' = '{URL}', 'key' = '{p}:{{nope}}'"),
            "SELECT id FROM src",
            "option 'key' = '".to_string() + &p + ":{nope}': the table has no column 'nope'",
        ),
        (
            format!("'url' = '{URL}', 'key' = '{p}', 'command' = 'xadd'"),
            "SELECT COUNT(*) FROM src",
            "only accepts inserts".to_string(),
        ),
    ];
    for (options, query, want) in cases {
        let script = format!(
            "CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '10');
             CREATE TABLE out (id BIGINT) WITH ('connector' = 'redis', {options});
             INSERT INTO out {query};"
        );
        let (ok, stderr) = run(dir.path(), &script, 1);
        assert!(!ok && stderr.contains(&want), "{want}: {stderr}");
    }
}

/// Appends entries (field `row`) to a stream, in pipelines of 5000.
fn xadd(c: &mut redis::Connection, key: &str, rows: &[(Option<String>, String)]) {
    for chunk in rows.chunks(5000) {
        let mut pipe = redis::pipe();
        for (id, row) in chunk {
            pipe.cmd("XADD")
                .arg(key)
                .arg(id.as_deref().unwrap_or("*"))
                .arg("row")
                .arg(row)
                .ignore();
        }
        pipe.query::<()>(c).unwrap();
    }
}

/// A Redis stream read into an updating aggregation (to files), copied to another stream and
/// counted into a hash by exactly-once sinks, with checkpoints: killed with SIGKILL at random
/// moments and rerun on another worker count, the files hold the batch answer, the copy holds
/// every row once (appends are not idempotent, so a replayed write would show), and the hash
/// the counts.
#[test]
fn killed_and_rerun_a_stream_source_and_exactly_once_writes_are_exact() {
    let p = prefix("stream_kill");
    let mut c = connection();
    const ROWS: i64 = 300_000;
    let mut per_category: BTreeMap<String, i64> = BTreeMap::new();
    let rows: Vec<(Option<String>, String)> = (0..ROWS)
        .map(|i| {
            let category = format!("c{}", i * 31 % 23);
            *per_category.entry(category.clone()).or_default() += 1;
            (None, format!(r#"{{"id":{i},"category":"{category}"}}"#))
        })
        .collect();
    xadd(&mut c, &format!("{p}:orders"), &rows);
    let expected: BTreeMap<String, i64> = per_category
        .iter()
        .map(|(k, n)| (serde_json::json!({"category": k, "n": n}).to_string(), 1))
        .collect();
    let script = |dir: &Path, p: &str| {
        format!(
            "SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{ckpt}';
             SET 'table.exec.mini-batch.size' = '64';
             CREATE TABLE orders (id BIGINT, category STRING)
             WITH ('connector' = 'redis', 'url' = '{URL}', 'key' = '{p}:orders',
               'scan.bounded.mode' = 'latest');
             CREATE TABLE per_category (category STRING, n BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'debezium-json');
             CREATE TABLE copy (id BIGINT, category STRING)
               WITH ('connector' = 'redis', 'url' = '{URL}', 'command' = 'xadd',
                 'key' = '{p}:copy', 'sink.delivery-guarantee' = 'exactly-once',
                 'sink.transactional-id-prefix' = '{p}:marker');
             CREATE TABLE counts (category STRING, n BIGINT)
               WITH ('connector' = 'redis', 'url' = '{URL}', 'command' = 'hset',
                 'key' = '{p}:counts', 'field' = '{{category}}', 'value' = 'n',
                 'sink.delivery-guarantee' = 'exactly-once',
                 'sink.transactional-id-prefix' = '{p}:marker');
             INSERT INTO per_category SELECT category, COUNT(*) FROM orders GROUP BY category;
             INSERT INTO copy SELECT id, category FROM orders;
             INSERT INTO counts SELECT category, COUNT(*) FROM orders GROUP BY category;",
            ckpt = dir.join("checkpoints").display(),
            out = dir.join("out").display()
        )
    };
    // Each id's copies, summarized: how many rows, and the first few ids not written exactly once.
    let once = |ids: Vec<i64>| -> (usize, Vec<(i64, usize)>) {
        let mut copies: BTreeMap<i64, usize> = (0..ROWS).map(|i| (i, 0)).collect();
        for i in &ids {
            *copies.entry(*i).or_default() += 1;
        }
        let wrong: Vec<(i64, usize)> = copies
            .into_iter()
            .filter(|(_, n)| *n != 1)
            .take(5)
            .collect();
        (ids.len(), wrong)
    };
    let copied = |c: &mut redis::Connection, key: &str| -> Vec<i64> {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query(c)
            .unwrap();
        let mut ids: Vec<i64> = entries
            .iter()
            .map(|(_, f)| {
                let v: serde_json::Value = serde_json::from_str(&f[0].1).unwrap();
                v["id"].as_i64().unwrap()
            })
            .collect();
        ids.sort_unstable();
        ids
    };
    // One uninterrupted run (into keys of its own) says how long the job takes here.
    let whole = tempfile::tempdir().unwrap();
    let pw = format!("{p}:whole");
    xadd(&mut c, &format!("{pw}:orders"), &rows);
    let started = std::time::Instant::now();
    let (ok, stderr) = run(whole.path(), &script(whole.path(), &pw), 3);
    assert!(ok, "{stderr}");
    let took = started.elapsed().as_millis() as u64;
    assert!(
        took > 1500,
        "the job must run long enough to be killed: {took} ms"
    );
    assert_eq!(
        crate::common::committed_rows(&whole.path().join("out"), |_| {}),
        expected
    );
    assert_eq!(
        once(copied(&mut c, &format!("{pw}:copy"))),
        (ROWS as usize, vec![])
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(&file, script(dir.path(), &p)).unwrap();
    let kills = crate::common::kill_runs(dir.path(), &file, 3, took);
    assert!(kills >= 2, "the job should have been killed mid-way");
    let (ok, stderr) = run(dir.path(), &script(dir.path(), &p), 2);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    assert_eq!(
        crate::common::committed_rows(&dir.path().join("out"), |_| {}),
        expected
    );
    assert_eq!(
        once(copied(&mut c, &format!("{p}:copy"))),
        (ROWS as usize, vec![]),
        "every row once in the copy"
    );
    let counts: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{p}:counts"))
        .query(&mut c)
        .unwrap();
    assert_eq!(counts, per_category);
}

/// Entries with given ids: the `id` and `timestamp` metadata columns hold them, `scan.startup.id`
/// starts at one, and a stream that does not exist or an entry without the field is an error
/// naming it.
#[test]
fn stream_entries_ids_and_errors() {
    let p = prefix("stream_meta");
    let mut c = connection();
    let key = format!("{p}:s");
    let rows: Vec<(Option<String>, String)> = (1..=5i64)
        .map(|i| {
            (
                Some(format!("{}-{i}", 1_700_000_000_000i64 + i)),
                format!(r#"{{"v":{i}}}"#),
            )
        })
        .collect();
    xadd(&mut c, &key, &rows);
    let run_folded = |sql: &str| {
        let plan = sluice_sql::plan_script(sql).map_err(|e| e.to_string())?;
        crate::common::run_folded(plan, 2, Duration::from_secs(60)).map(|r| r.1)
    };
    let got = run_folded(&format!(
        "CREATE TABLE s (v BIGINT, eid STRING METADATA FROM 'id',
           ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp')
         WITH ('connector' = 'redis', 'url' = '{URL}', 'key' = '{key}',
           'scan.startup.mode' = 'id', 'scan.startup.id' = '1700000000003-3',
           'scan.bounded.mode' = 'latest');
         SELECT v, eid, DATE_FORMAT(ts, 'yyyy-MM-dd HH:mm:ss.SSS') FROM s;"
    ))
    .unwrap();
    let want: BTreeMap<Vec<String>, i64> = (3..=5i64)
        .map(|i| {
            let ms = 1_700_000_000_000i64 + i;
            let text = sluice_common::time::format_millis(ms);
            (vec![i.to_string(), format!("{ms}-{i}"), text], 1)
        })
        .collect();
    assert_eq!(got, want);
    let err = run_folded(&format!(
        "CREATE TABLE s (v BIGINT) WITH ('connector' = 'redis', 'url' = '{URL}',
           'key' = '{p}:missing', 'scan.bounded.mode' = 'latest');
         SELECT v FROM s;"
    ))
    .unwrap_err();
    assert!(err.contains(&format!("{p}:missing")), "{err}");
    redis::cmd("XADD")
        .arg(&key)
        .arg("1700000000009-0")
        .arg("other")
        .arg("x")
        .query::<String>(&mut c)
        .unwrap();
    let err = run_folded(&format!(
        "CREATE TABLE s (v BIGINT) WITH ('connector' = 'redis', 'url' = '{URL}',
           'key' = '{key}', 'scan.bounded.mode' = 'latest');
         SELECT v FROM s;"
    ))
    .unwrap_err();
    assert!(
        err.contains("entry 1700000000009-0") && err.contains("'row'"),
        "{err}"
    );
}
