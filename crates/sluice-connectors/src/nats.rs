//! The `nats` connector: a NATS JetStream stream as a source, and a subject (captured by a
//! stream) as a sink, through the official client (`async-nats`) on a small runtime of its own.
//!
//! **Source.** A stream is one ordered log: one split, read by worker 0 (the others take no
//! part). Where it stands, the next stream sequence, lives in Sluice's checkpoints, and a
//! restore reads on from there through an ordered consumer (ephemeral, without acks, recreated
//! by the client on a gap): exactly-once into state and transactional sinks.
//!
//! **Sink.** `at-least-once` waits for every message's acknowledgement at each checkpoint and at
//! the end. `exactly-once` (with checkpoints) stages each checkpoint's messages beside the
//! checkpoints when it is sealed and publishes them once it commits, each with a `Nats-Msg-Id`
//! made of the prefix, table, worker, epoch and position. After a crash, staged messages of committed
//! checkpoints are published again with the same ids, which the stream drops as duplicates
//! within its duplicate window.

use std::future::IntoFuture;
use std::sync::Arc;

use crate::staged::Payload;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray, UInt64Array};
use arrow::record_batch::RecordBatch;
use async_nats::jetstream;
use futures_util::StreamExt;
use sluice_common::{ChangeBatch, Error, Result};

use crate::message::{MessageDecoder, MessageFormat};
use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SinkWriter, SourceOffsets, SourceReader, SPLIT_DONE};

/// The `nats` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "nats",
    reads: true,
    writes: true,
    metadata: &["subject", "sequence", "timestamp"],
    writable_metadata: &[],
    formats: true,
    lookup: false,
    options: &[
        OptionDef {
            key: "servers",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "the NATS servers, `nats://host:port[,nats://host:port...]`",
        },
        OptionDef {
            key: "stream",
            kind: Kind::Text,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "the JetStream stream to read",
        },
        OptionDef {
            key: "subject",
            kind: Kind::Text,
            default: None,
            side: Side::Both,
            identity: true,
            doc: "reading: the subjects of the stream to read (wildcards allowed; all of them when unset); writing: the subject to publish to (a stream must capture it)",
        },
        crate::message::FORMAT_OPTION,
        crate::message::JSON_IGNORE_OPTION,
        crate::message::CSV_IGNORE_OPTION,
        crate::avro::IGNORE_OPTION,
        crate::avro::LEGACY_TIMESTAMPS_OPTION,
        OptionDef {
            key: "scan.startup.mode",
            kind: Kind::Choice(&["earliest", "latest", "timestamp", "sequence"]),
            default: Some("earliest"),
            side: Side::Source,
            identity: false,
            doc: "where a job without a checkpoint starts: the stream's first message, only new ones, the first at or after a time, or a stream sequence",
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
            key: "scan.startup.sequence",
            kind: Kind::Count,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "`sequence` mode: the first stream sequence to read",
        },
        OptionDef {
            key: "scan.bounded.mode",
            kind: Kind::Choice(&["unbounded", "latest", "sequence"]),
            default: Some("unbounded"),
            side: Side::Source,
            identity: false,
            doc: "where the source ends: never, at the stream's last message when the job starts, or before a stream sequence",
        },
        OptionDef {
            key: "scan.bounded.sequence",
            kind: Kind::Count,
            default: None,
            side: Side::Source,
            identity: false,
            doc: "`sequence` bound: the first stream sequence not read",
        },
        OptionDef {
            key: "sluice.connect-timeout",
            kind: Kind::Duration,
            default: Some("10 s"),
            side: Side::Both,
            identity: false,
            doc: "how long the server may stay unreachable (at start, or while running) before the job fails",
        },
        OptionDef {
            key: "sink.delivery-guarantee",
            kind: Kind::Choice(&["at-least-once", "exactly-once"]),
            default: Some("at-least-once"),
            side: Side::Sink,
            identity: false,
            doc: "`at-least-once` waits for every message's acknowledgement at each checkpoint and at the end; `exactly-once` publishes each checkpoint's messages once it commits, with message ids that the stream deduplicates (within its duplicate window)",
        },
        OptionDef {
            key: "sink.message-id-prefix",
            kind: Kind::Text,
            default: None,
            side: Side::Sink,
            identity: false,
            doc: "`exactly-once`: the prefix of the `Nats-Msg-Id`s (`<prefix>-<table>-<insert>-<worker>-<epoch>-<n>`), unique per job",
        },
    ],
};

