//! The `nexmark` connector: the Person, Auction and Bid streams of the Nexmark benchmark.
//!
//! The three streams are one sequence of events: of every 50, one is a person, three are
//! auctions and 46 are bids. Event `i` is a pure function of the seed and `i` (a counter-seeded
//! generator), and refers only to people and auctions created before it, so the streams are
//! consistent with one another and identical for any number of workers. A table reads one stream
//! (`'nexmark.table'`); worker `w` of `n` produces that stream's rows `w, w+n, ...`.
//!
//! - Event time advances by `1 / nexmark.event-rate` per event (of all three streams); about 10%
//!   of events are delayed by up to `nexmark.max-out-of-orderness` (default 3 s).
//! - 1,000 people and 100 auctions are "in flight": sellers and bidders are recent people,
//!   bids go to recent auctions. Hot items: half of the bids go to the newest auction (ratio 2),
//!   three quarters of the sellers and of the bidders are the newest person (ratio 4).
//! - An auction lasts up to twice the time in which the next 100 auctions are created.
//! - Prices are `round(10^(6u) * 100)`; half of the bids come from the channels Apple, Google,
//!   Facebook and Baidu, half from `channel-K` (K < 10,000) with a URL that names it.
//! - `extra` pads rows to about 200 (person), 500 (auction) and 100 (bid) bytes on average.
//!
//! Its options are declared in [`CONNECTOR`].

use std::sync::Arc;

use std::fmt::Write;

use arrow::array::{ArrayRef, Int64Array, StringBuilder, TimestampMillisecondArray};
use arrow::record_batch::RecordBatch;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice_common::{Error, Result};

use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, Poll, SourceReader};

/// The `nexmark` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "nexmark",
    reads: true,
    writes: false,
    metadata: &[],
    writable_metadata: &[],
    formats: false,
    lookup: false,
    options: &[
        OptionDef {
            key: "nexmark.table",
            kind: Kind::Choice(&["person", "auction", "bid"]),
            default: None,
            side: Side::Source,
            identity: true,
            doc: "which stream the table reads",
        },
        OptionDef {
            key: "nexmark.events",
            kind: Kind::Count,
            default: None,
            side: Side::Source,
            identity: true,
            doc: "events of all three streams together; the source is bounded when set",
        },
        OptionDef {
            key: "rows-per-second",
            kind: Kind::Rate,
            default: Some("0"),
            side: Side::Source,
            identity: false,
            doc: "pacing of this table's rows (`0`: as fast as possible)",
        },
        OptionDef {
            key: "nexmark.event-rate",
            kind: Kind::Number,
            default: Some("10000"),
            side: Side::Source,
            identity: true,
            doc: "events per second of event time",
        },
        OptionDef {
            key: "nexmark.max-out-of-orderness",
            kind: Kind::Duration,
            default: Some("3 s"),
            side: Side::Source,
            identity: true,
            doc: "how late a delayed event (about 10%) may be",
        },
        OptionDef {
            key: "seed",
            kind: Kind::Count,
            default: Some("7"),
            side: Side::Source,
            identity: true,
            doc: "the streams are a pure function of the seed",
        },
        OptionDef {
            key: "start-time",
            kind: Kind::Timestamp,
            default: Some("2026-11-11 00:00:00"),
            side: Side::Source,
            identity: true,
            doc: "the event time of the first event (UTC)",
        },
    ],
};

