//! The adapter to timely dataflow. Nothing else in Sluice names a timely type.
//!
//! - [`Event`] is the container that flows on every edge: a changelog batch, or a watermark.
//! - [`exchange_by_key`] routes rows to workers by the hash of their key (via key groups) and
//!   broadcasts watermarks to every worker.
//! - Timestamps are epochs (`u64`): short intervals of processing time.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, Int8Array, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use datafusion_common::hash_utils::{create_hashes, RandomState};
use sluice_common::ChangeBatch;
use sluice_sql::PhysExpr;
use timely::communication::Push;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{DistributorPact, Pipeline};
use timely::dataflow::channels::pushers::exchange::Distributor;
use timely::dataflow::channels::{ContainerBytes, Message};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::{Scope, Stream};
use timely::progress::Stamp;
use timely::Accountable;

use crate::metrics::{InFlight, JobMetrics};

/// A processing-time epoch: the unit of progress (and, later, of checkpoints).
pub type Epoch = u64;
/// A stream of [`Event`]s.
pub type EventStream<'scope> = Stream<'scope, Epoch, Event>;
/// The builder for operators that emit whole [`Event`]s.
pub type EventBuilder = CapacityContainerBuilder<Event>;

/// Number of key groups: state is organized by key group so that rescaling moves whole groups.
pub const KEY_GROUPS: u64 = 256;

/// What travels on a dataflow edge.
#[derive(Clone, Default)]
pub enum Event {
    #[default]
    Empty,
    /// Rows.
    Data(DataEvent),
    /// "No more rows with event time below `ts` will come from worker `from`." With `idle`, the
    /// sender has no data for now: receivers leave it out of their minimum until it sends again.
    /// `weight` makes a broadcast count as one record per receiver in timely's progress tracking.
    Watermark {
        from: u32,
        ts: i64,
        weight: u32,
        idle: bool,
        /// When the sending operator made it (wall clock, ms): how long windows take to fire
        /// after the watermark that closes them is measured from here.
        at: i64,
    },
}

/// A batch with its cached wire encoding.
pub struct DataEvent {
    pub batch: ChangeBatch,
    encoded: OnceLock<Vec<u8>>,
    /// The bytes an exchange counted in flight when it sent this batch to a worker of the same
    /// process (0 otherwise: batches from other processes arrive decoded, unmetered).
    metered: usize,
}

impl Clone for DataEvent {
    fn clone(&self) -> Self {
        DataEvent {
            batch: self.batch.clone(),
            encoded: OnceLock::new(),
            metered: 0,
        }
    }
}

impl Event {
    /// Rows as an event.
    pub fn data(batch: ChangeBatch) -> Event {
        Event::Data(DataEvent {
            batch,
            encoded: OnceLock::new(),
            metered: 0,
        })
    }

    /// The memory the event's rows hold (0 for a watermark).
    pub fn bytes(&self) -> usize {
        match self {
            Event::Data(d) => event_bytes(&d.batch),
            _ => 0,
        }
    }

    /// A watermark from worker `from`, which will be counted once by each of `peers` receivers.
    pub fn watermark(from: usize, ts: i64, peers: usize) -> Event {
        Event::Watermark {
            from: from as u32,
            ts,
            weight: peers as u32,
            idle: false,
            at: sluice_common::time::now_millis(),
        }
    }

    /// What an operator forwards after its watermark tracker decided: its watermark, or (with
    /// `idle`) that it is idle at that watermark.
    pub fn progress(from: usize, ts: i64, idle: bool, peers: usize) -> Event {
        if idle {
            Event::idle(from, ts, peers)
        } else {
            Event::watermark(from, ts, peers)
        }
    }

    /// "Worker `from` is idle": its watermark stops holding receivers back until it sends again.
    pub fn idle(from: usize, ts: i64, peers: usize) -> Event {
        Event::Watermark {
            from: from as u32,
            ts,
            weight: peers as u32,
            idle: true,
            at: sluice_common::time::now_millis(),
        }
    }
}

impl Accountable for Event {
    fn record_count(&self) -> i64 {
        match self {
            Event::Empty => 0,
            Event::Data(d) => d.batch.num_rows() as i64,
            Event::Watermark { weight, .. } => *weight as i64,
        }
    }
}

const TAG_DATA: u64 = 1;
const TAG_WATERMARK: u64 = 2;
const OP_COLUMN: &str = "__sluice_op";