fn connect_timeout(opts: &mut Options) -> Result<Duration> {
    let ms = opts
        .duration_ms("sluice.connect-timeout")?
        .expect("declared default");
    Ok(Duration::from_millis(ms.max(1) as u64))
}

/// Connects to `servers` within `timeout`, or fails naming them.
fn connect(
    rt: &tokio::runtime::Runtime,
    opts: &Options,
    servers: &str,
    timeout: Duration,
) -> Result<async_nats::Client> {
    let addrs: Vec<async_nats::ServerAddr> = servers
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|e| opts.error(format!("option 'servers' = '{servers}': {e}")))
        })
        .collect::<Result<_>>()?;
    let connecting = async_nats::ConnectOptions::new()
        .connection_timeout(timeout)
        .connect(addrs);
    match rt.block_on(async { tokio::time::timeout(timeout, connecting).await }) {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(opts.error(format!(
            "cannot reach the NATS server at '{servers}' (option 'servers'): {e}"
        ))),
        Err(_) => Err(opts.error(format!(
            "cannot reach the NATS server at '{servers}' (option 'servers') within {timeout:?} (option 'sluice.connect-timeout')"
        ))),
    }
}

/// Tracks how long the connection has been down.
struct Liveness {
    servers: String,
    timeout: Duration,
    down_since: Option<Instant>,
}

impl Liveness {
    /// Fails once the client has been disconnected longer than the timeout (it reconnects by
    /// itself until then).
    fn check(&mut self, client: &async_nats::Client, table: &str) -> Result<()> {
        if client.connection_state() == async_nats::connection::State::Connected {
            self.down_since = None;
            return Ok(());
        }
        let since = *self.down_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.timeout {
            return Err(Error::connector(
                table,
                format!(
                    "lost the NATS server at '{}' for {:?} (option 'sluice.connect-timeout')",
                    self.servers,
                    since.elapsed()
                ),
            ));
        }
        Ok(())
    }
}

/// What the reading task hands over.
enum Fetched {
    Message {
        sequence: u64,
        subject: String,
        published_ms: i64,
        payload: Vec<u8>,
    },
    /// The bound is reached: nothing more to read.
    End,
    Failed(String),
}

/// Where the source ends.
#[derive(Clone, Copy)]
enum Bound {
    /// Everything there when the job started: messages up to this sequence, or until the
    /// consumer has nothing pending.
    Latest(u64),
    /// Messages before this sequence.
    Before(u64),
}

/// Worker 0's reader of a stream (the other workers read nothing).
pub struct NatsSource {
    table: String,
    stream: String,
    filter: String,
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    liveness: Liveness,
    reads: bool,
    start: jetstream::consumer::DeliverPolicy,
    bound: Option<Bound>,
    rx: Option<tokio::sync::mpsc::Receiver<Fetched>>,
    /// The next sequence to read (from a checkpoint), and the one after the rows returned.
    next: Option<u64>,
    returned: Option<u64>,
    /// Read to its end; its `SplitDone` was returned.
    done: bool,
    closed: bool,
    decoder: MessageDecoder,
    workers: usize,
}

