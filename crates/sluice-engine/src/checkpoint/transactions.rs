//! Two-phase commit for transactional sinks, tied to checkpoints.

use sluice_common::Result;
use sluice_state::checkpoint::CheckpointStore;

use super::FINISHED;
use crate::runtime::Epoch;

/// A transactional sink writer's side of two-phase commit: output of each checkpoint epoch is
/// sealed when the operator reaches it, and published once worker 0 has committed that
/// checkpoint (a newer committed checkpoint covers older sealed ones whose own checkpoint failed).
#[derive(Default)]
pub struct SinkTransactions {
    sealed: std::collections::VecDeque<Epoch>,
}

impl SinkTransactions {
    /// Seals what was written up to `epoch`.
    pub fn seal(&mut self, w: &mut dyn sluice_connectors::SinkWriter, epoch: Epoch) -> Result<()> {
        w.pre_commit(epoch)?;
        self.sealed.push_back(epoch);
        Ok(())
    }

    /// Publishes the sealed output of committed checkpoints; true while some output waits.
    pub fn publish(
        &mut self,
        w: &mut dyn sluice_connectors::SinkWriter,
        store: &CheckpointStore,
    ) -> Result<bool> {
        // What this process already knows costs nothing; then one question to storage, about
        // the newest sealed epoch (a newer commit covers older sealed output).
        let newest = self
            .sealed
            .iter()
            .rev()
            .copied()
            .find(|e| store.known_committed(*e))
            .or_else(|| {
                let e = *self.sealed.back()?;
                store.is_committed(e).unwrap_or(false).then_some(e)
            });
        if let Some(epoch) = newest {
            self.sealed.retain(|e| *e > epoch);
            crate::job::finish::crash_point("sink-commit");
            w.commit(epoch)?;
            crate::job::finish::crash_point("sink-committed");
        }
        Ok(!self.sealed.is_empty())
    }

    /// At the end: a job that read all its input publishes everything, or with `seal` seals it
    /// for [`FINISHED`] (published once the job recorded that it finished); a stopped or failed
    /// one leaves sealed output to the next run's recovery.
    pub fn close(
        w: &mut dyn sluice_connectors::SinkWriter,
        control: &crate::runtime::control::JobControl,
        seal: bool,
    ) -> Result<()> {
        if control.failed() {
            w.abort()
        } else if control.is_cancelled() {
            w.stop()
        } else if seal {
            w.pre_commit(FINISHED)
        } else {
            w.finish()
        }
    }
}

/// The checkpoint folder that holds sinks' staged output (never a checkpoint: no manifest).
pub const STAGING: Epoch = u64::MAX - 2;

/// Staging for transactional sinks in the checkpoint store's [`STAGING`] folder.
pub struct StoreStaging(pub std::sync::Arc<CheckpointStore>);

impl sluice_connectors::Staging for StoreStaging {
    fn put(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        self.0.put(STAGING, name, bytes).map(|_| ())
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        Ok(self.0.get(STAGING, name)?.to_vec())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .0
            .list(STAGING)?
            .into_keys()
            .filter(|n| n.starts_with(prefix))
            .collect())
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.0.remove(STAGING, name)
    }

    fn job_id(&self) -> String {
        self.0.location()
    }
}

/// Opens a transactional sink's staging over `store` and settles what earlier runs left.
pub fn begin(
    w: &mut dyn sluice_connectors::SinkWriter,
    store: &std::sync::Arc<CheckpointStore>,
    committed: Option<Epoch>,
    worker: usize,
    workers: usize,
) -> Result<()> {
    w.set_staging(std::sync::Arc::new(StoreStaging(store.clone())));
    w.begin_transactions(committed, worker, workers)
}
