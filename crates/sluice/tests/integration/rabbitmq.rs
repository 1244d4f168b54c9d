//! The rabbitmq connector against the RabbitMQ broker on 127.0.0.1:5672 (guest/guest). Each
//! test declares queues and exchanges of its own (named after the test and the process), and
//! deletes them.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::common;

const URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const BROKER: &str = "'host' = '127.0.0.1', 'port' = '5672'";

/// A queue of this test (classic or stream), deleted on drop.
struct Queue {
    rt: tokio::runtime::Runtime,
    connection: Connection,
    name: String,
}

impl Queue {
    fn create(test: &str, stream: bool) -> Queue {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("{test}_{}_{nanos}", std::process::id());
        let connection = rt
            .block_on(Connection::connect(URI, ConnectionProperties::default()))
            .expect("RabbitMQ on 127.0.0.1:5672");
        let mut arguments = FieldTable::default();
        if stream {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("stream".into()),
            );
        }
        rt.block_on(async {
            let ch = connection.create_channel().await.unwrap();
            ch.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await
            .unwrap();
        });
        Queue {
            rt,
            connection,
            name,
        }
    }

    /// Publishes bodies through the default exchange and waits for the broker's confirmations.
    fn publish(&self, bodies: &[String]) {
        self.rt.block_on(async {
            let ch = self.connection.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            for chunk in bodies.chunks(5000) {
                let mut confirms = vec![];
                for b in chunk {
                    confirms.push(
                        ch.basic_publish(
                            "".into(),
                            self.name.as_str().into(),
                            BasicPublishOptions::default(),
                            b.as_bytes(),
                            BasicProperties::default().with_timestamp(1_700_000_000),
                        )
                        .await
                        .unwrap(),
                    );
                }
                for c in confirms {
                    assert!(c.await.unwrap().is_ack());
                }
            }
            // The broker counts a confirmed message at once; a stream writes its chunk first.
            let _ = ch.close(200, "OK".into()).await;
        });
    }

    /// Messages ready in the queue (classic queues).
    fn ready(&self) -> u32 {
        self.rt.block_on(async {
            let ch = self.connection.create_channel().await.unwrap();
            let q = ch
                .queue_declare(
                    self.name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            q.message_count()
        })
    }

    /// Takes every message of a classic queue (consumed, acknowledged) as text.
    fn drain(&self) -> Vec<String> {
        self.rt.block_on(async {
            let ch = self.connection.create_channel().await.unwrap();
            ch.basic_qos(1000, BasicQosOptions::default())
                .await
                .unwrap();
            let mut consumer = ch
                .basic_consume(
                    self.name.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let mut out = vec![];
            while let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(700), consumer.next()).await
            {
                let d = d.unwrap();
                out.push(String::from_utf8(d.data.clone()).unwrap());
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
            let _ = ch.close(200, "OK".into()).await;
            out
        })
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let _ = self.rt.block_on(async {
            let ch = self.connection.create_channel().await?;
            ch.queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
                .await
        });
    }
}

fn run_folded(script: &str, workers: usize) -> Result<BTreeMap<Vec<String>, i64>, String> {
    let plan = sluice_sql::plan_script(script).map_err(|e| e.to_string())?;
    common::run_folded(plan, workers, Duration::from_secs(120)).map(|(_, rows)| rows)
}

fn text(ms: i64) -> String {
    sluice_common::time::format_millis(ms)
}

/// Orders with event times out of order, and the batch answer of a 10-second tumbling window
/// per category over them.
fn orders(n: i64) -> (Vec<String>, BTreeMap<Vec<String>, i64>) {
    let mut bodies = vec![];
    let mut counts: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    for i in 0..n {
        let ts = 1_700_000_000_000 + i * 25 - (i * 7919 % 3000);
        let category = ["shoes", "books", "food"][(i % 3) as usize];
        bodies.push(format!(
            r#"{{"id":{i},"category":"{category}","amount":{},"ts":"{}"}}"#,
            i % 100,
            text(ts)
        ));
        *counts
            .entry(vec![text(ts - ts.rem_euclid(10_000)), category.to_string()])
            .or_default() += 1;
    }
    let expected = counts
        .into_iter()
        .map(|(mut k, n)| {
            k.push(n.to_string());
            (k, 1)
        })
        .collect();
    (bodies, expected)
}

fn window_script(queue: &str, extra: &str) -> String {
    format!(
        "CREATE TABLE orders (id BIGINT, category STRING, amount BIGINT, ts TIMESTAMP(3),
           WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)
         WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{queue}',
           'format' = 'json', 'scan.bounded.mode' = 'latest'{extra});
         SELECT window_start, category, COUNT(*)
         FROM TABLE(TUMBLE(TABLE orders, DESCRIPTOR(ts), INTERVAL '10' SECOND))
         GROUP BY window_start, window_end, category;"
    )
}