impl NatsSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let servers = opts.required("servers")?;
        let stream = opts.required("stream")?;
        let filter = opts.get("subject")?.unwrap_or_default();
        let format = MessageFormat::from_options(opts, spec)?;
        let decoder = MessageDecoder::open(spec, opts, &format)?;
        let timeout = connect_timeout(opts)?;
        use jetstream::consumer::DeliverPolicy;
        let start = match opts.value::<String>("scan.startup.mode")?.as_str() {
            "latest" => DeliverPolicy::New,
            "timestamp" => {
                let ms: i64 = opts.optional("scan.startup.timestamp-millis")?.ok_or_else(|| {
                    opts.error("'scan.startup.mode' = 'timestamp' needs 'scan.startup.timestamp-millis'")
                })?;
                DeliverPolicy::ByStartTime {
                    start_time: chrono::DateTime::from_timestamp_millis(ms).ok_or_else(|| {
                        opts.error("option 'scan.startup.timestamp-millis' is out of range")
                    })?,
                }
            }
            "sequence" => DeliverPolicy::ByStartSequence {
                start_sequence: opts.optional("scan.startup.sequence")?.ok_or_else(|| {
                    opts.error("'scan.startup.mode' = 'sequence' needs 'scan.startup.sequence'")
                })?,
            },
            _ => DeliverPolicy::All,
        };
        let bounded = opts.value::<String>("scan.bounded.mode")?;
        let before = opts.optional::<u64>("scan.bounded.sequence")?;
        let rt = crate::message::client_runtime(&spec.table, "nats")?;
        let client = connect(&rt, opts, &servers, timeout)?;
        let js = {
            let _in_runtime = rt.enter();
            jetstream::new(client.clone())
        };
        let info = rt
            .block_on(async {
                let mut s = js.get_stream(&stream).await?;
                Ok::<_, async_nats::Error>(s.info().await?.clone())
            })
            .map_err(|e| {
                opts.error(format!(
                    "JetStream stream '{stream}' (option 'stream') on '{servers}': {e}"
                ))
            })?;
        let bound = match bounded.as_str() {
            "latest" => Some(Bound::Latest(info.state.last_sequence)),
            "sequence" => Some(Bound::Before(before.ok_or_else(|| {
                opts.error("'scan.bounded.mode' = 'sequence' needs 'scan.bounded.sequence'")
            })?)),
            _ => None,
        };
        Ok(NatsSource {
            table: spec.table.clone(),
            stream,
            filter,
            rt,
            client,
            liveness: Liveness {
                servers,
                timeout,
                down_since: None,
            },
            reads: worker == 0,
            start,
            bound,
            rx: None,
            next: None,
            returned: None,
            done: false,
            closed: false,
            decoder,
            workers,
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    /// Starts the reading task at the checkpointed sequence, or where the startup mode says.
    fn start_reading(&mut self) {
        let deliver_policy = match self.next {
            Some(start_sequence) => {
                jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            None => self.start,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16_384);
        let js = {
            let _in_runtime = self.rt.enter();
            jetstream::new(self.client.clone())
        };
        let (stream, filter, bound) = (self.stream.clone(), self.filter.clone(), self.bound);
        self.rt.spawn(async move {
            let read = async {
                let stream = js.get_stream(&stream).await?;
                let consumer = stream
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        filter_subject: filter,
                        deliver_policy,
                        ..Default::default()
                    })
                    .await?;
                let nothing = consumer.cached_info().num_pending == 0;
                if matches!(bound, Some(Bound::Latest(_))) && nothing {
                    let _ = tx.send(Fetched::End).await;
                    return Ok(());
                }
                let mut messages = consumer.messages().await?;
                while let Some(m) = messages.next().await {
                    let m = m?;
                    let info = m.info()?;
                    let sequence = info.stream_sequence;
                    let past = match bound {
                        Some(Bound::Latest(last)) => sequence > last,
                        Some(Bound::Before(end)) => sequence >= end,
                        None => false,
                    };
                    if past {
                        let _ = tx.send(Fetched::End).await;
                        return Ok(());
                    }
                    let last = match bound {
                        Some(Bound::Latest(last)) => sequence >= last || info.pending == 0,
                        Some(Bound::Before(end)) => sequence + 1 >= end,
                        None => false,
                    };
                    let fetched = Fetched::Message {
                        sequence,
                        subject: m.subject.to_string(),
                        published_ms: info.published.timestamp_millis(),
                        payload: m.payload.to_vec(),
                    };
                    if tx.send(fetched).await.is_err() {
                        return Ok(());
                    }
                    if last {
                        let _ = tx.send(Fetched::End).await;
                        return Ok(());
                    }
                }
                Ok::<(), async_nats::Error>(())
            };
            if let Err(e) = read.await {
                let _ = tx.send(Fetched::Failed(e.to_string())).await;
            }
        });
        self.rx = Some(rx);
    }

    /// The rows of messages: the decoded values, then the metadata columns in their places.
    fn decode(
        &mut self,
        messages: Vec<(u64, String, i64, Vec<u8>)>,
    ) -> Result<Option<RecordBatch>> {
        let stream = &self.stream;
        let location = |i: usize| format!("stream '{stream}' sequence {}", messages[i].0);
        self.decoder.rows(
            &messages,
            |m| &m.3,
            &location,
            |key, kept| -> ArrayRef {
                match key {
                    "subject" => Arc::new(StringArray::from_iter_values(
                        kept.iter().map(|m| m.1.as_str()),
                    )),
                    "sequence" => Arc::new(UInt64Array::from_iter_values(kept.iter().map(|m| m.0))),
                    _ => Arc::new(TimestampMillisecondArray::from_iter_values(
                        kept.iter().map(|m| m.2),
                    )),
                }
            },
        )
    }
}

