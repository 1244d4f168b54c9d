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
}

impl Default for JobControl {
    fn default() -> Self {
        JobControl {
            error: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            stop_epoch: AtomicU64::new(u64::MAX),
            checkpoint_failures: Mutex::new(BTreeMap::new()),
        }
    }
}

impl JobControl {
    pub fn new() -> Arc<Self> {
        Arc::new(JobControl::default())
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