/// A classic queue consumed by 1 and by 3 workers (the broker deals the messages among them)
/// into a tumbling window equals the batch answer, and leaves the queue empty; metadata columns
/// hold each message's routing key, exchange and timestamp.
#[test]
fn a_windowed_aggregation_over_a_classic_queue_equals_the_batch_answer() {
    let queue = Queue::create("rmq_window", false);
    let (bodies, expected) = orders(6000);
    for workers in [1, 3] {
        queue.publish(&bodies);
        let got = run_folded(&window_script(&queue.name, ""), workers).unwrap();
        assert_eq!(got, expected, "{workers} workers");
        assert_eq!(queue.ready(), 0, "every message consumed");
    }
    queue.publish(&bodies[..100]);
    let got = run_folded(
        &format!(
            "CREATE TABLE orders (id BIGINT, rk STRING METADATA FROM 'routing-key',
               ex STRING METADATA FROM 'exchange', again BOOLEAN METADATA FROM 'redelivered',
               sent TIMESTAMP_LTZ(3) METADATA FROM 'timestamp')
             WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{}',
               'format' = 'json', 'scan.bounded.mode' = 'latest');
             SELECT rk, ex, again, CAST(sent AS STRING), COUNT(*), SUM(id)
             FROM orders GROUP BY rk, ex, again, CAST(sent AS STRING);",
            queue.name
        ),
        2,
    )
    .unwrap();
    let rows: Vec<&Vec<String>> = got.keys().collect();
    assert_eq!(rows.len(), 1, "{got:?}");
    let row = rows[0];
    assert_eq!(row[0], queue.name);
    assert_eq!(row[1], "");
    assert_eq!(row[2], "false");
    assert!(row[3].starts_with("2023-11-14"), "{row:?}");
    assert_eq!(
        row[4..],
        ["100".to_string(), (0..100).sum::<i64>().to_string()]
    );
}

/// A stream queue is one ordered log read by worker 0 from an offset: a window over it equals
/// the batch answer with 1 and 3 workers (reading leaves the stream as it was), the offset
/// metadata numbers the messages, and a start offset skips those before it.
#[test]
fn a_stream_queue_is_read_from_offsets() {
    let queue = Queue::create("rmq_stream", true);
    let (bodies, expected) = orders(6000);
    queue.publish(&bodies);
    for workers in [1, 3] {
        let got = run_folded(&window_script(&queue.name, ""), workers).unwrap();
        assert_eq!(got, expected, "{workers} workers");
    }
    let got = run_folded(
        &format!(
            "CREATE TABLE orders (id BIGINT, o BIGINT METADATA FROM 'offset')
             WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{}', 'format' = 'json',
               'scan.startup.mode' = 'offset', 'scan.startup.offset' = '4000',
               'scan.bounded.mode' = 'latest');
             SELECT COUNT(*), SUM(id), SUM(o), MIN(o) FROM orders;",
            queue.name
        ),
        2,
    )
    .unwrap();
    // Message i is at offset i.
    let sum: i64 = (4000..6000).sum();
    assert_eq!(
        got,
        [(
            vec![
                "2000".to_string(),
                sum.to_string(),
                sum.to_string(),
                "4000".to_string()
            ],
            1
        )]
        .into()
    );
}

/// The kill test for queues. A job copies every message of a queue into files (exactly-once,
/// with checkpoints) and is killed with SIGKILL at random moments, then rerun on another worker
/// count. A classic queue is at-least-once: no message is lost (each id is in the files), and
/// the queue ends empty. A stream queue resumes from checkpointed offsets: each id exactly once.
#[test]
fn killed_and_rerun_no_message_is_lost() {
    for stream in [false, true] {
        killed_and_rerun(stream);
    }
}