const PROPORTION: u64 = 50;
const PERSONS: u64 = 1;
const AUCTIONS: u64 = 3;
/// The first person and auction ids.
const FIRST_ID: i64 = 1000;
const ACTIVE_PEOPLE: u64 = 1000;
const IN_FLIGHT_AUCTIONS: u64 = 100;
const HOT_AUCTION_RATIO: u64 = 2;
const HOT_SELLER_RATIO: u64 = 4;
const HOT_BIDDER_RATIO: u64 = 4;
const FIRST_CATEGORY: i64 = 10;
const CATEGORIES: i64 = 5;
const CHANNELS: u64 = 10_000;
const HOT_CHANNELS: [&str; 4] = ["Apple", "Google", "Facebook", "Baidu"];
/// The hot channels as their URLs spell them.
const HOT_CHANNELS_LOWER: [&str; 4] = ["apple", "google", "facebook", "baidu"];
const FIRST_NAMES: [&str; 11] = [
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
];
const LAST_NAMES: [&str; 9] = [
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris",
];
const CITIES: [&str; 10] = [
    "Phoenix",
    "Los Angeles",
    "San Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
    "Kent",
    "Cheyenne",
];
const STATES: [&str; 6] = ["AZ", "CA", "ID", "OR", "WA", "WY"];

/// Which of the three streams a table reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Person,
    Auction,
    Bid,
}

impl Stream {
    fn columns(self) -> &'static [&'static str] {
        match self {
            Stream::Person => &[
                "id",
                "name",
                "emailAddress",
                "creditCard",
                "city",
                "state",
                "dateTime",
                "extra",
            ],
            Stream::Auction => &[
                "id",
                "itemName",
                "description",
                "initialBid",
                "reserve",
                "dateTime",
                "expires",
                "seller",
                "category",
                "extra",
            ],
            Stream::Bid => &[
                "auction", "bidder", "price", "channel", "url", "dateTime", "extra",
            ],
        }
    }

    /// The global event index of this stream's `k`-th row.
    fn event(self, k: u64) -> u64 {
        match self {
            Stream::Person => k * PROPORTION,
            Stream::Auction => (k / AUCTIONS) * PROPORTION + PERSONS + k % AUCTIONS,
            Stream::Bid => {
                let per = PROPORTION - PERSONS - AUCTIONS;
                (k / per) * PROPORTION + PERSONS + AUCTIONS + k % per
            }
        }
    }

    /// This stream's rows among the first `events` events.
    fn rows_in(self, events: u64) -> u64 {
        match self {
            Stream::Person => persons_before(events),
            Stream::Auction => auctions_before(events),
            Stream::Bid => events - persons_before(events) - auctions_before(events),
        }
    }
}

/// People created by events before `i`.
fn persons_before(i: u64) -> u64 {
    (i / PROPORTION) * PERSONS + (i % PROPORTION).min(PERSONS)
}

/// Auctions created by events before `i`.
fn auctions_before(i: u64) -> u64 {
    (i / PROPORTION) * AUCTIONS + (i % PROPORTION).saturating_sub(PERSONS).min(AUCTIONS)
}

/// A recent id among `created` (the newest `active` ones), or the hot one (the newest, rounded
/// down to a multiple of `ratio`) with probability `(ratio - 1) / ratio`.
fn pick_id(rng: &mut SmallRng, created: u64, active: u64, ratio: u64) -> i64 {
    let last = created.saturating_sub(1);
    let base0 = if rng.random_range(0..ratio) > 0 {
        (last / ratio) * ratio
    } else {
        let active = active.min(created).max(1);
        created.saturating_sub(active) + rng.random_range(0..active)
    };
    FIRST_ID + base0.min(last) as i64
}

/// Writes `n` random lowercase letters.
fn letters(rng: &mut SmallRng, n: usize, out: &mut StringBuilder) {
    let mut buf = [0u8; 64];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(buf.len());
        for b in &mut buf[..chunk] {
            *b = b'a' + rng.random_range(0..26u8);
        }
        out.append_slice(&buf[..chunk]);
        left -= chunk;
    }
}

/// Padding that brings a row of `size` bytes to `average` on average.
fn extra(rng: &mut SmallRng, size: usize, average: usize, out: &mut StringBuilder) {
    let room = average.saturating_sub(size);
    let n = rng.random_range(0..=2 * room);
    letters(rng, n, out);
}

fn price(rng: &mut SmallRng) -> i64 {
    (10f64.powf(rng.random::<f64>() * 6.0) * 100.0).round() as i64
}

