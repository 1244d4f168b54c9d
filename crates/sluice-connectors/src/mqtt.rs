//! The `mqtt` connector: topics of an MQTT broker as a source and a sink, through `rumqttc`
//! (MQTT 5) on a small runtime of its own.
//!
//! **Source.** Worker 0 subscribes to the topic filters (wildcards allowed) at QoS 1 in a
//! persistent session (`client-id`, clean start off, a session expiry): the broker keeps what
//! arrives while the job is down, and redelivers what was not acknowledged. With checkpoints a
//! message is acknowledged only once a checkpoint covering its row commits (the job's end or a
//! graceful stop covers the last ones), so a crash loses nothing: at-least-once (a message whose
//! row was in an uncommitted checkpoint is read twice). Without checkpoints a message is
//! acknowledged on receipt. The session asks for a receive maximum of 65535 messages in
//! flight, so a checkpoint interval's messages can wait for their acknowledgement.
//!
//! **Sink.** Publishes to one topic at `sink.qos` 0, 1 or 2. At QoS 1 and 2 every checkpoint
//! and the end wait until the broker has acknowledged every message (at-least-once; QoS 2 makes
//! each publish arrive once, but a rerun after a crash publishes again what the last committed
//! checkpoint did not cover).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, BooleanArray, StringArray};
use arrow::record_batch::RecordBatch;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use sluice_common::{ChangeBatch, Error, Result};

use crate::message::{MessageDecoder, MessageFormat};
use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SinkWriter, SourceOffsets, SourceReader};

/// The `mqtt` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "mqtt",
    reads: true,
    writes: true,
    metadata: &["topic", "retain"],
    writable_metadata: &[],
    formats: true,
    lookup: false,
    options: &[
        OptionDef {
            key: "host",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "the MQTT broker's host",
        },
        OptionDef {
            key: "port",
            kind: Kind::Count,
            default: Some("1883"),
            side: Side::Both,
            identity: true,
            doc: "the broker's port",
        },
        OptionDef {
            key: "username",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: false,
            doc: "the user, when the broker asks for one",
        },
        OptionDef {
            key: "password",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: false,
            doc: "the user's password",
        },
        OptionDef {
            key: "topic",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "reading: topic filters, comma-separated (`+` and `#` wildcards allowed); writing: the topic to publish to",
        },
        OptionDef {
            key: "client-id",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: false,
            doc: "reading: the persistent session's client id, unique per job (default `sluice-<table>`); writing: the prefix of the writers' client ids (default `sluice-<table>-out`)",
        },
        crate::message::FORMAT_OPTION,
        crate::message::JSON_IGNORE_OPTION,
        crate::message::CSV_IGNORE_OPTION,
        crate::avro::IGNORE_OPTION,
        crate::avro::LEGACY_TIMESTAMPS_OPTION,
        OptionDef {
            key: "scan.session-expiry",
            kind: Kind::Duration,
            default: Some("1 h"),
            side: Side::Source,
            identity: false,
            doc: "how long the broker keeps the session (its subscriptions and the messages for it) while the job is down",
        },
        OptionDef {
            key: "sink.qos",
            kind: Kind::Choice(&["0", "1", "2"]),
            default: Some("1"),
            side: Side::Sink,
            identity: false,
            doc: "the quality of service of published messages: 0 (at most once), 1 and 2 (wait for the broker's acknowledgement at each checkpoint and at the end)",
        },
        OptionDef {
            key: "sink.retain",
            kind: Kind::Bool,
            default: Some("false"),
            side: Side::Sink,
            identity: false,
            doc: "publish retained messages (the broker keeps the last one for new subscribers)",
        },
        OptionDef {
            key: "sluice.connect-timeout",
            kind: Kind::Duration,
            default: Some("10 s"),
            side: Side::Both,
            identity: false,
            doc: "how long the broker may stay unreachable (at start, or while running) before the job fails",
        },
    ],
};

/// The connection settings shared by sources and sinks.
struct Broker {
    host: String,
    port: u16,
    login: Option<(String, String)>,
    timeout: Duration,
}