fn killed_and_rerun(stream: bool) {
    const ROWS: i64 = 120_000;
    let bodies: Vec<String> = (0..ROWS)
        .map(|i| format!(r#"{{"id":{i},"category":"c{}"}}"#, i % 7))
        .collect();
    let script = |dir: &Path, queue: &str| {
        format!(
            "SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{ckpt}';
             CREATE TABLE orders (id BIGINT, category STRING)
             WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{queue}',
               'format' = 'json', 'scan.bounded.mode' = 'latest');
             CREATE TABLE copy (id BIGINT, category STRING)
               WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'json');
             INSERT INTO copy SELECT id, category FROM orders;",
            ckpt = dir.join("checkpoints").display(),
            out = dir.join("out").display()
        )
    };
    let ids = |dir: &Path| -> BTreeMap<i64, i64> {
        let mut ids: BTreeMap<i64, i64> = BTreeMap::new();
        for (row, n) in common::committed_rows(&dir.join("out"), |_| {}) {
            let v: serde_json::Value = serde_json::from_str(&row).unwrap();
            *ids.entry(v["id"].as_i64().unwrap()).or_default() += n;
        }
        ids
    };
    // One uninterrupted run says how long the job takes; its output has every id once.
    let whole = tempfile::tempdir().unwrap();
    let queue = Queue::create(if stream { "rmq_kill_s" } else { "rmq_kill" }, stream);
    queue.publish(&bodies);
    let started = Instant::now();
    let (ok, stderr) = common::run_cli(
        whole.path(),
        &script(whole.path(), &queue.name),
        3,
        Duration::from_secs(180),
    );
    assert!(ok, "{stderr}");
    let took = started.elapsed().as_millis() as u64;
    assert!(
        took > 1500,
        "the job must run long enough to be killed: {took} ms"
    );
    let once: BTreeMap<i64, i64> = (0..ROWS).map(|i| (i, 1)).collect();
    let got = ids(whole.path());
    assert!(
        got == once,
        "stream {stream}: an uninterrupted run copies each message once: {} ids, {} rows, {} missing",
        got.len(),
        got.values().sum::<i64>(),
        (0..ROWS).filter(|i| !got.contains_key(i)).count()
    );
    if !stream {
        assert_eq!(
            queue.ready(),
            0,
            "the finished job acknowledged every message"
        );
        queue.publish(&bodies);
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(&file, script(dir.path(), &queue.name)).unwrap();
    let kills = common::kill_runs(dir.path(), &file, 3, took);
    assert!(kills >= 2, "the job should have been killed mid-way");
    let (ok, stderr) = common::run_cli(
        dir.path(),
        &script(dir.path(), &queue.name),
        2,
        Duration::from_secs(180),
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains("resuming from checkpoint"), "{stderr}");
    let got = ids(dir.path());
    let missing: Vec<i64> = (0..ROWS)
        .filter(|i| !got.contains_key(i))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "stream {stream}: lost messages, for example {missing:?}"
    );
    assert_eq!(
        got.len(),
        ROWS as usize,
        "stream {stream}: ids that were never sent"
    );
    if stream {
        assert!(got == once, "a stream queue resumes exactly");
    } else {
        assert_eq!(queue.ready(), 0, "the rerun acknowledged every message");
    }
}

