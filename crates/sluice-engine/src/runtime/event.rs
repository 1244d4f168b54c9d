//! What flows on every edge of the dataflow: [`Event`], a changelog batch or a watermark,
//! with its wire encoding between processes. Timestamps are epochs (`u64`): short intervals of
//! processing time.

use std::io::Write;
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, Int8Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use sluice_common::ChangeBatch;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::ContainerBytes;
use timely::dataflow::Stream;
use timely::Accountable;

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
    pub(crate) metered: usize,
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

pub(crate) fn event_bytes(batch: &ChangeBatch) -> usize {
    batch.data.get_array_memory_size() + batch.ops.as_ref().map_or(0, |o| o.get_array_memory_size())
}
