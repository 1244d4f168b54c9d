//! Updating tables on Kafka: `upsert-kafka` (upserts and tombstones keyed by the primary key),
//! the `debezium-json` value format, and keys that hold columns (`EXCEPT_KEY`), each written by
//! one job and read back by another, against the batch answer; and `examples/kafka_double11.sql`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::common;
use crate::common::run_cli as run;
use crate::kafka::Broker;

/// `rows` orders of 200 users, `(user, amount)`, as JSON lines with an `id`.
fn orders(path: &Path, rows: usize) -> Vec<(i64, i64)> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let orders: Vec<(i64, i64)> = (0..rows)
        .map(|_| {
            (
                rng.random_range(1..=200i64),
                rng.random_range(1..=10_000i64),
            )
        })
        .collect();
    let text: String = orders
        .iter()
        .enumerate()
        .map(|(i, (u, a))| format!("{{\"id\":{i},\"user_id\":{u},\"amount\":{a}}}\n"))
        .collect();
    std::fs::write(path, text).unwrap();
    orders
}

/// Per user: order count and total.
fn per_user(orders: &[(i64, i64)]) -> BTreeMap<i64, (i64, i64)> {
    let mut out: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (u, a) in orders {
        let e = out.entry(*u).or_default();
        e.0 += 1;
        e.1 += a;
    }
    out
}

/// Users and their total per bucket of order counts (`n / 5`), over `users`.
fn buckets<'a>(users: impl Iterator<Item = &'a (i64, i64)>) -> BTreeMap<Vec<String>, i64> {
    let mut per_bucket: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (n, total) in users {
        let e = per_bucket.entry(n / 5).or_default();
        e.0 += 1;
        e.1 += total;
    }
    per_bucket
        .into_iter()
        .map(|(b, (k, t))| (vec![b.to_string(), k.to_string(), t.to_string()], 1))
        .collect()
}

/// `partition:p,offset:n;...`: each partition read up to the records it holds.
fn bounds(records: &[(i32, Option<String>, Option<String>)], partitions: i32) -> String {
    (0..partitions)
        .map(|p| {
            let n = records.iter().filter(|r| r.0 == p).count();
            format!("partition:{p},offset:{n}")
        })
        .collect::<Vec<_>>()
        .join(";")
}