impl Broker {
    fn from_options(opts: &mut Options) -> Result<Broker> {
        let host = opts.required("host")?;
        let port: u16 = opts.value("port")?;
        let login = match (opts.get("username")?, opts.get("password")?) {
            (Some(u), p) => Some((u, p.unwrap_or_default())),
            (None, Some(_)) => return Err(opts.error("option 'password' needs 'username'")),
            (None, None) => None,
        };
        let timeout = opts
            .duration_ms("sluice.connect-timeout")?
            .expect("declared default");
        Ok(Broker {
            host,
            port,
            login,
            timeout: Duration::from_millis(timeout.max(1) as u64),
        })
    }

    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn options(&self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(15));
        o.set_connection_timeout(self.timeout.as_secs().max(1));
        if let Some((u, p)) = &self.login {
            o.set_credentials(u, p);
        }
        o
    }

    /// Polls `events` until the broker accepts the connection, within the timeout; returns
    /// whether the broker still had the session.
    fn connect(
        &self,
        rt: &tokio::runtime::Runtime,
        events: &mut EventLoop,
        opts: &Options,
    ) -> Result<bool> {
        let address = self.address();
        let connecting = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        return Ok(ack.session_present);
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        match rt.block_on(async { tokio::time::timeout(self.timeout, connecting).await }) {
            Ok(Ok(present)) => Ok(present),
            Ok(Err(e)) => Err(opts.error(format!(
                "cannot reach the MQTT broker at '{address}' (options 'host', 'port'): {e}"
            ))),
            Err(_) => Err(opts.error(format!(
                "cannot reach the MQTT broker at '{address}' (options 'host', 'port') within {:?} (option 'sluice.connect-timeout')",
                self.timeout
            ))),
        }
    }
}