/// This worker's slice of one Nexmark stream.
pub struct NexmarkSource {
    table: String,
    schema: arrow::datatypes::SchemaRef,
    stream: Stream,
    seed: u64,
    cursor: crate::GeneratorCursor,
    start_ms: i64,
    /// Event-time milliseconds per event (of all streams).
    gap_ms: f64,
    disorder_ms: i64,
}

impl NexmarkSource {
    pub fn open(
        spec: &ConnectorSpec,
        opts: &mut Options,
        worker: usize,
        workers: usize,
    ) -> Result<Self> {
        let stream = match opts.required("nexmark.table")?.as_str() {
            "person" => Stream::Person,
            "auction" => Stream::Auction,
            "bid" => Stream::Bid,
            other => {
                return Err(opts.error(format!(
                    "option 'nexmark.table' = '{other}': use 'person', 'auction' or 'bid'"
                )))
            }
        };
        for f in spec.schema.fields() {
            if !stream.columns().contains(&f.name().as_str()) {
                return Err(Error::connector(
                    &spec.table,
                    format!(
                        "the nexmark {stream:?} stream has no column '{}' (it has: {})",
                        f.name(),
                        stream.columns().join(", ")
                    ),
                ));
            }
        }
        let events: Option<u64> = opts.optional("nexmark.events")?;
        let rate: f64 = opts.value("rows-per-second")?;
        let event_rate: f64 = opts.value("nexmark.event-rate")?;
        if event_rate <= 0.0 {
            return Err(opts.error("'nexmark.event-rate' must be positive"));
        }
        let disorder_ms = opts
            .duration_ms("nexmark.max-out-of-orderness")?
            .expect("declared default");
        let seed: u64 = opts.value("seed")?;
        let start_ms = opts.timestamp_ms("start-time")?;
        Ok(NexmarkSource {
            table: spec.table.clone(),
            schema: spec.schema.clone(),
            stream,
            seed,
            cursor: crate::GeneratorCursor::new(
                &spec.table,
                worker,
                workers,
                events.map(|e| stream.rows_in(e)),
                rate,
            ),
            start_ms,
            gap_ms: 1000.0 / event_rate,
            disorder_ms,
        })
    }

    fn rng(&self, event: u64) -> SmallRng {
        SmallRng::seed_from_u64(
            self.seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(event.wrapping_mul(0xBF58_476D_1CE4_E5B9)),
        )
    }

    /// Event time of event `i`, delayed for about 10% of events.
    fn time(&self, i: u64, rng: &mut SmallRng) -> i64 {
        let t = self.start_ms + (i as f64 * self.gap_ms) as i64;
        if self.disorder_ms > 0 && rng.random_range(0..10) == 0 {
            t - rng.random_range(0..=self.disorder_ms)
        } else {
            t
        }
    }
}

/// Strings are appended to a builder in pieces (no allocation per value): `append_slice`
/// adds to the value being written and `end` finishes it.
trait Pieces {
    fn append_slice(&mut self, bytes: &[u8]);
    /// Finishes the value; returns its length in bytes.
    fn end(&mut self) -> usize;
}

impl Pieces for StringBuilder {
    fn append_slice(&mut self, bytes: &[u8]) {
        // Only ASCII (letters, digits, constants) is written.
        debug_assert!(bytes.is_ascii());
        let _ = self.write_str(std::str::from_utf8(bytes).unwrap_or_default());
    }
    fn end(&mut self) -> usize {
        let start = *self.offsets_slice().last().unwrap_or(&0) as usize;
        let len = self.values_slice().len() - start;
        self.append_value("");
        len
    }
}

/// One column of a generated batch.
enum Column {
    Int(Vec<i64>),
    Time(Vec<i64>),
    Str(StringBuilder),
}