/// The sink publishes with confirms: an updating aggregation written as Debezium JSON to a
/// queue through an exchange, read back by the source, folds to the batch answer; plain rows
/// go to a queue through the default exchange, as JSON and as CSV (read back too).
#[test]
fn the_sink_publishes_rows_and_changes() {
    let changes = Queue::create("rmq_sink_changes", false);
    let rows = Queue::create("rmq_sink_rows", false);
    let csv = Queue::create("rmq_sink_csv", false);
    let exchange = format!("{}_x", changes.name);
    changes.rt.block_on(async {
        let ch = changes.connection.create_channel().await.unwrap();
        ch.exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            changes.name.as_str().into(),
            exchange.as_str().into(),
            "totals".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    });
    let values: Vec<String> = (0..3000)
        .map(|i| format!("({i}, 'k{}', {})", i * 13 % 17, i % 50))
        .collect();
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    for i in 0..3000i64 {
        *totals.entry(format!("k{}", i * 13 % 17)).or_default() += i % 50;
    }
    let script = format!(
        "CREATE TABLE totals (k STRING, total BIGINT)
           WITH ('connector' = 'rabbitmq', {BROKER}, 'exchange' = '{exchange}',
             'routing-key' = 'totals', 'format' = 'debezium-json');
         CREATE TABLE copy (id BIGINT, k STRING)
           WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{rows}', 'format' = 'json');
         CREATE TABLE csv_copy (id BIGINT, k STRING, note STRING)
           WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{csv}', 'format' = 'csv');
         CREATE VIEW v AS SELECT * FROM (VALUES {values}) AS t(id, k, amount);
         INSERT INTO totals SELECT k, SUM(amount) FROM v GROUP BY k;
         INSERT INTO copy SELECT id, k FROM v;
         INSERT INTO csv_copy SELECT id, k, CONCAT('a \"quoted\", text ', k) FROM v;",
        values = values.join(", "),
        rows = rows.name,
        csv = csv.name
    );
    let plan = sluice_sql::plan_script(&script).unwrap();
    common::run_folded(plan, 2, Duration::from_secs(120)).unwrap();
    let got = run_folded(
        &format!(
            "CREATE TABLE totals (k STRING, total BIGINT)
             WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{}',
               'format' = 'debezium-json', 'scan.bounded.mode' = 'latest');
             SELECT k, total FROM totals;",
            changes.name
        ),
        1,
    )
    .unwrap();
    let want: BTreeMap<Vec<String>, i64> = totals
        .iter()
        .map(|(k, t)| (vec![k.clone(), t.to_string()], 1))
        .collect();
    assert_eq!(got, want);
    let got = run_folded(
        &format!(
            "CREATE TABLE copied (id BIGINT, k STRING, note STRING)
             WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{}',
               'format' = 'csv', 'scan.bounded.mode' = 'latest');
             SELECT k, note, COUNT(*), SUM(id) FROM copied GROUP BY k, note;",
            csv.name
        ),
        2,
    )
    .unwrap();
    let mut want: BTreeMap<Vec<String>, i64> = BTreeMap::new();
    let mut sums: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for i in 0..3000i64 {
        let s = sums.entry(format!("k{}", i * 13 % 17)).or_default();
        s.0 += 1;
        s.1 += i;
    }
    for (k, (n, sum)) in sums {
        let note = format!("a \"quoted\", text {k}");
        want.insert(vec![k, note, n.to_string(), sum.to_string()], 1);
    }
    assert_eq!(got, want);
    let mut ids: Vec<i64> = rows
        .drain()
        .iter()
        .map(|m| {
            serde_json::from_str::<serde_json::Value>(m).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..3000).collect::<Vec<_>>());
}

/// No broker at the address fails within the timeout naming it; a missing queue or exchange is
/// named; a message that is not JSON names its queue and delivery; a message that no queue takes
/// fails the job.
#[test]
fn unreachable_brokers_missing_queues_and_bad_messages_are_named() {
    let port = common::free_port();
    let started = Instant::now();
    let err = run_folded(
        &format!(
            "CREATE TABLE t (id BIGINT)
             WITH ('connector' = 'rabbitmq', 'host' = '127.0.0.1', 'port' = '{port}',
               'queue' = 'q', 'format' = 'json', 'sluice.connect-timeout' = '2 s');
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
             WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = 'no_such_queue_x',
               'format' = 'json');
             SELECT id FROM t;"
        ),
        1,
    )
    .unwrap_err();
    assert!(
        err.contains("no_such_queue_x") && err.contains("'queue'"),
        "{err}"
    );
    let err = run_folded(
        &format!(
            "CREATE TABLE out (id BIGINT)
             WITH ('connector' = 'rabbitmq', {BROKER}, 'exchange' = 'no_such_exchange_x',
               'format' = 'json');
             INSERT INTO out SELECT id FROM (VALUES (1)) AS v(id);"
        ),
        1,
    )
    .unwrap_err();
    assert!(err.contains("no_such_exchange_x"), "{err}");
    // amq.direct exists, but nothing is bound to this routing key.
    let err = run_folded(
        &format!(
            "CREATE TABLE out (id BIGINT)
             WITH ('connector' = 'rabbitmq', {BROKER}, 'exchange' = 'amq.direct',
               'routing-key' = 'nobody_binds_this_key', 'format' = 'json');
             INSERT INTO out SELECT id FROM (VALUES (1)) AS v(id);"
        ),
        1,
    )
    .unwrap_err();
    assert!(
        err.contains("reached no queue") && err.contains("nobody_binds_this_key"),
        "{err}"
    );
    let queue = Queue::create("rmq_bad", false);
    let script = |extra: &str| {
        format!(
            "CREATE TABLE t (id BIGINT)
             WITH ('connector' = 'rabbitmq', {BROKER}, 'queue' = '{}',
               'format' = 'json', 'scan.bounded.mode' = 'latest'{extra});
             SELECT id FROM t;",
            queue.name
        )
    };
    queue.publish(&[
        r#"{"id":1}"#.into(),
        "not json".into(),
        r#"{"id":3}"#.into(),
    ]);
    let err = run_folded(&script(""), 1).unwrap_err();
    assert!(
        err.contains(&format!("queue '{}' delivery 2", queue.name)),
        "{err}"
    );
    // The failed job acknowledged nothing (no checkpoints: the broker forgot what it delivered,
    // so publish again).
    let _ = queue.drain();
    queue.publish(&[
        r#"{"id":1}"#.into(),
        "not json".into(),
        r#"{"id":3}"#.into(),
    ]);
    let got = run_folded(&script(", 'json.ignore-parse-errors' = 'true'"), 1).unwrap();
    assert_eq!(
        got,
        [(vec!["1".to_string()], 1), (vec!["3".to_string()], 1)].into()
    );
}

