//! The `rabbitmq` connector: a RabbitMQ queue as a source, and an exchange (or a queue, through
//! the default exchange) as a sink, through `lapin` on a small runtime of its own.
//!
//! **Source, classic or quorum queue.** Every worker consumes the queue (the broker deals the
//! messages among them). With checkpoints, a message is acknowledged only once a checkpoint that
//! covers its row commits (the job's recorded end covers the last ones): a crash leaves the rest
//! unacknowledged, the broker redelivers them to the rerun, and nothing is lost (at-least-once:
//! a message whose row was in an uncommitted checkpoint is read twice). Without checkpoints the
//! broker forgets a message once delivered. `scan.prefetch-count` bounds the messages in flight
//! per worker, so it must cover what a worker reads between a checkpoint and its commit.
//!
//! **Source, stream queue** (`x-queue-type = stream`). A stream is one ordered log: one split,
//! read by worker 0 from the offset in Sluice's checkpoints (`x-stream-offset`), so a restore
//! replays exactly what was not covered: exactly-once into state and transactional sinks.
//!
//! A lost connection is made again within `sluice.connect-timeout` (the broker redelivers what
//! was not acknowledged; a stream resumes at its next offset); after that the job fails.
//!
//! **Sink.** Publisher confirms: `at-least-once` waits for the broker to confirm every message
//! at each checkpoint and at the end (messages are persistent and mandatory: one that no queue
//! takes fails the job). A rerun after a crash publishes again what the last committed
//! checkpoint did not cover.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, BooleanArray, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::record_batch::RecordBatch;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lapin::{Confirmation, PublisherConfirm};
use sluice_common::{ChangeBatch, Error, Result};

use crate::message::{MessageDecoder, MessageFormat};
use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SinkWriter, SourceOffsets, SourceReader, SPLIT_DONE};

/// The `rabbitmq` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "rabbitmq",
    reads: true,
    writes: true,
    metadata: &["exchange", "routing-key", "redelivered", "offset", "timestamp", "message-id"],
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
            doc: "the RabbitMQ broker's host",
        },
        OptionDef {
            key: "port",
            kind: Kind::Count,
            default: Some("5672"),
            side: Side::Both,
            identity: true,
            doc: "the broker's AMQP port",
        },
        OptionDef {
            key: "virtual-host",
            kind: Kind::Text,
            default: Some("/"),
            side: Side::Both,
            identity: true,
            doc: "the virtual host",
        },
        OptionDef {
            key: "username",
            kind: Kind::Text,
            default: Some("guest"),
            side: Side::Both,
            identity: false,
            doc: "the user",
        },
        OptionDef {
            key: "password",
            kind: Kind::Text,
            default: Some("guest"),
            side: Side::Both,
            identity: false,
            doc: "the user's password",
        },
        OptionDef {
            key: "queue",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "reading: the queue to consume (classic, quorum or stream); writing without 'exchange': the queue to publish to (through the default exchange)",
        },
        OptionDef {
            key: "exchange",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: true,
            doc: "the exchange to publish to (it must exist)",
        },
        OptionDef {
            key: "routing-key",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
            doc: "the routing key of every message (default: 'queue')",
        },
        crate::message::FORMAT_OPTION,
        crate::message::JSON_IGNORE_OPTION,
        crate::message::CSV_IGNORE_OPTION,
        crate::avro::IGNORE_OPTION,
        crate::avro::LEGACY_TIMESTAMPS_OPTION,
        OptionDef {
            key: "scan.prefetch-count",
            kind: Kind::Count,
            default: Some("20000"),
            side: Side::Source,
            identity: false,
            doc: "messages the broker sends a worker ahead of their acknowledgement (at most 65535); with checkpoints, a worker reads at most this many per checkpoint interval",
        },
        OptionDef {
            key: "scan.startup.mode",
            kind: Kind::Choice(&["earliest", "latest", "offset", "timestamp"]),
            default: Some("earliest"),
            side: Side::Source,
            identity: false,
            doc: "stream queues: where a job without a checkpoint starts: the first message kept, only new ones, an offset, or the first chunk at or after a time",
        },
        OptionDef {
            key: "scan.startup.offset",
            kind: Kind::Count,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "`offset` mode: the first stream offset to read",
        },
        OptionDef {
            key: "scan.startup.timestamp-millis",
            kind: Kind::Count,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "`timestamp` mode: epoch milliseconds",
        },
        OptionDef {
            key: "scan.bounded.mode",
            kind: Kind::Choice(&["unbounded", "latest"]),
            default: Some("unbounded"),
            side: Side::Source,
            identity: false,
            doc: "where the source ends: never, or once it has read what the queue held when the job started (a classic queue: when it has no message ready; a stream: at its last offset then)",
        },
        OptionDef {
            key: "sluice.connect-timeout",
            kind: Kind::Duration,
            default: Some("10 s"),
            side: Side::Both,
            identity: false,
            doc: "how long connecting may take before the job fails",
        },
        OptionDef {
            key: "sink.delivery-guarantee",
            kind: Kind::Choice(&["none", "at-least-once"]),
            default: Some("at-least-once"),
            side: Side::Sink,
            identity: false,
            doc: "`at-least-once` waits for the broker's confirmation of every message at each checkpoint and at the end; `none` does not wait",
        },
    ],
};

