//! The `ecommerce` connector: a realistic Double-11 order stream for the demo and benchmarks.
//!
//! Columns are chosen by name from: `order_id`, `user_id`, `item_id`, `category`, `province`,
//! `amount`, `quantity`, `event_time`. Provinces and users are skewed, amounts are lognormal,
//! and about 10% of orders arrive late by up to `max-out-of-orderness`.
//!
//! Row `i` of the stream is a pure function of `seed` and `i`, so the same options give the same
//! rows with any number of workers (worker `w` of `n` produces rows `w, w+n, w+2n, ...`).
//!
//! Its options are declared in [`CONNECTOR`].

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, StringArray, TimestampMillisecondArray,
};
use arrow::record_batch::RecordBatch;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};
use sluice_common::Result;

use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SourceReader};

/// The `ecommerce` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "ecommerce",
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
            doc: "wall-clock pacing for the whole table (`0`: as fast as possible)",
        },
        OptionDef {
            key: "number-of-rows",
            kind: Kind::Count,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "orders in all; the source is bounded when set",
        },
        OptionDef {
            key: "speed-up",
            kind: Kind::Number,
            default: Some("1"),
            side: Side::Source,
            identity: true,
            doc: "paced: event time runs this many times faster than wall time",
        },
        OptionDef {
            key: "event-rate",
            kind: Kind::Number,
            default: Some("1000"),
            side: Side::Source,
            identity: true,
            doc: "unpaced: orders per second of event time",
        },
        OptionDef {
            key: "max-out-of-orderness",
            kind: Kind::Duration,
            default: Some("3 s"),
            side: Side::Source,
            identity: true,
            doc: "how late a delayed order (about 10%) may arrive",
        },
        OptionDef {
            key: "seed",
            kind: Kind::Count,
            default: Some("11"),
            side: Side::Source,
            identity: true,
            doc: "the stream is a pure function of the seed",
        },
        OptionDef {
            key: "start-time",
            kind: Kind::Timestamp,
            default: Some("2026-11-11 00:00:00"),
            side: Side::Source,
            identity: true,
            doc: "the event time of the first order (UTC)",
        },
    ],
};

/// Product categories and their share of orders.
pub const CATEGORIES: [(&str, u32); 8] = [
    ("electronics", 22),
    ("apparel", 20),
    ("beauty", 14),
    ("home", 12),
    ("food", 12),
    ("sports", 8),
    ("books", 6),
    ("toys", 6),
];

/// Provinces and their weight: a few coastal provinces dominate, as on a real festival night.
pub const PROVINCES: [(&str, u32); 12] = [
    ("Guangdong", 30),
    ("Zhejiang", 22),
    ("Jiangsu", 18),
    ("Shanghai", 14),
    ("Beijing", 12),
    ("Shandong", 9),
    ("Fujian", 7),
    ("Sichuan", 6),
    ("Hubei", 4),
    ("Henan", 4),
    ("Hunan", 3),
    ("Shaanxi", 2),
];

const COLUMNS: [&str; 8] = [
    "order_id",
    "user_id",
    "item_id",
    "category",
    "province",
    "amount",
    "quantity",
    "event_time",
];

/// This worker's slice of the order stream.
pub struct EcommerceSource {
    schema: arrow::datatypes::SchemaRef,
    seed: u64,
    cursor: crate::GeneratorCursor,
    start_ms: i64,
    /// Event-time milliseconds between consecutive orders.
    gap_ms: f64,
    disorder_ms: i64,
    amounts: LogNormal<f64>,
}