/// A TCP proxy on a free loopback port to the broker, so that a test can cut the connection:
/// `cut` closes every connection through it, and with `refuse` set it takes no new ones.
struct Proxy {
    port: u16,
    streams: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn start() -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let streams: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> =
            Default::default();
        let kept = streams.clone();
        let refuse: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let refusing = refuse.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let Ok(upstream) = std::net::TcpStream::connect("127.0.0.1:5672") else {
                    return;
                };
                let mut list = kept.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(upstream.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            port,
            streams,
            refuse,
        }
    }

    fn cut(&self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A connection lost while the job runs is made again: a job with checkpoints whose
/// connections are cut twice mid-way still copies every message (at-least-once: the broker
/// redelivers what was not acknowledged).
#[test]
fn a_lost_connection_is_made_again_and_no_message_is_lost() {
    const ROWS: i64 = 60_000;
    let queue = Queue::create("rmq_reconnect", false);
    let bodies: Vec<String> = (0..ROWS).map(|i| format!(r#"{{"id":{i}}}"#)).collect();
    queue.publish(&bodies);
    let proxy = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "SET 'execution.checkpointing.interval' = '100 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         CREATE TABLE t (id BIGINT)
         WITH ('connector' = 'rabbitmq', 'host' = '127.0.0.1', 'port' = '{port}',
           'queue' = '{queue}', 'format' = 'json', 'scan.bounded.mode' = 'latest',
           'scan.prefetch-count' = '2000');
         CREATE TABLE out (id BIGINT)
           WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'json');
         INSERT INTO out SELECT id FROM t;",
        ckpt = dir.path().join("checkpoints").display(),
        port = proxy.port,
        queue = queue.name,
        out = dir.path().join("out").display()
    );
    let job_dir = dir.path().to_path_buf();
    let running =
        std::thread::spawn(move || common::run_cli(&job_dir, &script, 2, Duration::from_secs(120)));
    for _ in 0..2 {
        let started = Instant::now();
        while proxy.streams.lock().unwrap().len() < 4 && started.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(400));
        proxy.cut();
        proxy.streams.lock().unwrap().clear();
    }
    let (ok, stderr) = running.join().unwrap();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("reconnected to RabbitMQ"), "{stderr}");
    let mut ids: BTreeMap<i64, i64> = BTreeMap::new();
    for (row, n) in common::committed_rows(&dir.path().join("out"), |_| {}) {
        let v: serde_json::Value = serde_json::from_str(&row).unwrap();
        *ids.entry(v["id"].as_i64().unwrap()).or_default() += n;
    }
    let missing: Vec<i64> = (0..ROWS)
        .filter(|i| !ids.contains_key(i))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "lost messages, for example {missing:?}");
    assert_eq!(ids.len(), ROWS as usize);
    assert_eq!(queue.ready(), 0, "every message acknowledged");
}

