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