/// Where the broker is, for connecting and for messages.
struct Broker {
    uri: String,
    /// `host:port` (never the credentials), for messages.
    address: String,
    timeout: Duration,
}

impl Broker {
    fn from_options(opts: &mut Options) -> Result<Broker> {
        let host = opts.required("host")?;
        let port: u16 = opts.value("port")?;
        let vhost: String = opts.value("virtual-host")?;
        let user: String = opts.value("username")?;
        let password: String = opts.value("password")?;
        let timeout = opts
            .duration_ms("sluice.connect-timeout")?
            .expect("declared default");
        let escape = |s: &str| -> String {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        Ok(Broker {
            uri: format!(
                "amqp://{}:{}@{host}:{port}/{}",
                escape(&user),
                escape(&password),
                escape(&vhost)
            ),
            address: format!("{host}:{port}"),
            timeout: Duration::from_millis(timeout.max(1) as u64),
        })
    }

    /// Connects within the timeout, or fails naming the broker.
    fn connect(&self, rt: &tokio::runtime::Runtime, opts: &Options) -> Result<Connection> {
        let connecting = Connection::connect(&self.uri, ConnectionProperties::default());
        match rt.block_on(async { tokio::time::timeout(self.timeout, connecting).await }) {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(opts.error(format!(
                "cannot reach RabbitMQ at '{}' (options 'host', 'port'): {e}",
                self.address
            ))),
            Err(_) => Err(opts.error(format!(
                "cannot reach RabbitMQ at '{}' (options 'host', 'port') within {:?} (option 'sluice.connect-timeout')",
                self.address, self.timeout
            ))),
        }
    }
}

/// A message as the reading task hands it over.
struct Received {
    tag: u64,
    exchange: String,
    routing_key: String,
    redelivered: bool,
    /// Stream queues: the message's offset.
    offset: Option<i64>,
    /// The `timestamp` property, in milliseconds.
    timestamp: Option<i64>,
    message_id: Option<String>,
    body: Vec<u8>,
}

enum Fetched {
    Message(Received),
    /// The consumer ended: cancelled by the reader (a bounded queue's end) or by the broker.
    Ended,
    Failed(String),
}

/// The tag of a reader's one consumer on its channel.
const CONSUMER_TAG: &str = "sluice";

/// The stream offset a delivery of a stream queue carries.
fn stream_offset(properties: &BasicProperties) -> Option<i64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(*n as i64),
        AMQPValue::LongUInt(n) => Some(*n as i64),
        _ => None,
    }
}