fn pick(weights: &[(&'static str, u32)], r: u32) -> &'static str {
    let total: u32 = weights.iter().map(|w| w.1).sum();
    let mut x = r % total;
    for (name, w) in weights {
        if x < *w {
            return name;
        }
        x -= w;
    }
    weights[0].0
}

impl EcommerceSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        for f in spec.schema.fields() {
            if !COLUMNS.contains(&f.name().as_str()) {
                return Err(opts.error(format!(
                    "the ecommerce generator has no column '{}' (it has: {})",
                    f.name(),
                    COLUMNS.join(", ")
                )));
            }
        }
        let rate: f64 = opts.value("rows-per-second")?;
        let speed_up: f64 = opts.value("speed-up")?;
        let event_rate: f64 = opts.value("event-rate")?;
        let total: Option<u64> = opts.optional("number-of-rows")?;
        let seed: u64 = opts.value("seed")?;
        let disorder_ms = opts
            .duration_ms("max-out-of-orderness")?
            .expect("declared default");
        let start_ms = opts.timestamp_ms("start-time")?;
        if speed_up <= 0.0 || event_rate <= 0.0 {
            return Err(opts.error("'speed-up' and 'event-rate' must be positive"));
        }
        // Paced: event time runs `speed-up` times faster than the wall clock.
        let events_per_event_second = if rate > 0.0 {
            rate / speed_up
        } else {
            event_rate
        };
        Ok(EcommerceSource {
            schema: spec.schema.clone(),
            seed,
            cursor: crate::GeneratorCursor::new(&spec.table, worker, workers, total, rate),
            start_ms,
            gap_ms: 1000.0 / events_per_event_second,
            disorder_ms,
            amounts: LogNormal::new(4.2, 0.9).expect("valid lognormal"),
        })
    }
}

impl SourceReader for EcommerceSource {
    fn offsets(&self) -> crate::SourceOffsets {
        self.cursor.offsets()
    }

    fn seek(&mut self, offsets: &crate::SourceOffsets) -> Result<()> {
        self.cursor.seek(offsets)
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        let Some(n) = self.cursor.budget(max_rows) else {
            return Ok(Poll::Finished);
        };
        if n == 0 {
            return Ok(Poll::Idle);
        }
        let n = n as usize;
        let (mut order, mut user, mut item, mut cat, mut prov, mut amount, mut qty, mut ts) = (
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
            vec![],
        );
        for _ in 0..n {
            let i = self.cursor.take();
            let mut rng =
                SmallRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i);
            order.push(i as i64 + 1);
            let u: f64 = rng.random();
            user.push(1 + (u * u * u * 200_000.0) as i64);
            item.push(rng.random_range(1..=50_000i64));
            cat.push(pick(&CATEGORIES, rng.random()));
            prov.push(pick(&PROVINCES, rng.random()));
            amount.push((self.amounts.sample(&mut rng) * 100.0).round() / 100.0);
            qty.push(rng.random_range(1..=5i32));
            let mut t = self.start_ms + (i as f64 * self.gap_ms) as i64;
            if self.disorder_ms > 0 && rng.random_bool(0.1) {
                t -= rng.random_range(0..=self.disorder_ms);
            }
            ts.push(t);
        }
        let mut columns: Vec<ArrayRef> = vec![];
        for f in self.schema.fields() {
            let col: ArrayRef = match f.name().as_str() {
                "order_id" => Arc::new(Int64Array::from(order.clone())),
                "user_id" => Arc::new(Int64Array::from(user.clone())),
                "item_id" => Arc::new(Int64Array::from(item.clone())),
                "category" => Arc::new(StringArray::from(cat.clone())),
                "province" => Arc::new(StringArray::from(prov.clone())),
                "amount" => Arc::new(Float64Array::from(amount.clone())),
                "quantity" => Arc::new(Int32Array::from(qty.clone())),
                _ => Arc::new(TimestampMillisecondArray::from(ts.clone())),
            };
            let col = if col.data_type() != f.data_type() {
                arrow::compute::cast(&col, f.data_type())?
            } else {
                col
            };
            columns.push(col);
        }
        Ok(Poll::Batch {
            split: 0,
            batch: RecordBatch::try_new(self.schema.clone(), columns)?,
        })
    }
}
