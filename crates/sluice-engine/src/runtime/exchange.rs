//! Routing between workers: [`exchange_by_key`] sends rows to the worker owning their key's key
//! group (counting the bytes in flight between this process's workers) and broadcasts
//! watermarks to every worker.

use std::sync::Arc;

use arrow::array::{ArrayRef, UInt32Array};
use arrow::record_batch::RecordBatch;
use datafusion_common::hash_utils::{create_hashes, RandomState};
use sluice_sql::PhysExpr;
use timely::communication::Push;
use timely::dataflow::channels::pact::{DistributorPact, Pipeline};
use timely::dataflow::channels::pushers::exchange::Distributor;
use timely::dataflow::channels::Message;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::Scope;
use timely::progress::Stamp;

use crate::runtime::metrics::{InFlight, JobMetrics};

use super::event::*;

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