/// Consumes `queue` on `channel` into a channel of messages.
fn spawn_consumer(
    rt: &tokio::runtime::Runtime,
    channel: Channel,
    queue: String,
    no_ack: bool,
    arguments: FieldTable,
) -> tokio::sync::mpsc::Receiver<Fetched> {
    let (tx, rx) = tokio::sync::mpsc::channel(65_536);
    rt.spawn(async move {
        let read = async {
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    CONSUMER_TAG.into(),
                    BasicConsumeOptions {
                        no_ack,
                        ..Default::default()
                    },
                    arguments,
                )
                .await
                .map_err(|e| e.to_string())?;
            while let Some(delivery) = consumer.next().await {
                let d = delivery.map_err(|e| e.to_string())?;
                let received = Received {
                    tag: d.delivery_tag,
                    exchange: d.exchange.to_string(),
                    routing_key: d.routing_key.to_string(),
                    redelivered: d.redelivered,
                    offset: stream_offset(&d.properties),
                    timestamp: (*d.properties.timestamp()).map(|s| s as i64 * 1000),
                    message_id: d.properties.message_id().as_ref().map(|m| m.to_string()),
                    body: d.data,
                };
                if tx.send(Fetched::Message(received)).await.is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        let end = match read.await {
            Ok(()) => Fetched::Ended,
            Err(e) => Fetched::Failed(e),
        };
        let _ = tx.send(end).await;
    });
    rx
}

/// Whether `queue` is a stream queue: only a stream takes a consumer's `x-stream-offset`
/// (another queue type refuses it, closing the channel it was asked on).
fn is_stream(rt: &tokio::runtime::Runtime, connection: &Connection, queue: &str) -> Result<bool> {
    rt.block_on(async {
        let channel = connection.create_channel().await?;
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("next".into()),
        );
        let probe = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await;
        let stream = probe.is_ok();
        if channel.status().connected() {
            let _ = channel.close(200, "OK".into()).await;
        }
        Ok::<_, lapin::Error>(stream)
    })
    .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))
}

/// The last offset of a stream now: the last message of its last chunk (a consumer from `last`
/// starts at that chunk, and gets it at once), or `None` for an empty stream, which sends
/// nothing: AMQP has no way to ask, so a stream that sends nothing within `patience` is empty.
fn stream_last_offset(
    rt: &tokio::runtime::Runtime,
    connection: &Connection,
    queue: &str,
    patience: Duration,
) -> Result<Option<i64>> {
    rt.block_on(async {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(u16::MAX, BasicQosOptions::default())
            .await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("last".into()),
        );
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                arguments,
            )
            .await?;
        let mut last = None;
        let mut wait = patience;
        while let Ok(Some(d)) = tokio::time::timeout(wait, consumer.next()).await {
            let d = d?;
            last = last.max(stream_offset(&d.properties));
            channel
                .basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
            wait = Duration::from_millis(500);
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok::<_, lapin::Error>(last)
    })
    .map_err(|e| Error::Runtime(format!("RabbitMQ: {e}")))
}

/// A worker's consumer of a queue.
pub struct RabbitSource {
    table: String,
    queue: String,
    address: String,
    uri: String,
    rt: tokio::runtime::Runtime,
    connection: Connection,
    channel: Option<Channel>,
    /// The connection failed (when, and why): reconnecting until `timeout` has passed.
    lost: Option<(Instant, String)>,
    last_attempt: Instant,
    prefetch: u16,
    /// Stream queues: read by worker 0 only; the next offset to read (from a checkpoint or the
    /// rows returned), the startup position, and the bound.
    stream: bool,
    next_offset: Option<i64>,
    startup: AMQPValue,
    /// A bounded stream's last offset, once known (`Some(None)`: it was empty).
    stream_end: Option<Option<i64>>,
    bounded: bool,
    timeout: Duration,
    /// Classic queues: ends once the queue has no message ready (its consumer is cancelled
    /// then, and what the broker had sent it still comes).
    until_empty: bool,
    cancelled: bool,
    last_arrival: Instant,
    last_probe: Instant,
    reads: bool,
    checkpointing: bool,
    rx: Option<tokio::sync::mpsc::Receiver<Fetched>>,
    /// The delivery tag of the last message returned, and of the last one acknowledged.
    returned_tag: u64,
    acked_tag: u64,
    /// Checkpoints recorded and the last tag each covers (classic queues).
    recorded: std::collections::VecDeque<(u64, u64)>,
    done: bool,
    closed: bool,
    decoder: MessageDecoder,
    workers: usize,
}

