//! The `datagen` connector, with Flink's options: `rows-per-second`, `number-of-rows`, and per
//! field `fields.<f>.kind` (`random` or `sequence`), `min`/`max`, `length`, `start`/`end`.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array,
    Int8Array, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_common::Result;

use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SourceReader};

/// The `datagen` connector's options (Flink's names).
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "datagen",
    reads: true,
    writes: false,
    metadata: &[],
    writable_metadata: &[],
    formats: false,
    lookup: false,
    options: &[
        OptionDef {
            key: "rows-per-second",
            kind: Kind::Rate,
            default: Some("10000"),
            side: Side::Source,
            identity: false,
            doc: "rows per second for the whole table (`0`: as fast as possible)",
        },
        OptionDef {
            key: "number-of-rows",
            kind: Kind::Count,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "rows in all; the source is bounded when set",
        },
        OptionDef {
            key: "fields.<name>.kind",
            kind: Kind::Choice(&["random", "sequence"]),
            default: Some("random"),
            side: Side::Source,
            identity: true,
            doc: "how column `<name>` is generated",
        },
        OptionDef {
            key: "fields.<name>.min",
            kind: Kind::Number,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "random: the smallest value (default: the type's smallest for TINYINT, SMALLINT and INT, else 0)",
        },
        OptionDef {
            key: "fields.<name>.max",
            kind: Kind::Number,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "random: the largest value (default: the type's largest for TINYINT, SMALLINT and INT, else 1000000)",
        },
        OptionDef {
            key: "fields.<name>.length",
            kind: Kind::Count,
            default: Some("100"),
            side: Side::Source,
            identity: true,
            doc: "random: the length of a string",
        },
        OptionDef {
            key: "fields.<name>.start",
            kind: Kind::Number,
            default: Some("0"),
            side: Side::Source,
            identity: true,
            doc: "sequence: the first value",
        },
        OptionDef {
            key: "fields.<name>.end",
            kind: Kind::Number,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "sequence: the last value (default: unbounded)",
        },
    ],
};

/// Paces a generator to a rate (rows per second; 0 means as fast as possible).
pub struct Pacer {
    rate: f64,
    start: Instant,
}

impl Pacer {
    pub fn new(rate: f64) -> Self {
        Pacer {
            rate,
            start: Instant::now(),
        }
    }

    /// How many rows may have been produced by now.
    pub fn allowed(&self) -> u64 {
        if self.rate <= 0.0 {
            u64::MAX
        } else {
            (self.start.elapsed().as_secs_f64() * self.rate) as u64 + 1
        }
    }
}

enum FieldGen {
    Random { min: f64, max: f64, length: usize },
    Sequence { start: i64, end: i64 },
}

/// Generates rows for this worker: sequences are dealt out so workers never repeat a value.
pub struct DatagenSource {
    spec: ConnectorSpec,
    fields: Vec<FieldGen>,
    rng: SmallRng,
    /// Rows this worker must produce (`None`: unbounded).
    limit: Option<u64>,
    produced: u64,
    worker: u64,
    workers: u64,
    pacer: Pacer,
}

impl DatagenSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let rate: f64 = opts.value("rows-per-second")?;
        let total: Option<u64> = opts.optional("number-of-rows")?;
        let mut fields = vec![];
        for f in spec.schema.fields() {
            let key = |k: &str| format!("fields.{}.{}", f.name(), k);
            let kind: String = opts.value(&key("kind"))?;
            let gen = match kind.as_str() {
                "sequence" => {
                    let start = opts.value(&key("start"))?;
                    let end = opts.value_or(&key("end"), i64::MAX)?;
                    if end < start {
                        return Err(opts.error(format!(
                            "'{}' must not be below '{}'",
                            key("end"),
                            key("start")
                        )));
                    }
                    FieldGen::Sequence { start, end }
                }
                "random" => {
                    let (dmin, dmax) = match f.data_type() {
                        DataType::Int8 => (i8::MIN as f64, i8::MAX as f64),
                        DataType::Int16 => (i16::MIN as f64, i16::MAX as f64),
                        DataType::Int32 => (i32::MIN as f64, i32::MAX as f64),
                        _ => (0.0, 1_000_000.0),
                    };
                    let min = opts.value_or(&key("min"), dmin)?;
                    let max = opts.value_or(&key("max"), dmax)?;
                    if max < min {
                        return Err(opts.error(format!(
                            "'{}' must not be below '{}'",
                            key("max"),
                            key("min")
                        )));
                    }
                    FieldGen::Random {
                        min,
                        max,
                        length: opts.value(&key("length"))?,
                    }
                }
                other => {
                    return Err(opts.error(format!(
                        "'{}' = '{other}': use 'random' or 'sequence'",
                        key("kind")
                    )))
                }
            };
            if !matches!(
                f.data_type(),
                DataType::Boolean
                    | DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Float32
                    | DataType::Float64
                    | DataType::Utf8
                    | DataType::Timestamp(_, _)
            ) {
                return Err(opts.error(format!(
                    "datagen cannot generate column '{}' of type {}",
                    f.name(),
                    f.data_type()
                )));
            }
            fields.push(gen);
        }
        // A sequence bounds the rows as in Flink.
        let seq_len = fields
            .iter()
            .filter_map(|g| match g {
                FieldGen::Sequence { start, end } if *end != i64::MAX => {
                    Some((end - start + 1) as u64)
                }
                _ => None,
            })
            .min();
        let total = match (total, seq_len) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let (w, n) = (worker as u64, workers as u64);
        let limit = total.map(|t| t / n + u64::from(w < t % n));
        Ok(DatagenSource {
            spec: spec.clone(),
            fields,
            rng: SmallRng::seed_from_u64(0x5eed ^ w),
            limit,
            produced: 0,
            worker: w,
            workers: n,
            pacer: Pacer::new(rate / n as f64),
        })
    }
}

