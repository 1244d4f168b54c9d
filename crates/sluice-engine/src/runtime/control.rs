//! How a running job is stopped, apart from its counters: the first error (every worker stops
//! when one is set), a request to stop (cancel), the checkpoint epoch after which a graceful
//! stop ends the sources, and checkpoints whose files could not be written. One `JobControl`
//! is shared by the workers and threads of a process, and by whoever runs the job (a signal
//! handler, later the platform's supervisor).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sluice_common::Error;

#[derive(Debug)]
pub struct JobControl {
    error: Mutex<Option<Error>>,
    cancelled: AtomicBool,
    /// The checkpoint epoch after which the sources of this process stop (graceful stop).
    stop_epoch: AtomicU64,
    checkpoint_failures: Mutex<BTreeMap<u64, Error>>,
    /// The process's sources together read at most this many rows per second.
    pub ingest: IngestLimit,
    /// Checkpoints asked for so far ([`JobControl::request_checkpoint`]).
    checkpoint_requests: AtomicU64,
}

/// A token bucket over the rows the process's sources read, shared by all of them: a source
/// reads only while the bucket holds tokens, so rows are delayed, never dropped. The rate may
/// change while the job runs (the platform splits a tenant's rate among its pipelines).
#[derive(Debug)]
pub struct IngestLimit {
    /// Rows per second; 0: no limit.
    rate: AtomicU64,
    /// Tokens (may go below zero by one batch) and when they were last refilled.
    bucket: Mutex<(f64, std::time::Instant)>,
}

impl Default for IngestLimit {
    fn default() -> Self {
        IngestLimit {
            rate: AtomicU64::new(0),
            bucket: Mutex::new((0.0, std::time::Instant::now())),
        }
    }
}

impl IngestLimit {
    /// Sets the rate (rows per second; 0 lifts the limit).
    pub fn set_rate(&self, rows_per_second: u64) {
        self.rate.store(rows_per_second, Ordering::Relaxed);
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// `None` when a source may read now; otherwise how long until it may.
    pub fn wait(&self) -> Option<std::time::Duration> {
        let rate = self.rate();
        if rate == 0 {
            return None;
        }
        let mut b = self.bucket.lock().expect("ingest limit");
        let now = std::time::Instant::now();
        // At most a tenth of a second's worth saved up: bursts stay short.
        let burst = (rate as f64 / 10.0).max(1.0);
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate as f64).min(burst);
        b.1 = now;
        if b.0 > 0.0 {
            return None;
        }
        Some(
            std::time::Duration::from_secs_f64((-b.0 + 1.0) / rate as f64)
                .max(std::time::Duration::from_millis(1)),
        )
    }

    /// Takes `rows` tokens for rows just read.
    pub fn consume(&self, rows: usize) {
        if self.rate() == 0 {
            return;
        }
        self.bucket.lock().expect("ingest limit").0 -= rows as f64;
    }
}

impl Default for JobControl {
    fn default() -> Self {
        JobControl {
            error: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            stop_epoch: AtomicU64::new(u64::MAX),
            checkpoint_failures: Mutex::new(BTreeMap::new()),
            ingest: IngestLimit::default(),
            checkpoint_requests: AtomicU64::new(0),
        }
    }
}

impl JobControl {
    pub fn new() -> Arc<Self> {
        Arc::new(JobControl::default())
    }

    /// Asks for a checkpoint now rather than at the next interval: each source of the process,
    /// at the end of its current epoch, skips the empty epochs up to the next checkpoint epoch.
    /// The checkpoint epochs stay those of the interval, so operators, other processes and
    /// restores see nothing new; the next one only comes sooner.
    pub fn request_checkpoint(&self) {
        self.checkpoint_requests.fetch_add(1, Ordering::SeqCst);
    }

    /// How many checkpoints were asked for.
    pub fn checkpoint_requests(&self) -> u64 {
        self.checkpoint_requests.load(Ordering::SeqCst)
    }

    /// Records the first failure: the job stops with it.
    pub fn fail(&self, e: Error) {
        let mut slot = self.error.lock().expect("job control");
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// True once anything failed.
    pub fn failed(&self) -> bool {
        self.error.lock().expect("job control").is_some()
    }

    /// The failure, taken (the job ends with it).
    pub fn take_error(&self) -> Option<Error> {
        self.error.lock().expect("job control").take()
    }

    /// The failure's message, if any, leaving it in place.
    pub fn error_message(&self) -> Option<String> {
        self.error
            .lock()
            .ok()
            .and_then(|e| e.as_ref().map(|e| e.to_string()))
    }

    /// Asks the job to stop gracefully: sources stop, sinks publish what they have.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// True once [`JobControl::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// After a cancel: proposes that the sources stop after checkpoint `epoch`. The first
    /// proposal of the process wins; returns it.
    pub fn propose_stop(&self, epoch: u64) -> u64 {
        let _ =
            self.stop_epoch
                .compare_exchange(u64::MAX, epoch, Ordering::SeqCst, Ordering::SeqCst);
        self.stop_epoch.load(Ordering::SeqCst)
    }

    /// The checkpoint epoch the sources stop after (`None` before a graceful stop began).
    pub fn stop_epoch(&self) -> Option<u64> {
        Some(self.stop_epoch.load(Ordering::SeqCst)).filter(|e| *e != u64::MAX)
    }

    /// Records that an operator could not write its part of checkpoint `epoch`.
    pub fn checkpoint_failed(&self, epoch: u64, e: Error) {
        tracing::warn!("checkpoint {epoch} failed: {e}");
        self.checkpoint_failures
            .lock()
            .expect("job control")
            .entry(epoch)
            .or_insert(e);
    }

    /// Whether checkpoint `epoch` failed (forgetting it).
    pub fn take_checkpoint_failure(&self, epoch: u64) -> bool {
        self.checkpoint_failures
            .lock()
            .expect("job control")
            .remove(&epoch)
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_stands_and_the_first_stop_proposal_wins() {
        let c = JobControl::new();
        assert!(!c.failed());
        c.fail(Error::Runtime("first".into()));
        c.fail(Error::Runtime("second".into()));
        assert_eq!(c.error_message().as_deref(), Some("first"));
        assert_eq!(c.stop_epoch(), None);
        assert_eq!(c.propose_stop(40), 40);
        assert_eq!(
            c.propose_stop(60),
            40,
            "every source stops after the same epoch"
        );
        assert_eq!(c.stop_epoch(), Some(40));
    }
}