/// Columns of a generated batch, by name (a handful: found by a short scan).
struct Columns {
    rows: usize,
    columns: Vec<(&'static str, Column)>,
}

impl Columns {
    fn new(rows: usize) -> Self {
        Columns {
            rows,
            columns: Vec::with_capacity(10),
        }
    }

    fn column(&mut self, name: &'static str, make: impl FnOnce(usize) -> Column) -> &mut Column {
        let at = match self.columns.iter().position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                self.columns.push((name, make(self.rows)));
                self.columns.len() - 1
            }
        };
        &mut self.columns[at].1
    }

    fn int(&mut self, name: &'static str, v: i64) {
        if let Column::Int(c) = self.column(name, |n| Column::Int(Vec::with_capacity(n))) {
            c.push(v);
        }
    }

    fn time(&mut self, name: &'static str, v: i64) {
        if let Column::Time(c) = self.column(name, |n| Column::Time(Vec::with_capacity(n))) {
            c.push(v);
        }
    }

    /// The builder of string column `name`, to write one value into (then `end` it).
    fn text(&mut self, name: &'static str) -> &mut StringBuilder {
        let c = self.column(name, |n| {
            Column::Str(StringBuilder::with_capacity(n, n * 16))
        });
        match c {
            Column::Str(b) => b,
            _ => unreachable!("column '{name}' is generated as a string"),
        }
    }

    /// Appends a whole string value to column `name`; returns its length.
    fn string(&mut self, name: &'static str, v: &str) -> usize {
        self.text(name).append_value(v);
        v.len()
    }

    fn take(&mut self, name: &str) -> Option<ArrayRef> {
        let at = self.columns.iter().position(|(n, _)| *n == name)?;
        Some(match self.columns.swap_remove(at).1 {
            Column::Int(v) => Arc::new(Int64Array::from(v)),
            Column::Time(v) => Arc::new(TimestampMillisecondArray::from(v)),
            Column::Str(mut b) => Arc::new(b.finish()),
        })
    }
}

