//! The mqtt connector against Mosquitto: the broker on 127.0.0.1:1883, and for the tests that
//! hold many messages for a session, a broker of the test's own on a free port (Mosquitto keeps
//! at most 1000 queued messages per client by default, dropping the rest: that broker keeps
//! them all). Topics and client ids are named after the test and the process.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use crate::common;

/// A Mosquitto broker of this test on a free port, without a queue limit; killed on drop.
struct Broker {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Broker {
        let port = common::free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\n"
            ),
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{test}_{}_{nanos}", std::process::id())
}

/// Publishes `(topic, body)` messages at QoS 1 to the broker on `port` and waits for every
/// acknowledgement.
fn publish(port: u16, messages: &[(String, String)]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, mut events) =
            AsyncClient::new(MqttOptions::new(unique("pub"), "127.0.0.1", port), 10_000);
        let acked = Arc::new(AtomicU64::new(0));
        let counting = acked.clone();
        let driver = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counting.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("publishing: {e}"),
                }
            }
        });
        for (topic, body) in messages {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, body.clone())
                .await
                .unwrap();
        }
        let started = Instant::now();
        while acked.load(Ordering::SeqCst) < messages.len() as u64 {
            assert!(started.elapsed() < Duration::from_secs(60), "publishing");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = client.disconnect().await;
        driver.abort();
    });
}

/// How many messages the broker on `port` delivers within a second to a session `client_id`
/// resumes (its subscriptions are kept), without acknowledging them.
fn pending_for_session(port: u16, client_id: &str) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        o.set_manual_acks(true);
        let (_client, mut events) = AsyncClient::new(o, 100);
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(event) = tokio::time::timeout_at(deadline, events.poll()).await {
            if let Event::Incoming(Packet::Publish(_)) = event.unwrap() {
                n += 1;
            }
        }
        n
    })
}

/// The job of these tests: every message of the topics under `prefix` into files (exactly-once,
/// with checkpoints), with its topic.
fn copy_script(dir: &Path, port: u16, prefix: &str, client_id: &str) -> String {
    format!(
        "SET 'execution.checkpointing.interval' = '100 ms';
         SET 'execution.checkpointing.dir' = '{ckpt}';
         CREATE TABLE orders (id BIGINT, category STRING, topic STRING METADATA FROM 'topic')
         WITH ('connector' = 'mqtt', 'host' = '127.0.0.1', 'port' = '{port}',
           'topic' = '{prefix}/+', 'client-id' = '{client_id}', 'format' = 'json');
         CREATE TABLE copy (id BIGINT, category STRING, topic STRING)
           WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'json');
         INSERT INTO copy SELECT id, category, topic FROM orders;",
        ckpt = dir.join("checkpoints").display(),
        out = dir.join("out").display()
    )
}