impl RabbitSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let broker = Broker::from_options(opts)?;
        let queue = opts.required("queue")?;
        let format = MessageFormat::from_options(opts, spec)?;
        let decoder = MessageDecoder::open(spec, opts, &format)?;
        let prefetch: u64 = opts.value("scan.prefetch-count")?;
        if !(1..=65535).contains(&prefetch) {
            return Err(opts.error(format!(
                "option 'scan.prefetch-count' = {prefetch}: it must be between 1 and 65535"
            )));
        }
        let startup = match opts.value::<String>("scan.startup.mode")?.as_str() {
            "latest" => AMQPValue::LongString("next".into()),
            "offset" => {
                AMQPValue::LongLongInt(opts.optional::<i64>("scan.startup.offset")?.ok_or_else(
                    || opts.error("'scan.startup.mode' = 'offset' needs 'scan.startup.offset'"),
                )?)
            }
            "timestamp" => {
                let ms: i64 = opts.optional("scan.startup.timestamp-millis")?.ok_or_else(|| {
                    opts.error("'scan.startup.mode' = 'timestamp' needs 'scan.startup.timestamp-millis'")
                })?;
                AMQPValue::Timestamp((ms / 1000) as u64)
            }
            _ => AMQPValue::LongString("first".into()),
        };
        let bounded = opts.value::<String>("scan.bounded.mode")? == "latest";
        let rt = crate::message::client_runtime(&spec.table, "rabbitmq")?;
        let connection = broker.connect(&rt, opts)?;
        // The queue must exist: a passive declaration fails on a missing one.
        rt.block_on(async {
            let channel = connection.create_channel().await?;
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let _ = channel.close(200, "OK".into()).await;
            Ok::<_, lapin::Error>(())
        })
        .map_err(|e| {
            opts.error(format!(
                "queue '{queue}' (option 'queue') on RabbitMQ at '{}': {e}",
                broker.address
            ))
        })?;
        let stream = is_stream(&rt, &connection, &queue).map_err(|e| opts.error(e.to_string()))?;
        Ok(RabbitSource {
            table: spec.table.clone(),
            queue,
            address: broker.address,
            uri: broker.uri,
            rt,
            connection,
            channel: None,
            lost: None,
            last_attempt: Instant::now(),
            prefetch: prefetch as u16,
            stream,
            next_offset: None,
            startup,
            stream_end: None,
            bounded,
            timeout: broker.timeout,
            until_empty: bounded && !stream,
            cancelled: false,
            last_arrival: Instant::now(),
            last_probe: Instant::now(),
            reads: !stream || worker == 0,
            checkpointing: false,
            rx: None,
            returned_tag: 0,
            acked_tag: 0,
            recorded: Default::default(),
            done: false,
            closed: false,
            decoder,
            workers,
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    fn start_reading(&mut self) -> Result<()> {
        let channel = self
            .rt
            .block_on(async {
                let channel = self.connection.create_channel().await?;
                channel
                    .basic_qos(self.prefetch, BasicQosOptions::default())
                    .await?;
                Ok::<_, lapin::Error>(channel)
            })
            .map_err(|e| self.error(format!("RabbitMQ at '{}': {e}", self.address)))?;
        let mut arguments = FieldTable::default();
        if self.stream {
            let start = match self.next_offset {
                Some(next) => AMQPValue::LongLongInt(next),
                None => self.startup.clone(),
            };
            arguments.insert("x-stream-offset".into(), start);
        }
        // A stream's acknowledgements only pace it; a queue's (with checkpoints) wait for them.
        let no_ack = !self.stream && !self.checkpointing;
        self.rx = Some(spawn_consumer(
            &self.rt,
            channel.clone(),
            self.queue.clone(),
            no_ack,
            arguments,
        ));
        self.channel = Some(channel);
        self.last_arrival = Instant::now();
        Ok(())
    }

    /// Acknowledges every message up to `tag` (one frame for all).
    fn ack_through(&mut self, tag: u64) -> Result<()> {
        if tag <= self.acked_tag {
            return Ok(());
        }
        let Some(channel) = &self.channel else {
            return Ok(());
        };
        match self
            .rt
            .block_on(channel.basic_ack(tag, BasicAckOptions { multiple: true }))
        {
            Ok(()) => self.acked_tag = tag,
            // Not acknowledged: redelivered after the reconnect (at-least-once).
            Err(e) => self.mark_lost(format!("acknowledging messages: {e}")),
        }
        Ok(())
    }

    /// The connection (or its channel) failed. Deliveries of the lost channel cannot be
    /// acknowledged on another: the broker redelivers them (a stream resumes at the next offset).
    fn mark_lost(&mut self, error: String) {
        if self.lost.is_none() {
            self.lost = Some((Instant::now(), error));
        }
        self.rx = None;
        self.channel = None;
        self.returned_tag = 0;
        self.acked_tag = 0;
        self.recorded.clear();
    }

    /// After a lost connection: connects again (at most every 200 ms) and consumes on, or fails
    /// the job once the broker has been unreachable for `sluice.connect-timeout`.
    fn reconnect(&mut self) -> Result<Poll> {
        let (since, error) = self.lost.clone().expect("lost");
        if since.elapsed() >= self.timeout {
            return Err(self.error(format!(
                "consuming queue '{}' on RabbitMQ at '{}': {error}; unreachable for {:?} (option 'sluice.connect-timeout')",
                self.queue,
                self.address,
                since.elapsed()
            )));
        }
        if self.last_attempt.elapsed() < Duration::from_millis(200) {
            return Ok(Poll::Idle);
        }
        self.last_attempt = Instant::now();
        let connecting = Connection::connect(&self.uri, ConnectionProperties::default());
        let wait = self.timeout.min(Duration::from_secs(1));
        match self
            .rt
            .block_on(async { tokio::time::timeout(wait, connecting).await })
        {
            Ok(Ok(connection)) => {
                self.connection = connection;
                match self.start_reading() {
                    Ok(()) => {
                        tracing::warn!(
                            "table '{}': reconnected to RabbitMQ at '{}' after {:?} ({error})",
                            self.table,
                            self.address,
                            since.elapsed()
                        );
                        self.lost = None;
                    }
                    Err(e) => self.lost = Some((since, e.to_string())),
                }
            }
            Ok(Err(e)) => self.lost = Some((since, e.to_string())),
            Err(_) => {}
        }
        Ok(Poll::Idle)
    }

    /// Stops the broker from sending more (a bounded queue's end); the reading task ends once
    /// what it had sent has arrived.
    fn cancel_consumer(&mut self) -> Result<()> {
        self.cancelled = true;
        let Some(channel) = &self.channel else {
            return Ok(());
        };
        if let Err(e) = self
            .rt
            .block_on(channel.basic_cancel(CONSUMER_TAG.into(), Default::default()))
        {
            // Consumed again after the reconnect, then cancelled again.
            self.cancelled = false;
            self.mark_lost(format!("cancelling the consumer: {e}"));
        }
        Ok(())
    }

    /// Whether the queue has no message ready (a classic queue's bound).
    fn queue_empty(&mut self) -> Result<bool> {
        let Some(channel) = &self.channel else {
            return Ok(false);
        };
        let declared = self.rt.block_on(channel.queue_declare(
            self.queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ));
        match declared {
            Ok(q) => Ok(q.message_count() == 0),
            Err(e) => {
                self.mark_lost(format!("asking for the queue's length: {e}"));
                Ok(false)
            }
        }
    }

    /// The rows of messages: the decoded values, then the metadata columns in their places.
    fn decode(&mut self, messages: Vec<Received>) -> Result<Option<RecordBatch>> {
        let queue = &self.queue;
        let location = |i: usize| match messages[i].offset {
            Some(o) => format!("queue '{queue}' offset {o}"),
            None => format!("queue '{queue}' delivery {}", messages[i].tag),
        };
        self.decoder.rows(
            &messages,
            |m| &m.body,
            &location,
            |key, kept| -> ArrayRef {
                let rows = || kept.iter();
                match key {
                    "exchange" => {
                        Arc::new(StringArray::from_iter_values(rows().map(|m| &m.exchange)))
                    }
                    "routing-key" => Arc::new(StringArray::from_iter_values(
                        rows().map(|m| &m.routing_key),
                    )),
                    "redelivered" => {
                        Arc::new(BooleanArray::from_iter(rows().map(|m| Some(m.redelivered))))
                    }
                    "offset" => Arc::new(Int64Array::from_iter(rows().map(|m| m.offset))),
                    "message-id" => Arc::new(StringArray::from_iter(
                        rows().map(|m| m.message_id.as_deref()),
                    )),
                    _ => Arc::new(TimestampMillisecondArray::from_iter(
                        rows().map(|m| m.timestamp),
                    )),
                }
            },
        )
    }

    /// Whether a stream has been read to its bound.
    fn stream_done(&self) -> bool {
        match self.stream_end {
            Some(None) => true,
            Some(Some(last)) => self.next_offset.is_some_and(|n| n > last),
            None => false,
        }
    }
}

impl SourceReader for RabbitSource {
    fn open_splits(&self) -> Vec<usize> {
        if self.reads && !self.closed {
            vec![0]
        } else {
            vec![]
        }
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if !self.reads || self.closed {
            return Ok(if self.bounded || !self.reads {
                Poll::Finished
            } else {
                Poll::Idle
            });
        }
        if self.done || self.stream_done() {
            self.done = true;
            self.closed = true;
            return Ok(Poll::SplitDone { split: 0 });
        }
        if self.lost.is_some() {
            return self.reconnect();
        }
        if self.stream && self.bounded && self.stream_end.is_none() {
            // Found at the first poll, not at planning (an empty stream takes a while to tell).
            let patience = self.timeout.min(Duration::from_secs(5));
            let last = stream_last_offset(&self.rt, &self.connection, &self.queue, patience)
                .map_err(|e| self.error(e.to_string()))?;
            self.stream_end = Some(last);
            if self.stream_done() {
                self.done = true;
                self.closed = true;
                return Ok(Poll::SplitDone { split: 0 });
            }
        }
        if self.rx.is_none() {
            self.start_reading()?;
        }
        let mut messages = vec![];
        let mut failed = None;
        let end = self.stream_end.flatten();
        let rx = self.rx.as_mut().expect("started above");
        while messages.len() < max_rows {
            match rx.try_recv() {
                Ok(Fetched::Message(m)) => {
                    // A stream starts at a chunk's first message: skip those before the position.
                    if let (Some(o), Some(next)) = (m.offset, self.next_offset) {
                        if o < next {
                            continue;
                        }
                    }
                    if let (Some(o), Some(last)) = (m.offset, end) {
                        if o > last {
                            self.done = true;
                            break;
                        }
                    }
                    let at_end = matches!((m.offset, end), (Some(o), Some(last)) if o >= last);
                    messages.push(m);
                    if at_end {
                        self.done = true;
                        break;
                    }
                }
                Ok(Fetched::Ended) if self.cancelled => {
                    self.done = true;
                    break;
                }
                Ok(Fetched::Ended) => {
                    failed =
                        Some("the broker cancelled the consumer (was the queue deleted?)".into());
                    break;
                }
                Ok(Fetched::Failed(e)) => {
                    failed = Some(e);
                    break;
                }
                Err(_) => break,
            }
        }
        if let Some(e) = failed {
            if self.cancelled {
                return Err(self.error(format!(
                    "consuming queue '{}' on RabbitMQ at '{}': {e}",
                    self.queue, self.address
                )));
            }
            self.mark_lost(e);
            return self.reconnect();
        }
        if messages.is_empty() {
            if self.done {
                self.closed = true;
                return Ok(Poll::SplitDone { split: 0 });
            }
            if self.until_empty
                && !self.cancelled
                && self.last_arrival.elapsed() >= Duration::from_millis(300)
                && self.last_probe.elapsed() >= Duration::from_millis(100)
            {
                self.last_probe = Instant::now();
                if self.queue_empty()? {
                    // No message is ready, and those the broker sent this consumer arrive before
                    // the cancellation's end.
                    self.cancel_consumer()?;
                }
            }
            return Ok(Poll::Idle);
        }
        self.last_arrival = Instant::now();
        let last = messages.last().expect("not empty");
        self.returned_tag = last.tag;
        if let Some(o) = last.offset {
            self.next_offset = Some(o + 1);
        }
        if self.stream {
            // A stream's acknowledgements only pace its consumer.
            self.ack_through(self.returned_tag)?;
        }
        let batch = self.decode(messages)?;
        match batch {
            Some(batch) => Ok(Poll::Batch { split: 0, batch }),
            None => Ok(Poll::Idle),
        }
    }

    fn skipped(&self) -> u64 {
        self.decoder.skipped()
    }

    fn offsets(&self) -> SourceOffsets {
        if !(self.stream && self.reads) {
            return SourceOffsets::new();
        }
        let at = if self.closed {
            Some(SPLIT_DONE)
        } else {
            self.next_offset.map(|n| n as u64)
        };
        at.map(|at| [(self.queue.clone(), at)].into_iter().collect())
            .unwrap_or_default()
    }

    fn seek(&mut self, offsets: &SourceOffsets) -> Result<()> {
        match offsets.get(&self.queue) {
            Some(&SPLIT_DONE) => {
                self.done = true;
                self.closed = true;
            }
            Some(&at) => self.next_offset = Some(at as i64),
            None => {}
        }
        Ok(())
    }

    fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    fn checkpoint(&mut self, epoch: u64) {
        if !self.stream && self.returned_tag > self.acked_tag {
            self.recorded.push_back((epoch, self.returned_tag));
        }
    }

    fn committed(&mut self, epoch: u64) -> Result<()> {
        let mut through = None;
        while let Some(&(e, tag)) = self.recorded.front() {
            if e > epoch {
                break;
            }
            through = Some(tag);
            self.recorded.pop_front();
        }
        match through {
            Some(tag) => self.ack_through(tag),
            None => Ok(()),
        }
    }

    fn job_finished(&mut self) -> Result<()> {
        self.recorded.clear();
        if !self.stream {
            self.ack_through(self.returned_tag)?;
        }
        if let Some(channel) = self.channel.take() {
            let _ = self.rt.block_on(channel.close(200, "OK".into()));
        }
        Ok(())
    }

    /// A stream is one split, read by worker 0: the others never hold watermarks back.
    fn silent_workers(&self) -> Vec<usize> {
        if self.stream {
            (1..self.workers).collect()
        } else {
            vec![]
        }
    }
}

/// A worker's publisher.
pub struct RabbitSink {
    table: String,
    address: String,
    /// The broker's URI (with credentials) and `sluice.connect-timeout`, to connect again.
    uri: String,
    timeout: Duration,
    exchange: String,
    routing_key: String,
    rt: tokio::runtime::Runtime,
    connection: Connection,
    channel: Channel,
    format: MessageFormat,
    properties: BasicProperties,
    confirms: bool,
    /// Confirmations not yet awaited, and the bodies of those messages: a connection lost
    /// before they are confirmed is made again and they are published again (at-least-once).
    pending: Vec<PublisherConfirm>,
    unconfirmed: Vec<Vec<u8>>,
}

impl RabbitSink {
    pub fn open(spec: &ConnectorSpec, opts: &mut Options) -> Result<Self> {
        let broker = Broker::from_options(opts)?;
        let format = MessageFormat::from_options(opts, spec)?;
        if matches!(format, MessageFormat::Raw) && spec.schema.fields().len() != 1 {
            return Err(opts.error("format 'raw' writes a table of one column"));
        }
        let exchange = opts.get("exchange")?.unwrap_or_default();
        let queue = opts.get("queue")?;
        let routing_key = match (opts.get("routing-key")?, &queue) {
            (Some(k), _) => k,
            (None, Some(q)) => q.clone(),
            (None, None) if !exchange.is_empty() => String::new(),
            (None, None) => {
                return Err(opts
                    .error("the rabbitmq sink needs 'exchange' (with 'routing-key'), or 'queue'"))
            }
        };
        let confirms = opts.value::<String>("sink.delivery-guarantee")? == "at-least-once";
        let rt = crate::message::client_runtime(&spec.table, "rabbitmq")?;
        let connection = broker.connect(&rt, opts)?;
        let channel = rt
            .block_on(async {
                let channel = connection.create_channel().await?;
                if confirms {
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await?;
                }
                Ok::<_, lapin::Error>(channel)
            })
            .map_err(|e| opts.error(format!("RabbitMQ at '{}': {e}", broker.address)))?;
        // The target must exist (passive declarations fail on a missing one, closing the channel).
        let check = rt.block_on(async {
            let probe = connection.create_channel().await?;
            if !exchange.is_empty() {
                probe
                    .exchange_declare(
                        exchange.as_str().into(),
                        lapin::ExchangeKind::Direct,
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
            } else {
                probe
                    .queue_declare(
                        routing_key.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await?;
            }
            let _ = probe.close(200, "OK".into()).await;
            Ok::<_, lapin::Error>(())
        });
        if let Err(e) = check {
            return Err(opts.error(if exchange.is_empty() {
                format!(
                    "queue '{routing_key}' (option 'queue') on RabbitMQ at '{}': {e}",
                    broker.address
                )
            } else {
                format!(
                    "exchange '{exchange}' (option 'exchange') on RabbitMQ at '{}': {e}",
                    broker.address
                )
            }));
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(format.content_type().into());
        Ok(RabbitSink {
            table: spec.table.clone(),
            address: broker.address,
            uri: broker.uri,
            timeout: broker.timeout,
            exchange,
            routing_key,
            rt,
            connection,
            channel,
            format,
            properties,
            confirms,
            pending: vec![],
            unconfirmed: vec![],
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    /// Publishes one message (without waiting for its confirmation).
    fn publish(&self, body: &[u8]) -> std::result::Result<PublisherConfirm, lapin::Error> {
        self.rt.block_on(self.channel.basic_publish(
            self.exchange.as_str().into(),
            self.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            self.properties.clone(),
        ))
    }

    /// After a lost connection: connects again (every 200 ms at most) and publishes the
    /// unconfirmed messages again, or fails the job once the broker has been unreachable for
    /// `sluice.connect-timeout`.
    fn recover(&mut self, mut error: String) -> Result<()> {
        let since = Instant::now();
        tracing::warn!(
            "table '{}': lost RabbitMQ at '{}' while publishing ({error}); connecting again",
            self.table,
            self.address
        );
        loop {
            if since.elapsed() >= self.timeout {
                return Err(self.error(format!(
                    "publishing to exchange '{}' routing key '{}' on RabbitMQ at '{}': {error}; unreachable for {:?} (option 'sluice.connect-timeout')",
                    self.exchange,
                    self.routing_key,
                    self.address,
                    since.elapsed()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
            let wait = self.timeout.min(Duration::from_secs(1));
            let confirms = self.confirms;
            let uri = self.uri.clone();
            let opened = self.rt.block_on(async move {
                let connecting = Connection::connect(&uri, ConnectionProperties::default());
                let connection = match tokio::time::timeout(wait, connecting).await {
                    Ok(c) => c?,
                    Err(_) => {
                        return Err(lapin::Error::from(std::io::Error::other(
                            "connecting timed out",
                        )))
                    }
                };
                let channel = connection.create_channel().await?;
                if confirms {
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await?;
                }
                Ok((connection, channel))
            });
            let (connection, channel) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    error = e.to_string();
                    continue;
                }
            };
            self.connection = connection;
            self.channel = channel;
            self.pending.clear();
            let mut failed = None;
            for body in &self.unconfirmed {
                match self.publish(body) {
                    Ok(confirm) => self.pending.push(confirm),
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            match failed {
                None => {
                    tracing::warn!(
                        "table '{}': reconnected to RabbitMQ at '{}' after {:?}; published {} unconfirmed messages again",
                        self.table,
                        self.address,
                        since.elapsed(),
                        self.unconfirmed.len()
                    );
                    return Ok(());
                }
                Some(e) => error = e,
            }
        }
    }

    /// Waits for the broker's confirmation of every message published so far. A connection
    /// lost meanwhile is made again and the unconfirmed messages published again; a message
    /// the broker refuses, or that reaches no queue, fails the job.
    fn wait_confirms(&mut self) -> Result<()> {
        loop {
            let pending = std::mem::take(&mut self.pending);
            let results = self.rt.block_on(futures_util::future::join_all(pending));
            let what = || {
                format!(
                    "exchange '{}' routing key '{}'",
                    self.exchange, self.routing_key
                )
            };
            let mut lost = None;
            for r in results {
                match r {
                    Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {}
                    Ok(Confirmation::Ack(Some(returned))) => {
                        return Err(self.error(format!(
                            "a message to {} reached no queue ({} {})",
                            what(),
                            returned.reply_code,
                            returned.reply_text
                        )))
                    }
                    Ok(Confirmation::Nack(_)) => {
                        return Err(self.error(format!(
                            "RabbitMQ at '{}' refused a message to {}",
                            self.address,
                            what()
                        )))
                    }
                    Err(e) => lost = Some(e.to_string()),
                }
            }
            match lost {
                None => {
                    self.unconfirmed.clear();
                    return Ok(());
                }
                Some(e) => self.recover(e)?,
            }
        }
    }
}

impl SinkWriter for RabbitSink {
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let messages = self.format.encode(&self.table, "rabbitmq", batch)?;
        for m in messages {
            match self.publish(&m) {
                Ok(confirm) if self.confirms => {
                    self.pending.push(confirm);
                    self.unconfirmed.push(m);
                }
                Ok(_) => {}
                Err(e) => {
                    // Published again with the unconfirmed ones once connected again.
                    self.unconfirmed.push(m);
                    self.recover(e.to_string())?;
                    if !self.confirms {
                        self.pending.clear();
                        self.unconfirmed.clear();
                    }
                }
            }
            if self.confirms && self.pending.len() >= 8192 {
                self.wait_confirms()?;
            }
        }
        Ok(())
    }

    fn pre_commit(&mut self, _epoch: u64) -> Result<()> {
        self.wait_confirms()
    }

    fn finish(&mut self) -> Result<()> {
        self.wait_confirms()
    }

    fn abort(&mut self) -> Result<()> {
        Ok(())
    }
}
