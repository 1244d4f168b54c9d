//! The `avro` format against an independent Avro implementation: fastavro (PyPI, which
//! `bash .ci/run` installs) writes and reads records with the schemas Flink derives from the
//! tables, written out by hand in `avro_oracle.py`. Sluice reads what fastavro wrote and
//! fastavro reads what Sluice wrote, over Kafka (plain values, keys, upsert-kafka) and NATS.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common;
use crate::common::run_cli as run;
use crate::kafka::{Broker, ByteRecord};

/// The orders table of `avro_oracle.py`.
const ORDERS: &str = "order_id BIGINT NOT NULL, user_id INT, category STRING, \
     amount DECIMAL(10, 2), paid BOOLEAN, score DOUBLE, qty SMALLINT, day DATE, \
     ts TIMESTAMP(3), tag BYTES";

/// Runs `avro_oracle.py` with `args` under the test tools' Python (`SLUICE_TEST_PYTHON`, or the
/// venv `.ci/run` makes).
fn oracle(args: &[&str]) {
    let python = std::env::var("SLUICE_TEST_PYTHON").unwrap_or_else(|_| {
        format!(
            "{}/.cache/sluice-tools/venv/bin/python",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    assert!(
        Path::new(&python).exists(),
        "no Python with fastavro at {python}: `bash .ci/run` installs it"
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/integration/avro_oracle.py"
    );
    let out = Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "avro_oracle.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Length-prefixed records (4 bytes, big-endian); a zero-length one is a tombstone.
fn read_records(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    let (mut out, mut at) = (vec![], 0);
    while at < data.len() {
        let n = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        out.push(data[at + 4..at + 4 + n].to_vec());
        at += 4 + n;
    }
    out
}

fn write_records(path: &Path, records: &[Option<Vec<u8>>]) {
    let mut data = vec![];
    for r in records {
        let r = r.as_deref().unwrap_or_default();
        data.extend((r.len() as u32).to_be_bytes());
        data.extend(r);
    }
    std::fs::write(path, data).unwrap();
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `partition:p,offset:n;...`: each partition read up to the records it holds.
fn bounds(partitions: &[i32], count: i32) -> String {
    (0..count)
        .map(|p| {
            let n = partitions.iter().filter(|q| **q == p).count();
            format!("partition:{p},offset:{n}")
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The values and keys of Kafka records as fastavro reads them with the oracle's schemas
/// `value_schema` and `key_schema` (a tombstone's value is null).
fn fastavro_read(
    dir: &Path,
    records: &[ByteRecord],
    value_schema: &str,
    key_schema: &str,
) -> (Vec<Value>, Vec<Value>) {
    let mut out = vec![];
    for (schema, part) in [(value_schema, 2), (key_schema, 1)] {
        let (bin, lines) = (
            dir.join(format!("{schema}.bin")),
            dir.join(format!("{schema}.jsonl")),
        );
        let bodies: Vec<Option<Vec<u8>>> = records
            .iter()
            .map(|r| if part == 2 { r.2.clone() } else { r.1.clone() })
            .collect();
        write_records(&bin, &bodies);
        oracle(&[
            "decode",
            schema,
            bin.to_str().unwrap(),
            lines.to_str().unwrap(),
        ]);
        out.push(json_lines(&lines));
    }
    let keys = out.pop().unwrap();
    (out.pop().unwrap(), keys)
}

/// A decimal's cents, from JSON text or a JSON number.
fn cents(v: &Value) -> Option<i64> {
    match v {
        Value::Null => None,
        Value::String(s) => Some((s.parse::<f64>().unwrap() * 100.0).round() as i64),
        n => Some((n.as_f64().unwrap() * 100.0).round() as i64),
    }
}

/// The orders in the JSON files of `out` (every column but `tag`) are `rows`, value by value.
fn assert_read(out: &Path, rows: &[Value]) {
    let expected: BTreeMap<i64, &Value> = rows
        .iter()
        .map(|r| (r["order_id"].as_i64().unwrap(), r))
        .collect();
    let got = common::committed_rows(out, |_| {});
    assert_eq!(got.values().sum::<i64>(), rows.len() as i64);
    let mut seen = 0;
    for (text, n) in &got {
        assert_eq!(*n, 1, "{text}");
        let row: Value = serde_json::from_str(text).unwrap();
        let want = expected[&row["order_id"].as_i64().unwrap()];
        for c in ["user_id", "category", "paid", "qty", "day", "ts"] {
            assert_eq!(
                row.get(c).unwrap_or(&Value::Null),
                &want[c],
                "{c} of {text}"
            );
        }
        let score = row.get("score").unwrap_or(&Value::Null);
        assert_eq!(score.as_f64(), want["score"].as_f64(), "score of {text}");
        let amount = row.get("amount").unwrap_or(&Value::Null);
        assert_eq!(cents(amount), cents(&want["amount"]), "amount of {text}");
        seen += 1;
    }
    assert_eq!(seen, expected.len());
}

/// The JSON files table `assert_read` reads.
const FILES: &str = "order_id BIGINT, user_id INT, category STRING, amount DECIMAL(10, 2), \
     paid BOOLEAN, score DOUBLE, qty SMALLINT, day DATE, ts TIMESTAMP(3)";

/// fastavro's orders written to a topic over 4 partitions are read by Sluice (two workers)
/// into a JSON file equal to fastavro's rows, value by value (every type, NULLs, bytes left
/// out of the file), and written by Sluice as Avro to another topic, keyed by an Avro key,
/// which fastavro reads back as exactly the rows it wrote. A record that is not an Avro
/// record of the columns names its topic, partition and offset.
#[test]
fn kafka_avro_records_agree_with_fastavro_both_ways() {
    let broker = Broker::start();
    broker.create_topic("avro_in", 4);
    broker.create_topic("avro_out", 2);
    let dir = tempfile::tempdir().unwrap();
    let (bin, rows_path) = (dir.path().join("in.bin"), dir.path().join("rows.jsonl"));
    oracle(&[
        "gen",
        "3000",
        "11",
        bin.to_str().unwrap(),
        rows_path.to_str().unwrap(),
    ]);
    let rows = json_lines(&rows_path);
    let records: Vec<ByteRecord> = read_records(&bin)
        .into_iter()
        .enumerate()
        .map(|(i, r)| ((i % 4) as i32, None, Some(r)))
        .collect();
    broker.produce_bytes("avro_in", &records);
    let partitions: Vec<i32> = records.iter().map(|r| r.0).collect();
    let out = dir.path().join("out");
    let script = format!(
        "CREATE TABLE src ({ORDERS})
           WITH ('connector' = 'kafka', 'topic' = 'avro_in',
             'properties.bootstrap.servers' = '{servers}', 'format' = 'avro',
             'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
             'scan.bounded.specific-offsets' = '{bounds}');
         CREATE TABLE copy ({ORDERS})
           WITH ('connector' = 'kafka', 'topic' = 'avro_out',
             'properties.bootstrap.servers' = '{servers}', 'value.format' = 'avro',
             'key.format' = 'avro', 'key.fields' = 'order_id');
         CREATE TABLE files ({FILES})
           WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'json');
         INSERT INTO copy SELECT * FROM src;
         INSERT INTO files SELECT order_id, user_id, category, amount, paid, score, qty, day, ts
           FROM src;",
        servers = broker.servers,
        bounds = bounds(&partitions, 4),
        out = out.display(),
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");

    // What Sluice read, value by value.
    assert_read(&out, &rows);

    // What Sluice wrote, as fastavro reads it.
    let copied = broker.consume_bytes("avro_out", 2, 3000, false);
    assert_eq!(copied.len(), 3000);
    let (values, keys) = fastavro_read(dir.path(), &copied, "orders", "orders-key");
    let mut back = values;
    for (value, key) in back.iter().zip(keys) {
        assert_eq!(value["order_id"], key["order_id"]);
    }
    back.sort_by_key(|r| r["order_id"].as_i64());
    let mut rows = rows.clone();
    rows.sort_by_key(|r| r["order_id"].as_i64());
    assert!(back == rows, "fastavro reads other rows than it wrote");

    // A record that is not one of the table's names its place.
    broker.create_topic("avro_bad", 1);
    let mut bad = read_records(&bin)[..3].to_vec();
    bad[1].truncate(4);
    broker.produce_bytes(
        "avro_bad",
        &bad.into_iter()
            .map(|r| (0, None, Some(r)))
            .collect::<Vec<_>>(),
    );
    let script = format!(
        "CREATE TABLE src ({ORDERS})
           WITH ('connector' = 'kafka', 'topic' = 'avro_bad',
             'properties.bootstrap.servers' = '{}', 'format' = 'avro',
             'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
             'scan.bounded.specific-offsets' = 'partition:0,offset:3');
         CREATE TABLE sink (order_id BIGINT) WITH ('connector' = 'blackhole');
         INSERT INTO sink SELECT order_id FROM src;",
        broker.servers
    );
    let (ok, stderr) = run(dir.path(), &script, 1, Duration::from_secs(60));
    assert!(!ok);
    assert!(
        stderr.contains("topic 'avro_bad' partition 0 offset 1: not an Avro record")
            && stderr.contains("'avro.ignore-parse-errors'"),
        "{stderr}"
    );
}

/// An updating aggregation goes to an `upsert-kafka` topic with Avro keys and values: the last
/// record fastavro reads per key is the batch answer's row (PRIMARY KEY columns are NOT NULL,
/// so the schemas are Flink's). Read back as an upsert-kafka table by Sluice, the table is the
/// batch answer again.
#[test]
fn upsert_kafka_avro_keys_and_values_agree_with_fastavro() {
    let broker = Broker::start();
    broker.create_topic("avro_orders", 2);
    broker.create_topic("avro_totals", 3);
    let dir = tempfile::tempdir().unwrap();
    let (bin, rows_path) = (dir.path().join("in.bin"), dir.path().join("rows.jsonl"));
    oracle(&[
        "gen",
        "2000",
        "12",
        bin.to_str().unwrap(),
        rows_path.to_str().unwrap(),
    ]);
    let records: Vec<ByteRecord> = read_records(&bin)
        .into_iter()
        .enumerate()
        .map(|(i, r)| ((i % 2) as i32, None, Some(r)))
        .collect();
    broker.produce_bytes("avro_orders", &records);
    let partitions: Vec<i32> = records.iter().map(|r| r.0).collect();
    // The batch answer: orders and total cents per category.
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in json_lines(&rows_path) {
        if let Some(c) = r["category"].as_str() {
            let e = expected.entry(c.to_string()).or_default();
            e.0 += 1;
            e.1 += cents(&r["amount"]).unwrap_or(0);
        }
    }
    let totals = |extra: &str| {
        format!(
            "CREATE TABLE totals (category STRING, n BIGINT, total DECIMAL(12, 2),
               PRIMARY KEY (category) NOT ENFORCED)
             WITH ('connector' = 'upsert-kafka', 'topic' = 'avro_totals',
               'properties.bootstrap.servers' = '{}',
               'key.format' = 'avro', 'value.format' = 'avro'{extra});",
            broker.servers
        )
    };
    let script = format!(
        "CREATE TABLE src ({ORDERS})
           WITH ('connector' = 'kafka', 'topic' = 'avro_orders',
             'properties.bootstrap.servers' = '{}', 'format' = 'avro',
             'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
             'scan.bounded.specific-offsets' = '{}');
         {}
         INSERT INTO totals SELECT category, COUNT(*), SUM(amount) FROM src
           WHERE category IS NOT NULL GROUP BY category;",
        broker.servers,
        bounds(&partitions, 2),
        totals("")
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    let written = broker.consume_bytes("avro_totals", 3, usize::MAX, false);
    assert!(written.len() >= expected.len());
    let (values, keys) = fastavro_read(dir.path(), &written, "totals-value", "totals-key");
    let mut table: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (value, key) in values.iter().zip(keys) {
        let category = key["category"].as_str().unwrap().to_string();
        match value {
            Value::Null => {
                table.remove(&category);
            }
            v => {
                assert_eq!(v["category"], key["category"]);
                table.insert(
                    category,
                    (v["n"].as_i64().unwrap(), cents(&v["total"]).unwrap()),
                );
            }
        }
    }
    assert_eq!(table, expected);

    // Read back by Sluice.
    let partitions: Vec<i32> = written.iter().map(|r| r.0).collect();
    let script = format!(
        "{}
         SELECT category, n, CAST(total * 100 AS BIGINT) FROM totals;",
        totals(&format!(
            ", 'scan.bounded.mode' = 'specific-offsets', 'scan.bounded.specific-offsets' = '{}'",
            bounds(&partitions, 3)
        ))
    );
    let plan = sluice_sql::plan_script(&script).unwrap_or_else(|e| panic!("{e}"));
    let (_, folded) =
        common::run_folded(plan, 2, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{e}"));
    let want: BTreeMap<Vec<String>, i64> = expected
        .iter()
        .map(|(c, (n, t))| (vec![c.clone(), n.to_string(), t.to_string()], 1))
        .collect();
    assert_eq!(folded, want);
}

/// Avro object container files written by fastavro (deflate and snappy, many blocks each) are
/// read by Sluice (two workers, a file each) value by value, and copied into Avro files
/// (snappy, Flink's default codec) that fastavro reads as exactly the rows it wrote. A file
/// that is not an Avro container file is named.
#[test]
fn avro_files_agree_with_fastavro_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let mut rows = vec![];
    for (name, seed, codec) in [("a.avro", "21", "deflate"), ("b.avro", "22", "snappy")] {
        let lines = dir.path().join(format!("{name}.jsonl"));
        oracle(&[
            "ocf-write",
            "2500",
            seed,
            codec,
            input.join(name).to_str().unwrap(),
            lines.to_str().unwrap(),
        ]);
        rows.extend(json_lines(&lines));
    }
    let (copy, files) = (dir.path().join("copy"), dir.path().join("files"));
    let script = format!(
        "CREATE TABLE src ({ORDERS})
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'avro');
         CREATE TABLE copy ({ORDERS})
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'avro');
         CREATE TABLE files ({FILES})
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         INSERT INTO copy SELECT * FROM src;
         INSERT INTO files SELECT order_id, user_id, category, amount, paid, score, qty, day, ts
           FROM src;",
        input.display(),
        copy.display(),
        files.display(),
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(120));
    assert!(ok, "{stderr}");
    assert_read(&files, &rows);
    let mut back = vec![];
    for entry in std::fs::read_dir(&copy).unwrap() {
        let path = entry.unwrap().path();
        assert!(
            path.extension().is_some_and(|e| e == "avro"),
            "{}",
            path.display()
        );
        let lines = dir.path().join("back.jsonl");
        oracle(&["ocf-read", path.to_str().unwrap(), lines.to_str().unwrap()]);
        back.extend(json_lines(&lines));
    }
    back.sort_by_key(|r| r["order_id"].as_i64());
    rows.sort_by_key(|r| r["order_id"].as_i64());
    assert!(back == rows, "fastavro reads other rows than it wrote");

    std::fs::write(input.join("c.avro"), "{\"order_id\": 1}\n").unwrap();
    let (ok, stderr) = run(dir.path(), &script, 1, Duration::from_secs(60));
    assert!(!ok);
    assert!(
        stderr.contains("c.avro: not an Avro object container file"),
        "{stderr}"
    );
}

/// fastavro's records as the `row` field of Redis stream entries (bytes, not text) are read by
/// the redis source with `'format' = 'avro'` value by value.
#[cfg(feature = "redis")]
#[test]
fn redis_stream_entries_of_avro_records_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, rows_path) = (dir.path().join("in.bin"), dir.path().join("rows.jsonl"));
    oracle(&[
        "gen",
        "1500",
        "31",
        bin.to_str().unwrap(),
        rows_path.to_str().unwrap(),
    ]);
    let key = format!(
        "sluice-test:avro_stream:{}:{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut con = redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("the Redis server on 127.0.0.1:6379");
    let mut pipe = redis::pipe();
    for record in read_records(&bin) {
        pipe.cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("row")
            .arg(record)
            .ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
    let files = dir.path().join("files");
    let script = format!(
        "CREATE TABLE src ({ORDERS})
           WITH ('connector' = 'redis', 'url' = 'redis://127.0.0.1:6379/0', 'key' = '{key}',
             'format' = 'avro', 'scan.bounded.mode' = 'latest');
         CREATE TABLE files ({FILES})
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         INSERT INTO files SELECT order_id, user_id, category, amount, paid, score, qty, day, ts
           FROM src;",
        files.display(),
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
    let _: () = redis::cmd("DEL").arg(&key).query(&mut con).unwrap();
    assert!(ok, "{stderr}");
    assert_read(&files, &json_lines(&rows_path));
}

/// Avro container files read with checkpoints, killed with SIGKILL three times and rerun on
/// another worker count: each file resumes at the record its checkpoint had reached, the copy
/// holds every order once, and the per-category counts (checkpointed state) are the batch
/// answer.
#[test]
fn killed_and_rerun_avro_files_resume_at_their_records() {
    let data = tempfile::tempdir().unwrap();
    let input = data.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let mut ids = vec![];
    let mut per_category: BTreeMap<String, i64> = BTreeMap::new();
    for seed in ["41", "42", "43", "44"] {
        let lines = data.path().join(format!("{seed}.jsonl"));
        oracle(&[
            "ocf-write",
            "150000",
            seed,
            "deflate",
            input.join(format!("{seed}.avro")).to_str().unwrap(),
            lines.to_str().unwrap(),
        ]);
        for r in json_lines(&lines) {
            ids.push(r["order_id"].as_i64().unwrap());
            if let Some(c) = r["category"].as_str() {
                *per_category.entry(c.to_string()).or_default() += 1;
            }
        }
    }
    ids.sort_unstable();
    let expected: BTreeMap<String, i64> = per_category
        .iter()
        .map(|(c, n)| (serde_json::json!({"category": c, "n": n}).to_string(), 1))
        .collect();
    let script = |dir: &Path| {
        format!(
            "SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{}';
             SET 'table.exec.mini-batch.size' = '256';
             CREATE TABLE src ({ORDERS})
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'avro');
             CREATE TABLE copy (order_id BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
             CREATE TABLE per_category (category STRING, n BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'debezium-json');
             INSERT INTO copy SELECT order_id FROM src;
             INSERT INTO per_category SELECT category, COUNT(*) FROM src
               WHERE category IS NOT NULL GROUP BY category;",
            dir.join("checkpoints").display(),
            input.display(),
            dir.join("out").display(),
            dir.join("per_category").display()
        )
    };
    let copied = |dir: &Path| -> Vec<i64> {
        let rows = common::committed_rows(&dir.join("out"), |_| {});
        let mut got = vec![];
        for (text, n) in rows {
            let row: Value = serde_json::from_str(&text).unwrap();
            for _ in 0..n {
                got.push(row["order_id"].as_i64().unwrap());
            }
        }
        got.sort_unstable();
        got
    };
    // One uninterrupted run says how long the job takes here.
    let whole = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (ok, stderr) = run(
        whole.path(),
        &script(whole.path()),
        3,
        Duration::from_secs(180),
    );
    assert!(ok, "{stderr}");
    let took = started.elapsed().as_millis() as u64;
    assert!(
        took > 1500,
        "the job must run long enough to be killed: {took} ms"
    );
    assert!(copied(whole.path()) == ids);
    assert_eq!(
        common::committed_rows(&whole.path().join("per_category"), |_| {}),
        expected
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(&file, script(dir.path())).unwrap();
    let kills = common::kill_runs(dir.path(), &file, 3, took);
    assert!(kills >= 2, "the job should have been killed mid-way");
    let (ok, stderr) = run(dir.path(), &script(dir.path()), 2, Duration::from_secs(180));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    let got = copied(dir.path());
    assert_eq!(got.len(), ids.len(), "every order once");
    assert!(got == ids, "every order once");
    assert_eq!(
        common::committed_rows(&dir.path().join("per_category"), |_| {}),
        expected
    );
}