fn encode_batch(batch: &ChangeBatch) -> Vec<u8> {
    let data = match &batch.ops {
        None => batch.data.clone(),
        Some(ops) => {
            let mut fields: Vec<Field> = batch
                .data
                .schema()
                .fields()
                .iter()
                .map(|f| f.as_ref().clone())
                .collect();
            fields.push(Field::new(OP_COLUMN, DataType::Int8, false));
            let mut cols: Vec<ArrayRef> = batch.data.columns().to_vec();
            cols.push(Arc::new(ops.clone()));
            RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).expect("op column matches")
        }
    };
    let mut buf = vec![];
    let mut w = StreamWriter::try_new(&mut buf, &data.schema()).expect("IPC writer");
    w.write(&data).expect("IPC write");
    w.finish().expect("IPC finish");
    drop(w);
    buf
}

fn decode_batch(bytes: &[u8]) -> ChangeBatch {
    let mut reader = StreamReader::try_new(bytes, None).expect("IPC stream from a Sluice worker");
    let batch = reader.next().expect("one batch").expect("valid IPC batch");
    let schema = batch.schema();
    match schema.index_of(OP_COLUMN) {
        Ok(i) => {
            let ops = batch
                .column(i)
                .as_any()
                .downcast_ref::<Int8Array>()
                .expect("int8 ops")
                .clone();
            let mut data = batch;
            data.remove_column(i);
            ChangeBatch {
                data,
                ops: Some(ops),
            }
        }
        Err(_) => ChangeBatch::inserts(batch),
    }
}

fn padded(n: usize) -> usize {
    (n + 7) & !7
}

impl ContainerBytes for Event {
    fn from_bytes(bytes: timely::bytes::arc::Bytes) -> Self {
        let b: &[u8] = &bytes;
        let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        match word(0) {
            TAG_DATA => {
                let len = word(1) as usize;
                Event::data(decode_batch(&b[16..16 + len]))
            }
            TAG_WATERMARK => Event::Watermark {
                from: word(1) as u32,
                ts: word(2) as i64,
                weight: word(3) as u32,
                idle: word(4) != 0,
                at: word(5) as i64,
            },
            _ => Event::Empty,
        }
    }

    fn length_in_bytes(&self) -> usize {
        match self {
            Event::Empty => 8,
            Event::Data(d) => 16 + padded(d.encoded.get_or_init(|| encode_batch(&d.batch)).len()),
            Event::Watermark { .. } => 48,
        }
    }

    fn into_bytes<W: Write>(&self, writer: &mut W) {
        let mut put = |v: u64| writer.write_all(&v.to_le_bytes()).expect("write");
        match self {
            Event::Empty => put(0),
            Event::Data(d) => {
                let enc = d.encoded.get_or_init(|| encode_batch(&d.batch));
                put(TAG_DATA);
                put(enc.len() as u64);
                writer.write_all(enc).expect("write");
                writer
                    .write_all(&[0u8; 8][..padded(enc.len()) - enc.len()])
                    .expect("write");
            }
            Event::Watermark {
                from,
                ts,
                weight,
                idle,
                at,
            } => {
                put(TAG_WATERMARK);
                put(*from as u64);
                put(*ts as u64);
                put(*weight as u64);
                put(*idle as u64);
                put(*at as u64);
            }
        }
    }
}

/// The hash state every process uses, so keys land on the same key group everywhere.
pub fn key_hash_state() -> RandomState {
    RandomState::with_seed(0x51u64 << 32 | 0xce)
}

/// The worker that owns a key group.
#[inline]
pub fn worker_for_hash(hash: u64, peers: usize) -> usize {
    let key_group = hash % KEY_GROUPS;
    (key_group as usize * peers) / KEY_GROUPS as usize
}

/// Splits batches by key across workers; broadcasts watermarks.
pub struct KeyDistributor {
    keys: Vec<PhysExpr>,
    hashes: Vec<u64>,
    /// Counts the bytes sent to this process's workers (`local`) until they are received.
    meter: Arc<InFlight>,
    local: std::ops::Range<usize>,
}

impl KeyDistributor {
    /// Workers for every row of a batch, or `None` if a key cannot be evaluated (the batch then
    /// goes whole to one worker, whose operator reports the error).
    fn route(&mut self, batch: &RecordBatch, peers: usize) -> Option<Vec<usize>> {
        let arrays: Vec<ArrayRef> = self
            .keys
            .iter()
            .map(|k| {
                k.evaluate(batch)
                    .and_then(|v| v.into_array(batch.num_rows()))
            })
            .collect::<Result<_, _>>()
            .ok()?;
        self.hashes.clear();
        self.hashes.resize(batch.num_rows(), 0);
        if arrays.is_empty() {
            return Some(vec![0; batch.num_rows()]);
        }
        create_hashes(&arrays, &key_hash_state(), &mut self.hashes).ok()?;
        Some(
            self.hashes
                .iter()
                .map(|h| worker_for_hash(*h, peers))
                .collect(),
        )
    }
}