/// Drives a client's event loop after it connected: hands received messages over (a source),
/// counts acknowledgements of published ones (a sink), and reconnects after a lost connection
/// until the broker has been unreachable for `timeout`.
fn drive(
    rt: &tokio::runtime::Runtime,
    mut events: EventLoop,
    timeout: Duration,
    tx: Option<tokio::sync::mpsc::Sender<Fetched>>,
    acked: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
) {
    rt.spawn(async move {
        let mut down_since: Option<Instant> = None;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    down_since = None;
                    if let Some(tx) = &tx {
                        if tx.send(Fetched::Message(p)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => down_since = None,
                Err(e) => {
                    let since = *down_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= timeout {
                        let message = format!(
                            "lost the connection for {:?} (option 'sluice.connect-timeout'): {e}",
                            since.elapsed()
                        );
                        *failed.lock().expect("not poisoned") = Some(message.clone());
                        if let Some(tx) = &tx {
                            let _ = tx.send(Fetched::Failed(message)).await;
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
}

enum Fetched {
    Message(Publish),
    Failed(String),
}

/// Worker 0's subscriber (the other workers read nothing).
pub struct MqttSource {
    table: String,
    address: String,
    rt: tokio::runtime::Runtime,
    client: Option<AsyncClient>,
    rx: Option<tokio::sync::mpsc::Receiver<Fetched>>,
    checkpointing: bool,
    /// Messages returned and not yet acknowledged, and how many of them each recorded
    /// checkpoint covers.
    unacked: std::collections::VecDeque<Publish>,
    recorded: std::collections::VecDeque<(u64, usize)>,
    /// Messages acknowledged from the front of `unacked` since the checkpoints were recorded.
    acked_front: usize,
    decoder: MessageDecoder,
    workers: usize,
}

impl MqttSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let broker = Broker::from_options(opts)?;
        let topics: Vec<String> = opts
            .required("topic")?
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        let client_id = opts
            .get("client-id")?
            .unwrap_or_else(|| format!("sluice-{}", spec.table));
        let expiry = opts
            .duration_ms("scan.session-expiry")?
            .expect("declared default");
        let format = MessageFormat::from_options(opts, spec)?;
        let decoder = MessageDecoder::open(spec, opts, &format)?;
        let rt = crate::message::client_runtime(&spec.table, "mqtt")?;
        let mut source = MqttSource {
            table: spec.table.clone(),
            address: broker.address(),
            rt,
            client: None,
            rx: None,
            checkpointing: false,
            unacked: Default::default(),
            recorded: Default::default(),
            acked_front: 0,
            decoder,
            workers,
        };
        if worker != 0 {
            return Ok(source);
        }
        let mut options = broker.options(&client_id);
        options.set_clean_start(false);
        options.set_session_expiry_interval(Some((expiry / 1000).clamp(1, u32::MAX as i64) as u32));
        options.set_receive_maximum(Some(u16::MAX));
        options.set_manual_acks(true);
        let (client, mut events) = AsyncClient::new(options, 65_536);
        broker.connect(&source.rt, &mut events, opts)?;
        // Subscribing again is harmless when the broker kept the session.
        for topic in &topics {
            source
                .rt
                .block_on(client.subscribe(topic.clone(), QoS::AtLeastOnce))
                .map_err(|e| {
                    opts.error(format!("subscribing to '{topic}' (option 'topic'): {e}"))
                })?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(65_536);
        drive(
            &source.rt,
            events,
            broker.timeout,
            Some(tx),
            Default::default(),
            Default::default(),
        );
        source.client = Some(client);
        source.rx = Some(rx);
        Ok(source)
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    /// Acknowledges the first `n` unacknowledged messages returned.
    fn ack_front(&mut self, n: usize) -> Result<()> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        let acks: Vec<Publish> = self.unacked.drain(..n.min(self.unacked.len())).collect();
        self.rt
            .block_on(async {
                for p in &acks {
                    client.ack(p).await?;
                }
                Ok::<_, rumqttc::v5::ClientError>(())
            })
            .map_err(|e| {
                self.error(format!(
                    "acknowledging messages to the MQTT broker at '{}': {e}",
                    self.address
                ))
            })?;
        self.acked_front += acks.len();
        Ok(())
    }

    fn decode(&mut self, messages: &[Publish]) -> Result<Option<RecordBatch>> {
        let topic = |m: &Publish| String::from_utf8_lossy(&m.topic).into_owned();
        let location = |i: usize| format!("a message on topic '{}'", topic(&messages[i]));
        self.decoder.rows(
            messages,
            |m| &m.payload,
            &location,
            |key, kept| -> ArrayRef {
                match key {
                    "topic" => {
                        Arc::new(StringArray::from_iter_values(kept.iter().map(|m| topic(m))))
                    }
                    _ => Arc::new(BooleanArray::from_iter(kept.iter().map(|m| Some(m.retain)))),
                }
            },
        )
    }
}

impl SourceReader for MqttSource {
    fn open_splits(&self) -> Vec<usize> {
        if self.client.is_some() {
            vec![0]
        } else {
            vec![]
        }
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        let Some(rx) = self.rx.as_mut() else {
            return Ok(Poll::Finished);
        };
        let mut messages = vec![];
        let mut failed = None;
        while messages.len() < max_rows {
            match rx.try_recv() {
                Ok(Fetched::Message(p)) => messages.push(p),
                Ok(Fetched::Failed(e)) => {
                    failed = Some(e);
                    break;
                }
                Err(_) => break,
            }
        }
        if let Some(e) = failed {
            return Err(self.error(format!("the MQTT broker at '{}': {e}", self.address)));
        }
        if messages.is_empty() {
            return Ok(Poll::Idle);
        }
        let batch = self.decode(&messages)?;
        // QoS 0 messages (published so) need no acknowledgement.
        self.unacked
            .extend(messages.into_iter().filter(|m| m.qos != QoS::AtMostOnce));
        if !self.checkpointing {
            self.ack_front(self.unacked.len())?;
        }
        match batch {
            Some(batch) => Ok(Poll::Batch { split: 0, batch }),
            None => Ok(Poll::Idle),
        }
    }

    fn skipped(&self) -> u64 {
        self.decoder.skipped()
    }

    /// A topic has no positions to resume from: the broker's session keeps what was not
    /// acknowledged.
    fn offsets(&self) -> SourceOffsets {
        SourceOffsets::new()
    }

    fn seek(&mut self, _offsets: &SourceOffsets) -> Result<()> {
        Ok(())
    }

    fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    fn checkpoint(&mut self, epoch: u64) {
        // Counted from the front as it is now.
        let covered = self.acked_front + self.unacked.len();
        self.recorded.push_back((epoch, covered));
    }

    fn committed(&mut self, epoch: u64) -> Result<()> {
        let mut through = None;
        while let Some(&(e, n)) = self.recorded.front() {
            if e > epoch {
                break;
            }
            through = Some(n);
            self.recorded.pop_front();
        }
        match through {
            Some(n) if n > self.acked_front => self.ack_front(n - self.acked_front),
            _ => Ok(()),
        }
    }

    fn job_finished(&mut self) -> Result<()> {
        self.recorded.clear();
        self.ack_front(self.unacked.len())
    }

    /// Worker 0 reads: the others never hold watermarks back.
    fn silent_workers(&self) -> Vec<usize> {
        (1..self.workers).collect()
    }
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        // Acknowledgements sent so far reach the broker before the connection goes.
        if let Some(client) = self.client.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await
            });
        }
    }
}

/// A worker's publisher.
pub struct MqttSink {
    table: String,
    address: String,
    topic: String,
    qos: QoS,
    retain: bool,
    rt: tokio::runtime::Runtime,
    client: AsyncClient,
    format: MessageFormat,
    published: u64,
    acked: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
    timeout: Duration,
}

impl MqttSink {
    pub fn open(spec: &ConnectorSpec, opts: &mut Options, worker: usize) -> Result<Self> {
        let broker = Broker::from_options(opts)?;
        let topic = opts.required("topic")?;
        if topic.contains(['+', '#']) {
            return Err(opts.error(format!(
                "option 'topic' = '{topic}': a sink publishes to one topic (no wildcards)"
            )));
        }
        let format = MessageFormat::from_options(opts, spec)?;
        if matches!(format, MessageFormat::Raw) && spec.schema.fields().len() != 1 {
            return Err(opts.error("format 'raw' writes a table of one column"));
        }
        let qos = match opts.value::<String>("sink.qos")?.as_str() {
            "0" => QoS::AtMostOnce,
            "2" => QoS::ExactlyOnce,
            _ => QoS::AtLeastOnce,
        };
        let retain = opts.flag("sink.retain")?;
        let prefix = opts
            .get("client-id")?
            .unwrap_or_else(|| format!("sluice-{}-out", spec.table));
        let rt = crate::message::client_runtime(&spec.table, "mqtt")?;
        let mut options = broker.options(&format!("{prefix}-{}-{worker}", spec.sink_instance));
        options.set_clean_start(true);
        let (client, mut events) = AsyncClient::new(options, 65_536);
        broker.connect(&rt, &mut events, opts)?;
        let acked = Arc::new(AtomicU64::new(0));
        let failed: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        drive(
            &rt,
            events,
            broker.timeout,
            None,
            acked.clone(),
            failed.clone(),
        );
        Ok(MqttSink {
            table: spec.table.clone(),
            address: broker.address(),
            topic,
            qos,
            retain,
            rt,
            client,
            format,
            published: 0,
            acked,
            failed,
            timeout: broker.timeout,
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    fn check_failed(&self) -> Result<()> {
        match self.failed.lock().expect("not poisoned").clone() {
            Some(e) => Err(self.error(format!("the MQTT broker at '{}': {e}", self.address))),
            None => Ok(()),
        }
    }

    /// Waits until the broker acknowledged every message published (QoS 1 and 2).
    fn wait_acks(&mut self) -> Result<()> {
        if self.qos == QoS::AtMostOnce {
            return self.check_failed();
        }
        let mut last_progress = (self.acked.load(Ordering::SeqCst), Instant::now());
        while self.acked.load(Ordering::SeqCst) < self.published {
            self.check_failed()?;
            let now = self.acked.load(Ordering::SeqCst);
            if now != last_progress.0 {
                last_progress = (now, Instant::now());
            } else if last_progress.1.elapsed() >= self.timeout + Duration::from_secs(5) {
                return Err(self.error(format!(
                    "the MQTT broker at '{}' acknowledged {now} of {} messages to '{}' and no more for {:?}",
                    self.address,
                    self.published,
                    self.topic,
                    last_progress.1.elapsed()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl SinkWriter for MqttSink {
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.check_failed()?;
        let messages = self.format.encode(&self.table, "mqtt", batch)?;
        let n = messages.len() as u64;
        let (client, topic, qos, retain) = (&self.client, &self.topic, self.qos, self.retain);
        self.rt
            .block_on(async {
                for m in messages {
                    client.publish(topic.clone(), qos, retain, m).await?;
                }
                Ok::<_, rumqttc::v5::ClientError>(())
            })
            .map_err(|e| {
                self.error(format!(
                    "publishing to '{}' on the MQTT broker at '{}': {e}",
                    self.topic, self.address
                ))
            })?;
        self.published += n;
        Ok(())
    }

    fn pre_commit(&mut self, _epoch: u64) -> Result<()> {
        self.wait_acks()
    }

    fn finish(&mut self) -> Result<()> {
        self.wait_acks()?;
        let _ = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await
        });
        Ok(())
    }

    fn abort(&mut self) -> Result<()> {
        Ok(())
    }
}