/// Starts `sluice run` on the job of `dir`, its log in `dir/job.log`.
fn spawn_job(dir: &Path, workers: usize) -> Child {
    let log = std::fs::File::create(dir.join("job.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--workers", &workers.to_string()])
        .arg(dir.join("job.sql"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits for a checkpoint of the running job (its source subscribed by then).
fn wait_for_checkpoint(dir: &Path, child: &mut Child) {
    let before = common::manifests(&dir.join("checkpoints"));
    let started = Instant::now();
    while common::manifests(&dir.join("checkpoints")) == before {
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The ids (with multiplicities) and topics the job's files hold.
fn copied(dir: &Path) -> (BTreeMap<i64, i64>, BTreeMap<String, i64>) {
    let (mut ids, mut topics) = (BTreeMap::new(), BTreeMap::new());
    if !dir.join("out").exists() {
        return (ids, topics);
    }
    for (row, n) in common::committed_rows_so_far(&dir.join("out")) {
        let v: serde_json::Value = serde_json::from_str(&row).unwrap();
        *ids.entry(v["id"].as_i64().unwrap()).or_default() += n;
        *topics
            .entry(v["topic"].as_str().unwrap().to_string())
            .or_default() += n;
    }
    (ids, topics)
}

/// Stops the job with SIGTERM once its files hold every id below `rows` (or a minute passed),
/// and waits for it to end.
fn stop_when_complete(dir: &Path, mut child: Child, rows: i64) {
    let started = Instant::now();
    while copied(dir).0.len() < rows as usize && started.elapsed() < Duration::from_secs(60) {
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let signalled = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let output = {
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the job did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let log = std::fs::read_to_string(dir.join("job.log")).unwrap();
    // 128 + SIGTERM: stopped before its input ended (a topic has no end).
    assert_eq!(output.code(), Some(143), "{log}");
    assert!(log.contains("final checkpoint"), "{log}");
}

fn orders(rows: std::ops::Range<i64>, prefix: &str) -> Vec<(String, String)> {
    rows.map(|i| {
        (
            format!("{prefix}/{}", ["eu", "us"][(i % 2) as usize]),
            format!(r#"{{"id":{i},"category":"c{}"}}"#, i % 7),
        )
    })
    .collect()
}

/// A running job receives what is published to the topics its filter matches (the topic
/// metadata says which), and a graceful stop acknowledges everything: each message once in the
/// files, and nothing left for the session.
#[test]
fn a_running_job_copies_every_message_and_a_stop_acknowledges_them() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("mqtt_copy");
    let client_id = unique("mqtt_copy_job");
    std::fs::write(
        dir.path().join("job.sql"),
        copy_script(dir.path(), broker.port, &prefix, &client_id),
    )
    .unwrap();
    let mut child = spawn_job(dir.path(), 2);
    wait_for_checkpoint(dir.path(), &mut child);
    const ROWS: i64 = 20_000;
    publish(broker.port, &orders(0..ROWS, &prefix));
    // Not matched by the filter.
    publish(
        broker.port,
        &[(format!("{prefix}x/eu"), r#"{"id":-1}"#.to_string())],
    );
    stop_when_complete(dir.path(), child, ROWS);
    let (ids, topics) = copied(dir.path());
    let once: BTreeMap<i64, i64> = (0..ROWS).map(|i| (i, 1)).collect();
    assert!(ids == once, "each message once: {} ids", ids.len());
    assert_eq!(
        topics,
        [
            (format!("{prefix}/eu"), ROWS / 2),
            (format!("{prefix}/us"), ROWS / 2)
        ]
        .into()
    );
    assert_eq!(pending_for_session(broker.port, &client_id), 0);
}

/// The kill test: messages are published while the job is killed with SIGKILL at random moments
/// and rerun (on another worker count); the broker keeps the session's messages, unacknowledged
/// ones come again, and at the end every message is in the files (none lost; some twice).
#[test]
fn killed_and_rerun_no_message_is_lost() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("mqtt_kill");
    let client_id = unique("mqtt_kill_job");
    std::fs::write(
        dir.path().join("job.sql"),
        copy_script(dir.path(), broker.port, &prefix, &client_id),
    )
    .unwrap();
    const ROWS: i64 = 60_000;
    let mut child = spawn_job(dir.path(), 3);
    wait_for_checkpoint(dir.path(), &mut child);
    let port = broker.port;
    let publishing = {
        let prefix = prefix.clone();
        std::thread::spawn(move || {
            for chunk in 0..30 {
                publish(port, &orders(chunk * 2000..(chunk + 1) * 2000, &prefix));
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    for _ in 0..3 {
        wait_for_checkpoint(dir.path(), &mut child);
        std::thread::sleep(Duration::from_millis(rng.random_range(50..800)));
        child.kill().unwrap();
        child.wait().unwrap();
        child = spawn_job(dir.path(), 2);
    }
    publishing.join().unwrap();
    stop_when_complete(dir.path(), child, ROWS);
    let (ids, _) = copied(dir.path());
    let missing: Vec<i64> = (0..ROWS)
        .filter(|i| !ids.contains_key(i))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "lost messages, for example {missing:?}");
    assert_eq!(ids.len(), ROWS as usize, "ids that were never sent");
    assert_eq!(pending_for_session(broker.port, &client_id), 0);
}

/// The sink publishes at QoS 1 and 2 to the broker on 127.0.0.1:1883: a job reading those
/// topics gets every row (and an updating aggregation, as Debezium JSON, folds to the batch
/// answer); a wildcard sink topic and an unreachable broker are named.
#[test]
fn the_sink_publishes_and_errors_are_named() {
    let prefix = unique("mqtt_sink");
    let client_id = unique("mqtt_sink_job");
    // The reading job's session first (it subscribes), then the writing jobs.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("job.sql"),
        format!(
            "SET 'execution.checkpointing.interval' = '100 ms';
             SET 'execution.checkpointing.dir' = '{ckpt}';
             CREATE TABLE totals (k STRING, total BIGINT)
             WITH ('connector' = 'mqtt', 'host' = '127.0.0.1', 'topic' = '{prefix}/totals',
               'client-id' = '{client_id}', 'format' = 'debezium-json');
             CREATE TABLE folded (k STRING, total BIGINT)
               WITH ('connector' = 'filesystem', 'path' = '{out}', 'format' = 'debezium-json');
             INSERT INTO folded SELECT k, total FROM totals;",
            ckpt = dir.path().join("checkpoints").display(),
            out = dir.path().join("out").display()
        ),
    )
    .unwrap();
    let mut child = spawn_job(dir.path(), 1);
    wait_for_checkpoint(dir.path(), &mut child);
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    let values: Vec<String> = (0..500i64)
        .map(|i| {
            *totals.entry(format!("k{}", i % 9)).or_default() += i;
            format!("({i}, 'k{}')", i % 9)
        })
        .collect();
    for qos in ["1", "2"] {
        let script = format!(
            "CREATE TABLE totals (k STRING, total BIGINT)
               WITH ('connector' = 'mqtt', 'host' = '127.0.0.1', 'topic' = '{prefix}/totals',
                 'format' = 'debezium-json', 'sink.qos' = '{qos}');
             INSERT INTO totals SELECT k, SUM(id) FROM (VALUES {}) AS v(id, k) GROUP BY k;",
            values.join(", ")
        );
        common::run_folded(
            sluice_sql::plan_script(&script).unwrap(),
            2,
            Duration::from_secs(60),
        )
        .unwrap();
    }
    // Two writes of the same totals: each key's rows twice (a Debezium insert per run).
    let want: BTreeMap<String, i64> = totals
        .iter()
        .map(|(k, t)| (serde_json::json!({"k": k, "total": t}).to_string(), 2))
        .collect();
    let started = Instant::now();
    while common::committed_rows_so_far(&dir.path().join("out")) != want
        && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(common::committed_rows_so_far(&dir.path().join("out")), want);

    let run = |script: &str| {
        common::run_folded(
            sluice_sql::plan_script(script).map_err(|e| e.to_string())?,
            1,
            Duration::from_secs(60),
        )
        .map(|_| ())
    };
    let err = run(&format!(
        "CREATE TABLE t (id BIGINT) WITH ('connector' = 'mqtt', 'host' = '127.0.0.1',
           'topic' = '{prefix}/#', 'format' = 'json');
         INSERT INTO t SELECT id FROM (VALUES (1)) AS v(id);"
    ))
    .unwrap_err();
    assert!(err.contains("no wildcards"), "{err}");
    let port = common::free_port();
    let started = Instant::now();
    let err = run(&format!(
        "CREATE TABLE t (id BIGINT) WITH ('connector' = 'mqtt', 'host' = '127.0.0.1',
           'port' = '{port}', 'topic' = 'x', 'format' = 'json', 'sluice.connect-timeout' = '2 s');
         SELECT id FROM t;"
    ))
    .unwrap_err();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// A broker lost while the job runs: the client retries for `sluice.connect-timeout`, then the
/// job fails naming the broker, promptly and without hanging.
#[test]
fn a_broker_lost_while_running_fails_the_job_promptly() {
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("mqtt_lost");
    std::fs::write(
        dir.path().join("job.sql"),
        copy_script(dir.path(), broker.port, &prefix, &unique("mqtt_lost_job")).replace(
            "'format' = 'json');\n         CREATE TABLE copy",
            "'format' = 'json', 'sluice.connect-timeout' = '2 s');\n         CREATE TABLE copy",
        ),
    )
    .unwrap();
    assert!(std::fs::read_to_string(dir.path().join("job.sql"))
        .unwrap()
        .contains("'2 s'"));
    let mut child = spawn_job(dir.path(), 1);
    wait_for_checkpoint(dir.path(), &mut child);
    publish(broker.port, &orders(0..100, &prefix));
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    let lost = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            lost.elapsed() < Duration::from_secs(30),
            "the job did not fail"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(dir.path().join("job.log")).unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!("127.0.0.1:{}", broker.port)) && log.contains("lost the connection"),
        "{log}"
    );
}