impl SourceReader for NexmarkSource {
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
        let mut cols = Columns::new(n as usize);
        for _ in 0..n {
            let k = self.cursor.take();
            let i = self.stream.event(k);
            let mut rng = self.rng(i);
            let t = self.time(i, &mut rng);
            match self.stream {
                Stream::Person => {
                    let first = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
                    let last = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
                    let name = cols.text("name");
                    let _ = write!(name, "{first} {last}");
                    let mut size = name.end();
                    let email = cols.text("emailAddress");
                    letters(&mut rng, 7, email);
                    email.append_slice(b"@");
                    letters(&mut rng, 5, email);
                    email.append_slice(b".com");
                    size += email.end();
                    let card = cols.text("creditCard");
                    for part in 0..4 {
                        let sep = if part == 0 { "" } else { " " };
                        let _ = write!(card, "{sep}{:04}", rng.random_range(0..10_000));
                    }
                    size += card.end();
                    size += cols.string("city", CITIES[rng.random_range(0..CITIES.len())]);
                    size += cols.string("state", STATES[rng.random_range(0..STATES.len())]);
                    let size = 8 + size + 8;
                    cols.int("id", FIRST_ID + k as i64);
                    let pad = cols.text("extra");
                    extra(&mut rng, size, 200, pad);
                    pad.end();
                    cols.time("dateTime", t);
                }
                Stream::Auction => {
                    let seller = pick_id(
                        &mut rng,
                        persons_before(i).max(1),
                        ACTIVE_PEOPLE,
                        HOT_SELLER_RATIO,
                    );
                    let initial = price(&mut rng);
                    let reserve = initial + price(&mut rng);
                    // Up to twice the time in which the next 100 auctions are created.
                    let horizon = (IN_FLIGHT_AUCTIONS * PROPORTION / AUCTIONS) as f64 * self.gap_ms;
                    let length = 1 + rng.random_range(0..=((2.0 * horizon) as i64).max(1));
                    let (item_len, description_len) =
                        (rng.random_range(5..20), rng.random_range(20..100));
                    let item = cols.text("itemName");
                    letters(&mut rng, item_len, item);
                    item.end();
                    let description = cols.text("description");
                    letters(&mut rng, description_len, description);
                    description.end();
                    let size = 8 + item_len + description_len + 8 + 8 + 8 + 8 + 8 + 8;
                    cols.int("id", FIRST_ID + k as i64);
                    let pad = cols.text("extra");
                    extra(&mut rng, size, 500, pad);
                    pad.end();
                    cols.int("initialBid", initial);
                    cols.int("reserve", reserve);
                    cols.time("dateTime", t);
                    cols.time("expires", t + length);
                    cols.int("seller", seller);
                    cols.int("category", FIRST_CATEGORY + rng.random_range(0..CATEGORIES));
                }
                Stream::Bid => {
                    let auction = pick_id(
                        &mut rng,
                        auctions_before(i).max(1),
                        IN_FLIGHT_AUCTIONS,
                        HOT_AUCTION_RATIO,
                    );
                    let bidder = pick_id(
                        &mut rng,
                        persons_before(i).max(1),
                        ACTIVE_PEOPLE,
                        HOT_BIDDER_RATIO,
                    );
                    let price = price(&mut rng);
                    let size = if rng.random_bool(0.5) {
                        let at = rng.random_range(0..HOT_CHANNELS.len());
                        let channel = cols.string("channel", HOT_CHANNELS[at]);
                        let url = cols.text("url");
                        let _ = write!(
                            url,
                            "https://www.nexmark.com/{}/item.htm?query=1",
                            HOT_CHANNELS_LOWER[at]
                        );
                        channel + url.end()
                    } else {
                        let c = rng.random_range(0..CHANNELS);
                        let channel = cols.text("channel");
                        let _ = write!(channel, "channel-{c}");
                        let channel = channel.end();
                        let url = cols.text("url");
                        url.append_slice(b"https://www.nexmark.com/");
                        for _ in 0..3 {
                            letters(&mut rng, 5, url);
                            url.append_slice(b"/");
                        }
                        let _ = write!(url, "item.htm?query=1&channel_id={c}");
                        channel + url.end()
                    };
                    let size = 8 + 8 + 8 + size + 8;
                    cols.int("auction", auction);
                    cols.int("bidder", bidder);
                    cols.int("price", price);
                    let pad = cols.text("extra");
                    extra(&mut rng, size, 100, pad);
                    pad.end();
                    cols.time("dateTime", t);
                }
            }
        }
        let mut columns: Vec<ArrayRef> = vec![];
        for f in self.schema.fields() {
            let name = f.name().as_str();
            let Some(col) = cols.take(name) else {
                return Err(Error::connector(
                    &self.table,
                    format!("internal: the nexmark generator made no column '{name}'"),
                ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_partition_the_event_sequence() {
        // Every event index belongs to exactly one stream, and counts agree with the mapping.
        let n = 5 * PROPORTION + 17;
        let mut seen = vec![0u8; n as usize];
        for s in [Stream::Person, Stream::Auction, Stream::Bid] {
            for k in 0..s.rows_in(n) {
                seen[s.event(k) as usize] += 1;
            }
        }
        assert!(seen.iter().all(|c| *c == 1));
        assert_eq!(Stream::Person.rows_in(PROPORTION), 1);
        assert_eq!(Stream::Auction.rows_in(PROPORTION), 3);
        assert_eq!(Stream::Bid.rows_in(PROPORTION), 46);
    }

    #[test]
    fn references_point_backwards() {
        let mut rng = SmallRng::seed_from_u64(1);
        for created in [1u64, 2, 5, 1000, 5000] {
            for _ in 0..200 {
                let id = pick_id(&mut rng, created, ACTIVE_PEOPLE, HOT_BIDDER_RATIO);
                assert!(id >= FIRST_ID && id < FIRST_ID + created as i64);
            }
        }
    }
}