impl SourceReader for NatsSource {
    fn open_splits(&self) -> Vec<usize> {
        if self.reads && !self.closed {
            vec![0]
        } else {
            vec![]
        }
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if !self.reads || self.closed {
            return Ok(if self.bound.is_some() || !self.reads {
                Poll::Finished
            } else {
                Poll::Idle
            });
        }
        if self.done {
            self.closed = true;
            return Ok(Poll::SplitDone { split: 0 });
        }
        if self.rx.is_none() {
            self.start_reading();
        }
        let mut messages = vec![];
        let mut failed = None;
        let rx = self.rx.as_mut().expect("started above");
        while messages.len() < max_rows {
            match rx.try_recv() {
                Ok(Fetched::Message {
                    sequence,
                    subject,
                    published_ms,
                    payload,
                }) => messages.push((sequence, subject, published_ms, payload)),
                Ok(Fetched::End) => {
                    self.done = true;
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
            return Err(self.error(format!("reading stream '{}': {e}", self.stream)));
        }
        if messages.is_empty() {
            if self.done {
                self.closed = true;
                return Ok(Poll::SplitDone { split: 0 });
            }
            let client = self.client.clone();
            self.liveness.check(&client, &self.table)?;
            return Ok(Poll::Idle);
        }
        let next = messages.last().expect("not empty").0 + 1;
        let batch = self.decode(messages)?;
        self.returned = Some(next);
        match batch {
            Some(batch) => Ok(Poll::Batch { split: 0, batch }),
            None => Ok(Poll::Idle),
        }
    }

    fn skipped(&self) -> u64 {
        self.decoder.skipped()
    }

    fn offsets(&self) -> SourceOffsets {
        if !self.reads {
            return SourceOffsets::new();
        }
        let at = if self.done && self.closed {
            Some(SPLIT_DONE)
        } else {
            self.returned.or(self.next)
        };
        at.map(|at| [(self.stream.clone(), at)].into_iter().collect())
            .unwrap_or_default()
    }

    fn seek(&mut self, offsets: &SourceOffsets) -> Result<()> {
        match offsets.get(&self.stream) {
            Some(&SPLIT_DONE) => {
                self.done = true;
                self.closed = true;
            }
            Some(&at) => {
                self.next = Some(at);
                self.returned = Some(at);
            }
            None => {}
        }
        Ok(())
    }

    /// The stream is one split, read by worker 0: the others never hold watermarks back.
    fn silent_workers(&self) -> Vec<usize> {
        (1..self.workers).collect()
    }
}

/// A worker's publisher into a subject.
pub struct NatsSink {
    table: String,
    subject: String,
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
    js: jetstream::Context,
    liveness: Liveness,
    format: MessageFormat,
    /// `exactly-once`: the message-id prefix; this writer's INSERT among the job's.
    exactly_once: Option<String>,
    instance: usize,
    worker: usize,
    transactional: bool,
    /// `exactly-once`: each checkpoint's messages, staged until it commits.
    staged: crate::staged::Staged<Payload>,
    /// Acknowledgements not yet received (at-least-once).
    acks: Vec<jetstream::context::PublishAckFuture>,
}

impl NatsSink {
    pub fn open(spec: &ConnectorSpec, opts: &mut Options, worker: usize) -> Result<Self> {
        let servers = opts.required("servers")?;
        let subject = opts.required("subject")?;
        let format = MessageFormat::from_options(opts, spec)?;
        if matches!(format, MessageFormat::Raw) && spec.schema.fields().len() != 1 {
            return Err(opts.error("format 'raw' writes a table of one column"));
        }
        let exactly_once = match (
            opts.value::<String>("sink.delivery-guarantee")?.as_str(),
            opts.get("sink.message-id-prefix")?,
        ) {
            ("exactly-once", Some(prefix)) => Some(prefix),
            ("exactly-once", None) => {
                return Err(opts.error(
                    "'sink.delivery-guarantee' = 'exactly-once' needs 'sink.message-id-prefix'",
                ))
            }
            _ => None,
        };
        let timeout = connect_timeout(opts)?;
        let rt = crate::message::client_runtime(&spec.table, "nats")?;
        let client = connect(&rt, opts, &servers, timeout)?;
        let js = {
            let _in_runtime = rt.enter();
            jetstream::new(client.clone())
        };
        // A subject no stream captures would take messages into the void.
        rt.block_on(js.stream_by_subject(subject.clone()))
            .map_err(|e| {
                opts.error(format!(
                    "no JetStream stream on '{servers}' captures subject '{subject}' (option 'subject'): {e}"
                ))
            })?;
        Ok(NatsSink {
            table: spec.table.clone(),
            subject,
            rt,
            client,
            js,
            liveness: Liveness {
                servers,
                timeout,
                down_since: None,
            },
            format,
            exactly_once,
            instance: spec.sink_instance,
            worker,
            transactional: false,
            staged: crate::staged::Staged::new("nats", &spec.table, spec.sink_instance),
            acks: vec![],
        })
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::connector(&self.table, message)
    }

    /// The staged messages, out of `self` while `self` writes them.
    fn take_staged(&mut self) -> crate::staged::Staged<Payload> {
        let empty = crate::staged::Staged::new("nats", &self.table, self.instance);
        std::mem::replace(&mut self.staged, empty)
    }

    /// Publishes messages (with ids, for exactly-once) and waits for their acknowledgements.
    fn publish_all(&mut self, messages: &[Payload], ids: Option<(usize, u64)>) -> Result<()> {
        for (i, m) in messages.iter().enumerate() {
            let payload = bytes::Bytes::from(m.0.clone());
            let subject = self.subject.clone();
            let ack = match (&self.exactly_once, ids) {
                (Some(prefix), Some((worker, epoch))) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(
                        async_nats::header::NATS_MESSAGE_ID,
                        format!(
                            "{prefix}-{}-{}-{worker}-{epoch}-{i}",
                            self.table, self.instance
                        )
                        .as_str(),
                    );
                    self.rt
                        .block_on(self.js.publish_with_headers(subject, headers, payload))
                }
                _ => self.rt.block_on(self.js.publish(subject, payload)),
            }
            .map_err(|e| self.error(format!("publishing to '{}': {e}", self.subject)))?;
            self.acks.push(ack);
            if self.acks.len() >= 4096 {
                self.wait_acks()?;
            }
        }
        self.wait_acks()
    }

    fn wait_acks(&mut self) -> Result<()> {
        let acks = std::mem::take(&mut self.acks);
        let subject = self.subject.clone();
        let results = self.rt.block_on(futures_util::future::join_all(
            acks.into_iter().map(|a| a.into_future()),
        ));
        for r in results {
            r.map_err(|e| {
                self.error(format!(
                    "a message to '{subject}' was not acknowledged: {e}"
                ))
            })?;
        }
        let client = self.client.clone();
        self.liveness.check(&client, &self.table)
    }
}

impl SinkWriter for NatsSink {
    fn set_staging(&mut self, staging: Arc<dyn crate::Staging>) {
        self.staged.set_staging(staging);
    }

    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let messages = self.format.encode(&self.table, "nats", batch)?;
        if self.transactional && self.exactly_once.is_some() {
            self.staged.push(messages.into_iter().map(Payload));
            return Ok(());
        }
        for m in messages {
            let payload = bytes::Bytes::from(m);
            let ack = self
                .rt
                .block_on(self.js.publish(self.subject.clone(), payload))
                .map_err(|e| self.error(format!("publishing to '{}': {e}", self.subject)))?;
            self.acks.push(ack);
            if self.acks.len() >= 4096 {
                self.wait_acks()?;
            }
        }
        Ok(())
    }