fn run_folded(script: &str, workers: usize) -> BTreeMap<Vec<String>, i64> {
    let plan = sluice_sql::plan_script(script).unwrap_or_else(|e| panic!("{e}"));
    common::run_folded(plan, workers, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"))
        .1
}

/// An updating aggregation with a HAVING that drops users once they pass 99 orders goes to an
/// `upsert-kafka` topic: each key's last record is its row in the batch answer, and a dropped
/// user's is a tombstone. Read back as an `upsert-kafka` table by 1 and 3 workers (the keys'
/// last rows kept by ChangelogNormalize), an aggregation over it equals the batch answer.
#[test]
fn an_upsert_topic_holds_the_updating_result_and_reads_back_as_a_table() {
    let broker = Broker::start();
    broker.create_topic("totals_u", 4);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.json");
    // More rows than one batch holds: users pass the HAVING bound between batches.
    let orders = orders(&input, 20_000);
    let users = per_user(&orders);
    let kept: BTreeMap<i64, (i64, i64)> = users
        .iter()
        .filter(|(_, (n, _))| *n < 100)
        .map(|(u, v)| (*u, *v))
        .collect();
    assert!(
        kept.len() > 20 && kept.len() < 180,
        "the HAVING must drop some users"
    );
    let table = |extra: &str| {
        format!(
            "CREATE TABLE totals (user_id BIGINT, n BIGINT, total BIGINT,
               PRIMARY KEY (user_id) NOT ENFORCED)
             WITH ('connector' = 'upsert-kafka', 'topic' = 'totals_u',
               'properties.bootstrap.servers' = '{}',
               'key.format' = 'json', 'value.format' = 'json'{extra});",
            broker.servers
        )
    };
    let script = format!(
        "CREATE TABLE orders (id BIGINT, user_id BIGINT, amount BIGINT)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         {}
         INSERT INTO totals SELECT user_id, COUNT(*), SUM(amount) FROM orders
         GROUP BY user_id HAVING COUNT(*) < 100;",
        input.display(),
        table("")
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    let records = broker.consume("totals_u", 4, usize::MAX, false);
    // Each key's last record, in partition order; one key stays in one partition.
    let mut last: BTreeMap<i64, Option<(i64, i64)>> = BTreeMap::new();
    let mut partition_of: BTreeMap<i64, i32> = BTreeMap::new();
    let mut tombstones = 0;
    for (partition, key, value) in &records {
        let k: serde_json::Value = serde_json::from_str(key.as_deref().unwrap()).unwrap();
        let user = k["user_id"].as_i64().unwrap();
        assert_eq!(*partition_of.entry(user).or_insert(*partition), *partition);
        let row = value.as_ref().map(|v| {
            let v: serde_json::Value = serde_json::from_str(v).unwrap();
            assert_eq!(v["user_id"].as_i64(), Some(user));
            (v["n"].as_i64().unwrap(), v["total"].as_i64().unwrap())
        });
        tombstones += row.is_none() as usize;
        last.insert(user, row);
    }
    assert!(tombstones > 0, "a dropped user's record is a tombstone");
    let table_now: BTreeMap<i64, (i64, i64)> = last
        .into_iter()
        .filter_map(|(u, row)| row.map(|r| (u, r)))
        .collect();
    assert_eq!(table_now, kept);
    let bounded = format!(
        ", 'scan.bounded.mode' = 'specific-offsets', 'scan.bounded.specific-offsets' = '{}'",
        bounds(&records, 4)
    );
    for workers in [1, 3] {
        let got = run_folded(
            &(table(&bounded) + "SELECT n / 5, COUNT(*), SUM(total) FROM totals GROUP BY n / 5;"),
            workers,
        );
        assert_eq!(got, buckets(kept.values()), "{workers} workers");
    }
}

/// Per-user totals written with `value.format = 'debezium-json'` and read back from the topic
/// as a changelog table; and orders written with their `id` in the key only (`EXCEPT_KEY`) and
/// read back whole.
#[test]
fn debezium_values_and_key_columns_round_trip_through_topics() {
    let broker = Broker::start();
    broker.create_topic("totals_d", 3);
    broker.create_topic("orders_k", 2);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.json");
    // More rows than one batch holds, so that totals change: updates are written.
    let orders = orders(&input, 20_000);
    let script = format!(
        "CREATE TABLE orders (id BIGINT, user_id BIGINT, amount BIGINT)
           WITH ('connector' = 'filesystem', 'path' = '{input}', 'format' = 'json');
         CREATE TABLE totals (user_id BIGINT, n BIGINT, total BIGINT)
           WITH ('connector' = 'kafka', 'topic' = 'totals_d',
             'properties.bootstrap.servers' = '{servers}', 'value.format' = 'debezium-json',
             'key.format' = 'json', 'key.fields' = 'user_id');
         CREATE TABLE keyed (id BIGINT, user_id BIGINT, amount BIGINT)
           WITH ('connector' = 'kafka', 'topic' = 'orders_k',
             'properties.bootstrap.servers' = '{servers}', 'value.format' = 'json',
             'key.format' = 'json', 'key.fields' = 'id', 'value.fields-include' = 'EXCEPT_KEY');
         INSERT INTO totals SELECT user_id, COUNT(*), SUM(amount) FROM orders GROUP BY user_id;
         INSERT INTO keyed SELECT id, user_id, amount FROM orders;",
        input = input.display(),
        servers = broker.servers
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");

    let changes = broker.consume("totals_d", 3, usize::MAX, false);
    assert!(changes
        .iter()
        .any(|(_, _, v)| v.as_deref().is_some_and(|v| v.contains("\"op\":\"u\""))));
    let got = run_folded(
        &format!(
            "CREATE TABLE totals (user_id BIGINT, n BIGINT, total BIGINT)
               WITH ('connector' = 'kafka', 'topic' = 'totals_d',
                 'properties.bootstrap.servers' = '{}', 'value.format' = 'debezium-json',
                 'scan.startup.mode' = 'earliest-offset',
                 'scan.bounded.mode' = 'specific-offsets',
                 'scan.bounded.specific-offsets' = '{}');
             SELECT n / 5, COUNT(*), SUM(total) FROM totals GROUP BY n / 5;",
            broker.servers,
            bounds(&changes, 3)
        ),
        2,
    );
    assert_eq!(got, buckets(per_user(&orders).values()));

    let keyed = broker.consume("orders_k", 2, orders.len(), false);
    assert_eq!(keyed.len(), orders.len());
    for (_, key, value) in &keyed {
        let k: serde_json::Value = serde_json::from_str(key.as_deref().unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(value.as_deref().unwrap()).unwrap();
        assert!(k["id"].is_i64(), "{k}");
        assert!(v.get("id").is_none(), "EXCEPT_KEY: {v}");
    }
    let got = run_folded(
        &format!(
            "CREATE TABLE keyed (id BIGINT, user_id BIGINT, amount BIGINT)
               WITH ('connector' = 'kafka', 'topic' = 'orders_k',
                 'properties.bootstrap.servers' = '{}', 'value.format' = 'json',
                 'key.format' = 'json', 'key.fields' = 'id', 'value.fields-include' = 'EXCEPT_KEY',
                 'scan.startup.mode' = 'earliest-offset',
                 'scan.bounded.mode' = 'specific-offsets',
                 'scan.bounded.specific-offsets' = '{}');
             SELECT id, user_id, amount FROM keyed;",
            broker.servers,
            bounds(&keyed, 2)
        ),
        2,
    );
    let want: BTreeMap<Vec<String>, i64> = orders
        .iter()
        .enumerate()
        .map(|(i, (u, a))| (vec![i.to_string(), u.to_string(), a.to_string()], 1))
        .collect();
    assert_eq!(got, want);
}

/// `upsert-kafka` without a PRIMARY KEY, or without `key.format`, is refused before anything
/// connects, naming what is missing.
#[test]
fn an_upsert_table_needs_its_key() {
    let err = sluice_sql::plan_script(
        "CREATE TABLE t (k BIGINT, v BIGINT)
           WITH ('connector' = 'upsert-kafka', 'topic' = 't',
             'properties.bootstrap.servers' = '127.0.0.1:1',
             'key.format' = 'json', 'value.format' = 'json');
         SELECT * FROM t;",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("PRIMARY KEY"), "{err}");
    let plan = sluice_sql::plan_script(
        "CREATE TABLE t (k BIGINT, v BIGINT, PRIMARY KEY (k) NOT ENFORCED)
           WITH ('connector' = 'upsert-kafka', 'topic' = 't',
             'properties.bootstrap.servers' = '127.0.0.1:1', 'value.format' = 'json');
         SELECT * FROM t;",
    );
    let err = match plan {
        Err(e) => e.to_string(),
        Ok(plan) => common::run_folded(plan, 1, Duration::from_secs(60)).unwrap_err(),
    };
    assert!(err.contains("key.format"), "{err}");
}

/// Checkpointed upserts: a job reading an `upsert-kafka` topic of 4 partitions (updates and
/// tombstones of 2 000 keys) into an updating aggregation, killed with SIGKILL at random
/// moments and rerun on another worker count, commits exactly the batch answer over each key's
/// last record. ChangelogNormalize's state (each key's last row) is restored, and rescaled.
#[test]
fn killed_and_rerun_an_upsert_source_commits_the_batch_answer() {
    use std::time::Instant;
    let broker = Broker::start();
    broker.create_topic("upserts_k", 4);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let mut records = vec![];
    let mut last: BTreeMap<i64, Option<(i64, i64)>> = BTreeMap::new();
    for _ in 0..300_000 {
        let k = rng.random_range(0..2000i64);
        let key = format!(r#"{{"id":{k}}}"#);
        let row = (!rng.random_bool(0.1)).then(|| (k % 17, rng.random_range(0..1000i64)));
        let value = row.map(|(g, v)| format!(r#"{{"id":{k},"grp":{g},"v":{v}}}"#));
        records.push(((k % 4) as i32, Some(key), value));
        last.insert(k, row);
    }
    broker.produce("upserts_k", &records);
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut per_grp: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for (g, v) in last.values().flatten() {
        let e = per_grp.entry(*g).or_default();
        e.0 += 1;
        e.1 += v;
    }
    for (g, (n, total)) in per_grp {
        expected.insert(
            serde_json::json!({"grp": g, "n": n, "total": total}).to_string(),
            1,
        );
    }
    let script = |dir: &Path| {
        format!(
            "SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{ckpt}';
             SET 'table.exec.mini-batch.size' = '64';
             CREATE TABLE t (id BIGINT, grp BIGINT, v BIGINT, PRIMARY KEY (id) NOT ENFORCED)
             WITH ('connector' = 'upsert-kafka', 'topic' = 'upserts_k',
               'properties.bootstrap.servers' = '{servers}',
               'properties.fetch.max.bytes' = '4096',
               'properties.message.max.bytes' = '4096',
               'properties.max.partition.fetch.bytes' = '512',
               'key.format' = 'json', 'value.format' = 'json',
               'scan.bounded.mode' = 'specific-offsets',
               'scan.bounded.specific-offsets' = '{bounds}');
             CREATE TABLE per_grp (grp BIGINT, n BIGINT, total BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'debezium-json');
             INSERT INTO per_grp SELECT grp, COUNT(*), SUM(v) FROM t GROUP BY grp;",
            ckpt = dir.join("checkpoints").display(),
            servers = broker.servers,
            bounds = bounds(&records, 4),
            out = dir.join("out").display()
        )
    };
    let whole = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (ok, stderr) = run(
        whole.path(),
        &script(whole.path()),
        3,
        Duration::from_secs(180),
    );
    assert!(ok, "{stderr}");
    let took = started.elapsed().as_millis() as u64;
    // Kills must land before the job's end: a finished job drops its checkpoints, and a rerun
    // of it starts over.
    assert!(
        took > 1500,
        "the job must run long enough to be killed: {took} ms"
    );
    assert_eq!(
        common::committed_rows(&whole.path().join("out"), |_| {}),
        expected,
        "uninterrupted"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(&file, script(dir.path())).unwrap();
    let kills = common::kill_runs(dir.path(), &file, 3, took);
    assert!(kills >= 2, "the job should have been killed mid-way");
    let (ok, stderr) = run(dir.path(), &script(dir.path()), 2, Duration::from_secs(180));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    assert_eq!(
        common::committed_rows(&dir.path().join("out"), |_| {}),
        expected
    );
}

/// `examples/kafka_double11.sql`, pointed at this test's broker, Redis keys and checkpoint
/// folder (and bounded, so that it ends), serves the batch answer over the orders it reads: the
/// GMV of each 5-minute window and of each category in Redis, and each category's totals as the
/// last record of its key in the upsert topic.
#[cfg(feature = "redis")]
#[test]
fn the_kafka_double11_example_serves_the_batch_answer() {
    let broker = Broker::start();
    broker.create_topic("orders", 4);
    broker.create_topic("gmv_by_category", 2);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    let start = 1_794_355_200_000i64; // 2026-11-11 00:00:00
    let categories = ["apparel", "books", "electronics", "food", "home"];
    let mut records = vec![];
    let mut per_partition = [0usize; 4];
    let mut windows: BTreeMap<String, i64> = BTreeMap::new();
    let mut per_category: BTreeMap<String, (i64, i64, std::collections::BTreeSet<i64>)> =
        BTreeMap::new();
    for i in 0..20_000i64 {
        // 50 ms apart, up to 3 s late; the watermark allows 5 s.
        let ts = start + i * 50 - rng.random_range(0..3000i64);
        let user = rng.random_range(1..2000i64);
        let category = categories[rng.random_range(0..categories.len())];
        let cents = rng.random_range(100..50_000i64);
        let partition = (i % 4) as i32;
        per_partition[partition as usize] += 1;
        records.push((
            partition,
            None,
            Some(format!(
                r#"{{"order_id":{i},"user_id":{user},"item_id":{},"category":"{category}","province":"Zhejiang","amount":{},"quantity":1,"event_time":"{}"}}"#,
                i % 97,
                cents as f64 / 100.0,
                sluice_common::time::format_millis(ts)
            )),
        ));
        let window = ts - ts.rem_euclid(300_000);
        *windows
            .entry(sluice_common::time::format_millis(window)[..16].to_string())
            .or_default() += cents;
        let e = per_category.entry(category.to_string()).or_default();
        e.0 += cents;
        e.1 += 1;
        e.2.insert(user);
    }
    broker.produce("orders", &records);
    let bounds = (0..4)
        .map(|p| format!("partition:{p},offset:{}", per_partition[p]))
        .collect::<Vec<_>>()
        .join(";");
    let dir = tempfile::tempdir().unwrap();
    let keys = format!(
        "sluice-test:double11:{}:{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/kafka_double11.sql"
    ))
    .unwrap();
    let script = example
        .replace("127.0.0.1:9092", &broker.servers)
        .replace("'double11:", &format!("'{keys}:"))
        .replace("'sink.transactional-id-prefix' = 'double11", &format!("'sink.transactional-id-prefix' = '{keys}"))
        .replace("file:///tmp/sluice-kafka-double11", &format!("file://{}", dir.path().join("ck").display()))
        .replace(
            "'scan.startup.mode' = 'earliest-offset',",
            &format!("'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets', 'scan.bounded.specific-offsets' = '{bounds}',"),
        )
        .replace("'execution.checkpointing.interval' = '10 s'", "'execution.checkpointing.interval' = '200 ms'");
    assert!(script.contains(&keys) && script.contains(&bounds));
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    let cents = |text: &str| (text.parse::<f64>().unwrap() * 100.0).round() as i64;
    let mut redis = redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let hash = |c: &mut redis::Connection, key: &str| -> BTreeMap<String, i64> {
        let h: BTreeMap<String, String> = redis::cmd("HGETALL").arg(key).query(c).unwrap();
        h.into_iter().map(|(k, v)| (k, cents(&v))).collect()
    };
    assert_eq!(hash(&mut redis, &format!("{keys}:gmv_per_window")), windows);
    let by_category: BTreeMap<String, i64> =
        per_category.iter().map(|(k, v)| (k.clone(), v.0)).collect();
    assert_eq!(
        hash(&mut redis, &format!("{keys}:gmv_by_category")),
        by_category
    );
    let mut last: BTreeMap<String, (i64, i64, i64)> = BTreeMap::new();
    for (_, key, value) in broker.consume("gmv_by_category", 2, usize::MAX, true) {
        let k: serde_json::Value = serde_json::from_str(&key.unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&value.unwrap()).unwrap();
        last.insert(
            k["category"].as_str().unwrap().to_string(),
            (
                (v["gmv"].as_f64().unwrap() * 100.0).round() as i64,
                v["orders"].as_i64().unwrap(),
                v["buyers"].as_i64().unwrap(),
            ),
        );
    }
    let want: BTreeMap<String, (i64, i64, i64)> = per_category
        .into_iter()
        .map(|(k, (c, n, users))| (k, (c, n, users.len() as i64)))
        .collect();
    assert_eq!(last, want);
}

/// `key.fields-prefix` keeps a key column and a value column of one name apart: the key
/// `{"user_id":..}` comes from `k_user_id`, the CSV value's `user_id` from the other column,
/// and reading back gives each its own. An `upsert-kafka` topic with CSV keys and values holds
/// the per-user totals and reads back as the batch answer.
#[test]
fn prefixed_keys_and_csv_keys_and_values_round_trip() {
    let broker = Broker::start();
    broker.create_topic("orders_p", 2);
    broker.create_topic("totals_c", 3);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("orders.json");
    let orders = orders(&input, 5_000);
    let prefixed = |extra: &str| {
        format!(
            "CREATE TABLE prefixed (k_user_id BIGINT, user_id BIGINT, amount BIGINT)
               WITH ('connector' = 'kafka', 'topic' = 'orders_p',
                 'properties.bootstrap.servers' = '{}', 'value.format' = 'csv',
                 'key.format' = 'json', 'key.fields' = 'k_user_id',
                 'key.fields-prefix' = 'k_', 'value.fields-include' = 'EXCEPT_KEY'{extra});",
            broker.servers
        )
    };
    let totals = |extra: &str| {
        format!(
            "CREATE TABLE totals (user_id BIGINT, n BIGINT, total BIGINT,
               PRIMARY KEY (user_id) NOT ENFORCED)
             WITH ('connector' = 'upsert-kafka', 'topic' = 'totals_c',
               'properties.bootstrap.servers' = '{}',
               'key.format' = 'csv', 'value.format' = 'csv'{extra});",
            broker.servers
        )
    };
    let script = format!(
        "CREATE TABLE orders (id BIGINT, user_id BIGINT, amount BIGINT)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         {}
         {}
         INSERT INTO prefixed SELECT user_id, id, amount FROM orders;
         INSERT INTO totals SELECT user_id, COUNT(*), SUM(amount) FROM orders GROUP BY user_id;",
        input.display(),
        prefixed(""),
        totals("")
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");

    let records = broker.consume("orders_p", 2, orders.len(), false);
    assert_eq!(records.len(), orders.len());
    for (_, key, value) in &records {
        let k: serde_json::Value = serde_json::from_str(key.as_deref().unwrap()).unwrap();
        assert!(k["user_id"].is_i64() && k.get("k_user_id").is_none(), "{k}");
        // The value is `id,amount` (the key's column left out).
        assert_eq!(value.as_deref().unwrap().split(',').count(), 2, "{value:?}");
    }
    let got = run_folded(
        &format!(
            "{}
             SELECT k_user_id, user_id, amount FROM prefixed;",
            prefixed(&format!(
                ", 'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
                 'scan.bounded.specific-offsets' = '{}'",
                bounds(&records, 2)
            ))
        ),
        2,
    );
    let want: BTreeMap<Vec<String>, i64> = orders
        .iter()
        .enumerate()
        .map(|(i, (u, a))| (vec![u.to_string(), i.to_string(), a.to_string()], 1))
        .collect();
    assert_eq!(got, want);

    let written = broker.consume("totals_c", 3, usize::MAX, false);
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for (_, key, value) in &written {
        last.insert(key.clone().unwrap(), value.clone().unwrap());
    }
    let users = per_user(&orders);
    let want_records: BTreeMap<String, String> = users
        .iter()
        .map(|(u, (n, t))| (u.to_string(), format!("{u},{n},{t}")))
        .collect();
    assert_eq!(last, want_records);
    let got = run_folded(
        &format!(
            "{}
             SELECT user_id, n, total FROM totals;",
            totals(&format!(
                ", 'scan.bounded.mode' = 'specific-offsets', 'scan.bounded.specific-offsets' = '{}'",
                bounds(&written, 3)
            ))
        ),
        2,
    );
    let want: BTreeMap<Vec<String>, i64> = users
        .iter()
        .map(|(u, (n, t))| (vec![u.to_string(), n.to_string(), t.to_string()], 1))
        .collect();
    assert_eq!(got, want);

    // A prefix needs EXCEPT_KEY, and every key column must carry it.
    for (options, error) in [
        (
            "'key.fields' = 'k_user_id', 'key.fields-prefix' = 'k_'",
            "'key.fields-prefix' needs 'value.fields-include' = 'EXCEPT_KEY'",
        ),
        (
            "'key.fields' = 'user_id', 'key.fields-prefix' = 'k_', 'value.fields-include' = 'EXCEPT_KEY'",
            "key column 'user_id' does not start with 'key.fields-prefix' = 'k_'",
        ),
    ] {
        let err = sluice_sql::plan_script(&format!(
            "CREATE TABLE t (k_user_id BIGINT, user_id BIGINT)
               WITH ('connector' = 'kafka', 'topic' = 'orders_p',
                 'properties.bootstrap.servers' = '{}', 'format' = 'json',
                 'scan.startup.mode' = 'earliest-offset', 'key.format' = 'json', {options});
             SELECT * FROM t;",
            broker.servers
        ))
        .and_then(|plan| {
            common::run_folded(plan, 1, Duration::from_secs(30))
                .map(|_| ())
                .map_err(sluice_common::Error::Runtime)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(error), "{err}");
    }
}