/// A connection lost for longer than `sluice.connect-timeout` fails the job promptly with the
/// client's message, naming the queue and the broker.
#[test]
fn a_connection_lost_while_running_fails_the_job_promptly() {
    let queue = Queue::create("rmq_lost", false);
    queue.publish(&[r#"{"id":1}"#.to_string()]);
    let proxy = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(
        &file,
        format!(
            "CREATE TABLE t (id BIGINT)
             WITH ('connector' = 'rabbitmq', 'host' = '127.0.0.1', 'port' = '{}',
               'queue' = '{}', 'format' = 'json', 'sluice.connect-timeout' = '2 s');
             CREATE TABLE out (id BIGINT) WITH ('connector' = 'blackhole');
             INSERT INTO out SELECT id FROM t;",
            proxy.port, queue.name
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["run", "--workers", "2"]).arg(&file);
    let running = std::thread::spawn(move || common::output_within(cmd, Duration::from_secs(60)));
    // The job is running once both workers' consumers hold the queue.
    let started = Instant::now();
    while proxy.streams.lock().unwrap().len() < 4 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let cut = Instant::now();
    proxy
        .refuse
        .store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.cut();
    let output = running.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        cut.elapsed() < Duration::from_secs(20),
        "{:?}",
        cut.elapsed()
    );
    assert!(
        stderr.contains(&queue.name) && stderr.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{stderr}"
    );
    assert!(stderr.contains("unreachable for"), "{stderr}");
    // The client's own log lines (the stream probe's refusal among them) stay out of the log.
    assert!(!stderr.contains("PRECONDITION_FAILED"), "{stderr}");
}

/// The sink's connection cut twice while a job publishes: it connects again and publishes the
/// unconfirmed messages again, so every row reaches the queue (at-least-once: some twice).
#[test]
fn the_sink_connects_again_and_loses_no_row() {
    const ROWS: i64 = 60_000;
    let queue = Queue::create("rmq_sink_reconnect", false);
    let proxy = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen',
           'rows-per-second' = '20000', 'number-of-rows' = '{ROWS}',
           'fields.id.kind' = 'sequence', 'fields.id.start' = '0',
           'fields.id.end' = '{}');
         CREATE TABLE out (id BIGINT)
           WITH ('connector' = 'rabbitmq', 'host' = '127.0.0.1', 'port' = '{}',
             'queue' = '{}', 'format' = 'json');
         INSERT INTO out SELECT id FROM src;",
        ROWS - 1,
        proxy.port,
        queue.name
    );
    let job_dir = dir.path().to_path_buf();
    let running =
        std::thread::spawn(move || common::run_cli(&job_dir, &script, 2, Duration::from_secs(120)));
    for _ in 0..2 {
        let started = Instant::now();
        while proxy.streams.lock().unwrap().len() < 4 && started.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(600));
        proxy.cut();
        proxy.streams.lock().unwrap().clear();
    }
    let (ok, stderr) = running.join().unwrap();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("reconnected to RabbitMQ"), "{stderr}");
    let mut ids = std::collections::BTreeSet::new();
    for body in queue.drain() {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        ids.insert(v["id"].as_i64().unwrap());
    }
    let missing: Vec<i64> = (0..ROWS).filter(|i| !ids.contains(i)).take(10).collect();
    assert!(missing.is_empty(), "lost rows, for example {missing:?}");
    assert_eq!(ids.len(), ROWS as usize);
}

/// The sink's broker gone for longer than `sluice.connect-timeout`: the job fails promptly,
/// naming the target and the broker.
#[test]
fn a_sink_whose_broker_stays_away_fails_the_job_promptly() {
    let queue = Queue::create("rmq_sink_lost", false);
    let proxy = Proxy::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.sql");
    std::fs::write(
        &file,
        format!(
            "CREATE TABLE src (id BIGINT) WITH ('connector' = 'datagen', 'rows-per-second' = '1000');
             CREATE TABLE out (id BIGINT)
               WITH ('connector' = 'rabbitmq', 'host' = '127.0.0.1', 'port' = '{}',
                 'queue' = '{}', 'format' = 'json', 'sluice.connect-timeout' = '2 s');
             INSERT INTO out SELECT id FROM src;",
            proxy.port, queue.name
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["run", "--workers", "2"]).arg(&file);
    let running = std::thread::spawn(move || common::output_within(cmd, Duration::from_secs(60)));
    let started = Instant::now();
    while proxy.streams.lock().unwrap().len() < 4 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let cut = Instant::now();
    proxy
        .refuse
        .store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.cut();
    let output = running.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        cut.elapsed() < Duration::from_secs(20),
        "{:?}",
        cut.elapsed()
    );
    assert!(
        stderr.contains(&format!("routing key '{}'", queue.name))
            && stderr.contains(&format!("127.0.0.1:{}", proxy.port))
            && stderr.contains("unreachable for"),
        "{stderr}"
    );
}