impl SourceReader for DatagenSource {
    fn offsets(&self) -> crate::SourceOffsets {
        crate::generator_offsets(self.worker, self.workers, self.produced)
    }

    fn seek(&mut self, offsets: &crate::SourceOffsets) -> Result<()> {
        self.produced =
            crate::generator_seek(&self.spec.table, offsets, self.worker, self.workers)?;
        Ok(())
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        let remaining = self.limit.map(|l| l - self.produced).unwrap_or(u64::MAX);
        if remaining == 0 {
            return Ok(Poll::Finished);
        }
        let allowed = self.pacer.allowed().saturating_sub(self.produced);
        let n = (max_rows as u64).min(remaining).min(allowed) as usize;
        if n == 0 {
            return Ok(Poll::Idle);
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut columns: Vec<ArrayRef> = vec![];
        for (f, gen) in self.spec.schema.fields().iter().zip(&self.fields) {
            let ints: Vec<i64> = match gen {
                FieldGen::Sequence { start, .. } => (0..n as u64)
                    .map(|i| start + ((self.produced + i) * self.workers + self.worker) as i64)
                    .collect(),
                FieldGen::Random { min, max, .. } => (0..n)
                    .map(|_| self.rng.random_range(*min as i64..=*max as i64))
                    .collect(),
            };
            let col: ArrayRef = match (f.data_type(), gen) {
                (DataType::Boolean, _) => Arc::new(BooleanArray::from_iter(
                    (0..n).map(|_| Some(self.rng.random_bool(0.5))),
                )),
                (DataType::Int8, _) => {
                    Arc::new(Int8Array::from_iter_values(ints.iter().map(|v| *v as i8)))
                }
                (DataType::Int16, _) => {
                    Arc::new(Int16Array::from_iter_values(ints.iter().map(|v| *v as i16)))
                }
                (DataType::Int32, _) => {
                    Arc::new(Int32Array::from_iter_values(ints.iter().map(|v| *v as i32)))
                }
                (DataType::Int64, _) => Arc::new(Int64Array::from(ints)),
                (DataType::Float32 | DataType::Float64, FieldGen::Random { min, max, .. }) => {
                    let v: Float64Array = (0..n)
                        .map(|_| Some(self.rng.random_range(*min..=*max)))
                        .collect();
                    if f.data_type() == &DataType::Float32 {
                        Arc::new(
                            v.iter()
                                .map(|x| x.map(|x| x as f32))
                                .collect::<Float32Array>(),
                        )
                    } else {
                        Arc::new(v)
                    }
                }
                (DataType::Float32 | DataType::Float64, _) => arrow::compute::cast(
                    &(Arc::new(Int64Array::from(ints)) as ArrayRef),
                    f.data_type(),
                )?,
                (DataType::Utf8, FieldGen::Random { length, .. }) => {
                    let rng = &mut self.rng;
                    Arc::new(StringArray::from_iter_values((0..n).map(|_| {
                        (0..*length)
                            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
                            .collect::<String>()
                    })))
                }
                (DataType::Utf8, _) => Arc::new(StringArray::from_iter_values(
                    ints.iter().map(|v| v.to_string()),
                )),
                (DataType::Timestamp(unit, tz), _) => {
                    let ts =
                        TimestampMillisecondArray::from(vec![now; n]).with_timezone_opt(tz.clone());
                    arrow::compute::cast(
                        &(Arc::new(ts) as ArrayRef),
                        &DataType::Timestamp(*unit, tz.clone()),
                    )?
                }
                _ => unreachable!("checked in open"),
            };
            columns.push(col);
        }
        self.produced += n as u64;
        let batch = RecordBatch::try_new(self.spec.schema.clone(), columns)?;
        Ok(Poll::Batch { split: 0, batch })
    }
}
