//! Checkpoint alignment: rows of later epochs wait until the input frontier passes the
//! pending checkpoint epoch.

use std::sync::Arc;

use timely::dataflow::operators::Capability;
use timely::progress::frontier::MutableAntichain;

use super::CheckpointContext;
use crate::runtime::metrics::InFlight;
use crate::runtime::{Epoch, Event};

/// Something an operator holds, whose rows count in flight.
pub trait Held {
    fn bytes(&self) -> usize;
}

impl Held for Event {
    fn bytes(&self) -> usize {
        Event::bytes(self)
    }
}

impl Held for (usize, Event) {
    fn bytes(&self) -> usize {
        self.1.bytes()
    }
}

/// Holds rows of later epochs back until the input frontier passes the pending checkpoint
/// epoch, and a capability at that epoch until the operator has done its part. `T` is what is
/// held: an [`Event`], or an event tagged with its input for operators with two inputs. The
/// bytes held count in flight on the meter given by [`Alignment::metered`].
pub struct Alignment<T = Event> {
    pub next: Epoch,
    every: u64,
    held: Option<Capability<Epoch>>,
    stash: Vec<(Capability<Epoch>, T, usize)>,
    meter: Option<Arc<InFlight>>,
    control: Arc<crate::runtime::control::JobControl>,
}

impl<T: Held> Alignment<T> {
    pub fn new(ctx: &CheckpointContext, mut initial: Capability<Epoch>) -> Self {
        let next = ctx.next_checkpoint(ctx.base);
        initial.downgrade(&next);
        Alignment {
            next,
            every: ctx.every,
            held: Some(initial),
            stash: vec![],
            meter: None,
            control: ctx.control.clone(),
        }
    }

    /// Counts the bytes held on `meter`.
    pub fn metered(mut self, meter: Arc<InFlight>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Whether a message at `time` must wait for the pending checkpoint. It waits even when the
    /// frontier has already passed that epoch: the snapshot for it is taken only after this
    /// activation's messages are read, and must not include later epochs.
    pub fn must_wait(&self, time: Epoch) -> bool {
        self.held.is_some() && time > self.next
    }

    /// Keeps a message that must wait for the pending checkpoint (taking it with `take`); true
    /// when it was kept.
    pub fn hold(
        &mut self,
        cap: &timely::dataflow::operators::InputCapability<Epoch>,
        take: impl FnOnce() -> T,
    ) -> bool {
        let time = cap.least().copied().unwrap_or_default();
        if !self.must_wait(time) {
            return false;
        }
        if let Some(c) = cap.retain_least(0) {
            let held = take();
            let bytes = match &self.meter {
                Some(m) => {
                    let bytes = held.bytes();
                    m.add(bytes);
                    bytes
                }
                None => 0,
            };
            self.stash.push((c, held, bytes));
        }
        true
    }

    /// The pending checkpoint epoch, once every input frontier has passed it. At the end of
    /// input there are no more checkpoints, except a graceful stop's: the sources stop after it,
    /// and an operator that was not scheduled between their last two steps (a busy machine, or
    /// another worker's sources) sees its input frontier jump from that epoch straight to empty.
    pub fn due(&self, frontiers: &[&MutableAntichain<Epoch>]) -> Option<Epoch> {
        let open = frontiers.iter().any(|f| !f.frontier().is_empty());
        let stopping_here = self.control.stop_epoch() == Some(self.next);
        (self.held.is_some()
            && frontiers.iter().all(|f| !f.less_equal(&self.next))
            && (open || stopping_here))
            .then_some(self.next)
    }

    /// After the operator did its part for the pending checkpoint: moves to the next one and
    /// returns the waiting messages now due.
    pub fn advance(&mut self) -> Vec<(Capability<Epoch>, T)> {
        self.next += self.every;
        if let Some(h) = self.held.as_mut() {
            h.downgrade(&self.next);
        }
        let next = self.next;
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stash)
            .into_iter()
            .partition(|(c, _, _)| *c.time() <= next);
        self.stash = wait;
        self.release(due)
    }

    /// At the end of input: no more checkpoints; everything waiting is due.
    pub fn finish(
        &mut self,
        frontiers: &[&MutableAntichain<Epoch>],
    ) -> Vec<(Capability<Epoch>, T)> {
        if frontiers.iter().any(|f| !f.frontier().is_empty()) {
            return vec![];
        }
        self.held = None;
        let all = std::mem::take(&mut self.stash);
        self.release(all)
    }

    fn release(&self, due: Vec<(Capability<Epoch>, T, usize)>) -> Vec<(Capability<Epoch>, T)> {
        let bytes: usize = due.iter().map(|(_, _, b)| b).sum();
        if let Some(m) = &self.meter {
            m.sub(bytes);
        }
        due.into_iter().map(|(c, t, _)| (c, t)).collect()
    }
}
