//! The nats connector against the NATS server with JetStream on 127.0.0.1:4222. Each test makes
//! streams and subjects of its own (named after the test and the process), and deletes them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::common;

const SERVER: &str = "nats://127.0.0.1:4222";

/// A JetStream stream of this test, deleted on drop.
struct Stream {
    rt: tokio::runtime::Runtime,
    js: jetstream::Context,
    name: String,
    subject: String,
}

impl Stream {
    /// A stream named after `test` (unique per process and run) capturing `<name>.>`.
    fn create(test: &str) -> Stream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("{test}_{}_{nanos}", std::process::id()).to_uppercase();
        let js = rt.block_on(async {
            let client = async_nats::connect(SERVER)
                .await
                .expect("the NATS server on 127.0.0.1:4222 (with JetStream)");
            jetstream::new(client)
        });
        let subject = name.to_lowercase();
        rt.block_on(js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{subject}.>")],
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        }))
        .unwrap();
        Stream {
            rt,
            js,
            name,
            subject,
        }
    }

    /// Publishes messages to `<subject>.<suffix>` and waits for their acknowledgements.
    fn publish(&self, messages: &[(String, String)]) {
        self.rt.block_on(async {
            let mut acks = vec![];
            for (suffix, payload) in messages {
                acks.push(
                    self.js
                        .publish(format!("{}.{suffix}", self.subject), payload.clone().into())
                        .await
                        .unwrap(),
                );
                if acks.len() == 2000 {
                    for a in acks.drain(..) {
                        a.await.unwrap();
                    }
                }
            }
            for a in acks {
                a.await.unwrap();
            }
        });
    }

    /// Every message of the stream as text, in order.
    fn messages(&self) -> Vec<String> {
        use futures_util::StreamExt;
        self.rt.block_on(async {
            let mut stream = self.js.get_stream(&self.name).await.unwrap();
            let n = stream.info().await.unwrap().state.messages as usize;
            if n == 0 {
                return vec![];
            }
            let consumer = stream
                .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
                .await
                .unwrap();
            let mut messages = consumer.messages().await.unwrap().take(n);
            let mut out = vec![];
            while let Some(m) = messages.next().await {
                out.push(String::from_utf8(m.unwrap().payload.to_vec()).unwrap());
            }
            out
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.js.delete_stream(&self.name));
    }
}

fn run_folded(script: &str, workers: usize) -> Result<BTreeMap<Vec<String>, i64>, String> {
    let plan = sluice_sql::plan_script(script).map_err(|e| e.to_string())?;
    common::run_folded(plan, workers, Duration::from_secs(120)).map(|(_, rows)| rows)
}

fn text(ms: i64) -> String {
    sluice_common::time::format_millis(ms)
}

/// Orders on two subjects of a stream, event times out of order: a tumbling window over the
/// stream (bounded at its last message when the job starts), read with 1 and 3 workers, equals
/// the batch answer; metadata columns hold each message's subject and sequence.
#[test]
fn a_windowed_aggregation_over_a_stream_equals_the_batch_answer() {
    let stream = Stream::create("nats_window");
    let mut messages = vec![];
    let mut expected: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    let mut per_subject: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for i in 0..6000i64 {
        let ts = 1_700_000_000_000 + i * 25 - (i * 7919 % 3000);
        let category = ["shoes", "books", "food"][(i % 3) as usize];
        let suffix = if i % 2 == 0 { "eu" } else { "us" };
        messages.push((
            suffix.to_string(),
            format!(
                r#"{{"id":{i},"category":"{category}","amount":{},"ts":"{}"}}"#,
                i % 100,
                text(ts)
            ),
        ));
        let window = text(ts - ts.rem_euclid(10_000));
        let key = vec![window, category.to_string()];
        let e = expected.entry(key).or_insert(0);
        *e += 1;
        let s = per_subject
            .entry(format!("{}.{suffix}", stream.subject))
            .or_default();
        s.0 += 1;
        s.1 += i + 1; // stream sequences start at 1
    }
    stream.publish(&messages);
    let expected: BTreeMap<Vec<String>, i64> = expected
        .into_iter()
        .map(|(mut k, n)| {
            k.push(n.to_string());
            (k, 1)
        })
        .collect();
    for workers in [1, 3] {
        let got = run_folded(
            &format!(
                "CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT, ts TIMESTAMP(3),
                   WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
                 WITH ('connector' = 'nats', 'servers' = '{SERVER}', 'stream' = '{}',
                   'format' = 'json', 'scan.bounded.mode' = 'latest');
                 SELECT window_start, category, COUNT(*)
                 FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(ts), INTERVAL '10' SECOND))
                 GROUP BY window_start, window_end, category;",
                stream.name
            ),
            workers,
        )
        .unwrap();
        assert_eq!(got, expected, "{workers} workers");
    }
    let got = run_folded(
        &format!(
            "CREATE TABLE orders (id BIGINT, subj STRING METADATA FROM 'subject',
               seq BIGINT METADATA FROM 'sequence')
             WITH ('connector' = 'nats', 'servers' = '{SERVER}', 'stream' = '{}',
               'format' = 'json', 'scan.bounded.mode' = 'latest');
             SELECT subj, COUNT(*), SUM(seq) FROM orders GROUP BY subj;",
            stream.name
        ),
        2,
    )
    .unwrap();
    let want: BTreeMap<Vec<String>, i64> = per_subject
        .into_iter()
        .map(|(s, (n, seqs))| (vec![s, n.to_string(), seqs.to_string()], 1))
        .collect();
    assert_eq!(got, want);
}