impl KeyDistributor {
    /// Counts an event sent to worker `to` in flight, when that worker is in this process.
    fn metered(&self, mut event: Event, to: usize) -> Event {
        if let Event::Data(d) = &mut event {
            if self.local.contains(&to) {
                d.metered = event_bytes(&d.batch).max(1);
                self.meter.add(d.metered);
            }
        }
        event
    }
}

fn event_bytes(batch: &ChangeBatch) -> usize {
    batch.data.get_array_memory_size() + batch.ops.as_ref().map_or(0, |o| o.get_array_memory_size())
}

impl Distributor<Event> for KeyDistributor {
    fn partition<T: Clone, P: Push<Message<T, Event>>>(
        &mut self,
        container: &mut Event,
        stamp: &Stamp<T>,
        pushers: &mut [P],
    ) {
        let peers = pushers.len();
        match std::mem::take(container) {
            Event::Empty => {}
            Event::Watermark {
                from, ts, idle, at, ..
            } => {
                for p in pushers.iter_mut() {
                    Message::push_at(
                        &mut Event::Watermark {
                            from,
                            ts,
                            weight: 1,
                            idle,
                            at,
                        },
                        stamp.clone(),
                        p,
                    );
                }
            }
            Event::Data(d) => {
                let Some(targets) = self.route(&d.batch.data, peers) else {
                    let mut event = self.metered(Event::Data(d), 0);
                    Message::push_at(&mut event, stamp.clone(), &mut pushers[0]);
                    return;
                };
                let mut per_worker: Vec<Vec<u32>> = vec![vec![]; peers];
                for (row, w) in targets.iter().enumerate() {
                    per_worker[*w].push(row as u32);
                }
                for (w, rows) in per_worker.into_iter().enumerate() {
                    if rows.is_empty() {
                        continue;
                    }
                    let part = if rows.len() == d.batch.num_rows() {
                        d.batch.clone()
                    } else {
                        d.batch
                            .take(&UInt32Array::from(rows))
                            .expect("take within bounds")
                    };
                    let mut event = self.metered(Event::data(part), w);
                    Message::push_at(&mut event, stamp.clone(), &mut pushers[w]);
                }
            }
        }
    }

    fn flush<T: Clone, P: Push<Message<T, Event>>>(
        &mut self,
        _stamp: &Stamp<T>,
        _pushers: &mut [P],
    ) {
    }
}

/// Routes rows to the worker owning their key's key group; every worker gets every watermark.
/// The bytes between this process's workers are counted in flight as "exchange into `into`".
pub fn exchange_by_key<'scope>(
    stream: EventStream<'scope>,
    keys: Vec<PhysExpr>,
    into: &str,
    metrics: &JobMetrics,
    local: std::ops::Range<usize>,
) -> EventStream<'scope> {
    let meter = metrics.in_flight_meter(&format!("exchange into {into}"));
    let sent = meter.clone();
    let pact = DistributorPact(move |_peers: usize| KeyDistributor {
        keys,
        hashes: vec![],
        meter: sent.clone(),
        local: local.clone(),
    });
    stream.unary::<EventBuilder, _, _, _>(pact, "ExchangeByKey", move |_cap, _info| {
        move |input, output| {
            input.for_each(|cap, data| {
                if let Event::Data(d) = data {
                    meter.sub(std::mem::take(&mut d.metered));
                }
                output.session(&cap).give_container(data);
            });
        }
    })
}

/// Re-labels the watermarks of one input of a union, so the union can tell its inputs apart.
pub fn tag_watermarks<'scope>(
    stream: EventStream<'scope>,
    input: u32,
    workers: u32,
) -> EventStream<'scope> {
    stream.unary::<EventBuilder, _, _, _>(Pipeline, "TagWatermarks", move |_cap, _info| {
        move |handle, output| {
            handle.for_each(|cap, data| {
                if let Event::Watermark { from, .. } = data {
                    *from += input * workers;
                }
                output.session(&cap).give_container(data);
            });
        }
    })
}

/// The scope type operators are built in.
pub type DataflowScope<'scope> = Scope<'scope, Epoch>;

/// A timely configuration for `workers` threads in each of `hosts.len()` processes (or one).
pub fn cluster_config(
    workers: usize,
    process: usize,
    hosts: Option<Vec<String>>,
) -> timely::Config {
    let communication = match hosts {
        Some(addresses) if addresses.len() > 1 => timely::CommunicationConfig::Cluster {
            threads: workers,
            process,
            addresses,
            report: false,
            zerocopy: false,
        },
        _ if workers > 1 => timely::CommunicationConfig::Process(workers),
        _ => timely::CommunicationConfig::Thread,
    };
    timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    }
}