    fn begin_transactions(
        &mut self,
        committed: Option<u64>,
        worker: usize,
        workers: usize,
    ) -> Result<()> {
        self.transactional = true;
        self.worker = worker;
        if self.exactly_once.is_none() {
            return Ok(());
        }
        // Staged messages of committed checkpoints (of this worker and those it replaces) are
        // published again under their ids: the stream drops those it already has.
        let mut staged = self.take_staged();
        let settled = staged.settle(committed, worker, workers, |old, epoch, messages| {
            self.publish_all(&messages, Some((old, epoch)))
        });
        self.staged = staged;
        settled
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<()> {
        if !(self.transactional && self.exactly_once.is_some()) {
            return self.wait_acks();
        }
        self.staged.seal(epoch)
    }

    fn commit(&mut self, epoch: u64) -> Result<()> {
        if !(self.transactional && self.exactly_once.is_some()) {
            return Ok(());
        }
        // The last published checkpoints' staged messages stay until the next commit: a crash
        // right after publishing finds them, and their ids make the replay harmless.
        let mut staged = self.take_staged();
        let done = staged.commit(epoch, |worker, e, messages| {
            self.publish_all(messages, Some((worker, e)))
        });
        self.staged = staged;
        done
    }

    fn finish(&mut self) -> Result<()> {
        // Exactly-once without checkpoints: at-least-once.
        let messages = self.staged.take_pending();
        self.publish_all(&messages, None)?;
        self.wait_acks()
    }

    fn abort(&mut self) -> Result<()> {
        Ok(())
    }
}