/// A stream filtered by subject, started at a sequence and bounded before another, reads
/// exactly the messages in between on that subject.
#[test]
fn subject_filters_and_sequence_bounds_pick_the_messages() {
    let stream = Stream::create("nats_bounds");
    let messages: Vec<(String, String)> = (1..=100i64)
        .map(|i| {
            (
                if i % 4 == 0 { "a" } else { "b" }.to_string(),
                format!(r#"{{"id":{i}}}"#),
            )
        })
        .collect();
    stream.publish(&messages);
    let got = run_folded(
        &format!(
            "CREATE TABLE t (id BIGINT)
             WITH ('connector' = 'nats', 'servers' = '{SERVER}', 'stream' = '{}',
               'subject' = '{}.a', 'format' = 'json',
               'scan.startup.mode' = 'sequence', 'scan.startup.sequence' = '10',
               'scan.bounded.mode' = 'sequence', 'scan.bounded.sequence' = '61');
             SELECT id FROM t;",
            stream.name, stream.subject
        ),
        1,
    )
    .unwrap();
    // Sequence i holds id i: ids 12, 16, ..., 60 are on subject `a` in [10, 61).
    let want: BTreeMap<Vec<String>, i64> = (10..61)
        .filter(|i| i % 4 == 0)
        .map(|i: i64| (vec![i.to_string()], 1))
        .collect();
    assert_eq!(got, want);
}

/// Checkpointed sequences and an exactly-once sink: a job reading a stream into an updating
/// aggregation (to files) and copying every row to another stream (exactly-once), killed with
/// SIGKILL at random moments and rerun on another worker count, commits exactly the batch answer
/// to the files, and the other stream holds every row once.
#[test]
fn killed_and_rerun_the_files_and_the_sink_stream_are_exact() {
    let input = Stream::create("nats_kill_in");
    let output = Stream::create("nats_kill_out");
    const ROWS: i64 = 150_000;
    let mut messages = vec![];
    let mut per_category: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..ROWS {
        let category = format!("c{}", i * 31 % 23);
        messages.push((
            "orders".to_string(),
            format!(r#"{{"id":{i},"category":"{category}"}}"#),
        ));
        *per_category.entry(category).or_default() += 1;
    }
    input.publish(&messages);
    let expected: BTreeMap<String, i64> = per_category
        .iter()
        .map(|(c, n)| (serde_json::json!({"category": c, "n": n}).to_string(), 1))
        .collect();
    let script = |dir: &Path| {
        format!(
            "SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{ckpt}';
             SET 'table.exec.mini-batch.size' = '256';
             CREATE TABLE orders (id BIGINT, category STRING)
             WITH ('connector' = 'nats', 'servers' = '{SERVER}', 'stream' = '{input}',
               'format' = 'json', 'scan.bounded.mode' = 'latest');
             CREATE TABLE per_category (category STRING, n BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'debezium-json');
             CREATE TABLE copy (id BIGINT, category STRING)
               WITH ('connector' = 'nats', 'servers' = '{SERVER}', 'subject' = '{output}.rows',
                 'format' = 'json', 'sink.delivery-guarantee' = 'exactly-once',
                 'sink.message-id-prefix' = '{output}');
             INSERT INTO per_category SELECT category, COUNT(*) FROM orders GROUP BY category;
             INSERT INTO copy SELECT id, category FROM orders;",
            ckpt = dir.join("checkpoints").display(),
            input = input.name,
            output = output.subject,
            out = dir.join("out").display()
        )
    };
    // One uninterrupted run (into a stream of its own) says how long the job takes here.
    let whole = tempfile::tempdir().unwrap();
    let scratch = Stream::create("nats_kill_whole");
    let started = Instant::now();
    let (ok, stderr) = common::run_cli(
        whole.path(),
        &script(whole.path()).replace(&output.subject, &scratch.subject),
        3,
        Duration::from_secs(180),
    );
    assert!(ok, "{stderr}");
    let took = started.elapsed().as_millis() as u64;
    assert!(
        took > 1500,
        "the job must run long enough to be killed: {took} ms"
    );
    assert_eq!(scratch.messages().len(), ROWS as usize);
    assert_eq!(
        common::committed_rows(&whole.path().join("out"), |_| {}),
        expected
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(&file, script(dir.path())).unwrap();
    let kills = common::kill_runs(dir.path(), &file, 3, took);
    assert!(kills >= 2, "the job should have been killed mid-way");
    let (ok, stderr) =
        common::run_cli(dir.path(), &script(dir.path()), 2, Duration::from_secs(180));
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    assert_eq!(
        common::committed_rows(&dir.path().join("out"), |_| {}),
        expected
    );
    let mut ids: Vec<i64> = output
        .messages()
        .iter()
        .map(|m| {
            serde_json::from_str::<serde_json::Value>(m).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..ROWS).collect::<Vec<_>>(),
        "every row once in the sink stream"
    );
}

/// No server at the address, or no such stream, fails within the timeout naming it; a message
/// that is not JSON names its stream and sequence.
#[test]
fn unreachable_servers_missing_streams_and_bad_messages_are_named() {
    let port = common::free_port();
    let started = Instant::now();
    let err = run_folded(
        &format!(
            "CREATE TABLE t (id BIGINT)
             WITH ('connector' = 'nats', 'servers' = 'nats://127.0.0.1:{port}', 'stream' = 'S',
               'format' = 'json', 'sluice.connect-timeout' = '2 s');
             SELECT id FROM t;"
        ),
        1,
    )
    .unwrap_err();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let err = run_folded(
        &format!(
            "CREATE TABLE t (id BIGINT)
             WITH ('connector' = 'nats', 'servers' = '{SERVER}', 'stream' = 'NO_SUCH_STREAM_X',
               'format' = 'json');
             SELECT id FROM t;"
        ),
        1,
    )
    .unwrap_err();
    assert!(err.contains("NO_SUCH_STREAM_X"), "{err}");
    let stream = Stream::create("nats_bad");
    stream.publish(&[
        ("x".into(), r#"{"id":1}"#.into()),
        ("x".into(), "not json".into()),
        ("x".into(), r#"{"id":3}"#.into()),
    ]);
    let script = |extra: &str| {
        format!(
            "CREATE TABLE t (id BIGINT)
             WITH ('connector' = 'nats', 'servers' = '{SERVER}', 'stream' = '{}',
               'format' = 'json', 'scan.bounded.mode' = 'latest'{extra});
             SELECT id FROM t;",
            stream.name
        )
    };
    let err = run_folded(&script(""), 1).unwrap_err();
    assert!(
        err.contains(&format!("stream '{}' sequence 2", stream.name)),
        "{err}"
    );
    let got = run_folded(&script(", 'json.ignore-parse-errors' = 'true'"), 1).unwrap();
    assert_eq!(
        got,
        [(vec!["1".to_string()], 1), (vec!["3".to_string()], 1)].into()
    );
    // A sink subject that no stream captures.
    let err = run_folded(
        &format!(
            "CREATE TABLE out (id BIGINT)
             WITH ('connector' = 'nats', 'servers' = '{SERVER}', 'subject' = 'nobody.listens.here',
               'format' = 'json');
             INSERT INTO out SELECT id FROM (VALUES (1)) AS v(id);"
        ),
        1,
    )
    .unwrap_err();
    assert!(err.contains("nobody.listens.here"), "{err}");
}
