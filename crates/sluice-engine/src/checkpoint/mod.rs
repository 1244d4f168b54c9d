//! Checkpoints at epoch boundaries.
//!
//! Every `every`-th epoch is a checkpoint epoch; operators know them without talking:
//! - sources write their offsets before leaving a checkpoint epoch;
//! - aggregations and sinks align: rows of later epochs wait (with their capabilities) until the
//!   input frontier passes the checkpoint epoch, then the operator snapshots (or pre-commits)
//!   and goes on. Each holds a capability at the pending checkpoint epoch until it is done, so
//!   the job's probe passing an epoch means every file of that checkpoint is written;
//! - worker 0 then writes the manifest (the commit point), and sinks publish what they
//!   pre-committed for it.

mod alignment;
mod fingerprint;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod keyed;
pub(crate) mod transactions;
mod writer;

pub use alignment::{Alignment, Held};
pub use fingerprint::{fingerprint, source_identities, source_identities_at};
pub use transactions::{SinkTransactions, STAGING};
pub use writer::{ipc_bytes, write_ipc, CheckpointWriter, DeferredBatch};

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_common::Result;
use sluice_state::checkpoint::{CheckpointStore, Manifest, FORMAT_VERSION};

use crate::runtime::Epoch;

/// `SET 'execution.checkpointing.*'`.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub dir: String,
    /// Epochs between checkpoints.
    pub every: u64,
    pub retained: usize,
    /// Consecutive failed checkpoints tolerated before the job fails.
    pub tolerable_failures: usize,
    /// `'execution.checkpointing.snapshot-compression'`: LZ4-compress state snapshots.
    pub compression: bool,
    /// `'execution.state-recovery.path'` (or `--from-checkpoint`): restore this checkpoint.
    pub recovery_path: Option<String>,
}

impl CheckpointConfig {
    /// The job's checkpoint options in epochs; `None` when checkpointing is off.
    pub fn from_config(config: &sluice_sql::config::JobConfig) -> Option<Self> {
        let c = config.checkpoint.as_ref()?;
        let epoch_ms = config.epoch_length.as_millis().max(1) as u64;
        Some(CheckpointConfig {
            dir: c.dir.clone(),
            every: (c.interval.as_millis() as u64 / epoch_ms).max(1),
            retained: c.retained,
            tolerable_failures: c.tolerable_failures,
            recovery_path: c.recovery_path.clone(),
            compression: c.compression,
        })
    }
}

/// The checkpoint epoch that records that a bounded job ran to its end: its sinks' last output
/// is sealed for it. A run that finds it only publishes that output (a kill between the end of
/// the input and the publishing must not run the job again from an older checkpoint).
pub const FINISHED: Epoch = u64::MAX - 1;

/// The name suffix of a finished source's final offsets (`source-op0-w1+final`): later
/// checkpoints inherit the file.
pub const FINAL_SUFFIX: &str = "+final";

/// What kind of file an operator contributes to each checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contribution {
    SourceOffsets,
    State,
}

/// Per worker: the checkpoint store, the cadence, what to restore, and the operators that
/// contribute files (registered as the dataflow is built, in the same order on every worker).
pub struct CheckpointContext {
    pub store: Arc<CheckpointStore>,
    pub writer: CheckpointWriter,
    pub every: u64,
    /// The first epoch of this run: after the restored checkpoint, so new ones sort after it.
    pub base: Epoch,
    pub restore: Option<Manifest>,
    pub contributors: RefCell<Vec<(Contribution, String)>>,
    /// The coordinator's memory of finished sources' final offsets files, by stem.
    pub finished: RefCell<BTreeMap<String, sluice_state::checkpoint::ChainFile>>,
    /// The process's readers that ended, kept until what they read is committed.
    pub ended: EndedReaders,
    /// The job's control: a graceful stop's checkpoint epoch is there.
    pub control: std::sync::Arc<crate::runtime::control::JobControl>,
}

/// Source readers of a process that ended, with the checkpoint covering what they returned:
/// `None` when the reader finished its input (the job's recorded end covers it), or the stop
/// checkpoint of a graceful stop. The job tells them once that commits (a queue acknowledges
/// its last messages then), and drops them.
pub type EndedReaders = std::sync::Arc<
    std::sync::Mutex<Vec<(Box<dyn sluice_connectors::SourceReader>, Option<Epoch>)>>,
>;

impl CheckpointContext {
    /// Registers an operator and returns its id.
    pub fn register(&self, kind: Contribution) -> String {
        let mut c = self.contributors.borrow_mut();
        let id = format!("op{}", c.len());
        c.push((kind, id.clone()));
        id
    }

    /// The first checkpoint epoch at or after `epoch`.
    pub fn next_checkpoint(&self, epoch: Epoch) -> Epoch {
        epoch.div_ceil(self.every) * self.every
    }

    /// Whether `epoch` is a checkpoint epoch.
    pub fn is_checkpoint(&self, epoch: Epoch) -> bool {
        epoch.is_multiple_of(self.every)
    }

    /// File name of an operator's contribution from one worker.
    pub fn file_name(kind: Contribution, id: &str, worker: usize) -> String {
        match kind {
            Contribution::SourceOffsets => format!("source-{id}-w{worker}"),
            Contribution::State => format!("state-{id}-w{worker}"),
        }
    }

    /// The restored files of one operator, from every worker of the checkpoint.
    pub fn restored(&self, kind: Contribution, id: &str) -> Result<Vec<bytes::Bytes>> {
        Ok(self
            .restored_chains(kind, id)?
            .into_iter()
            .flatten()
            .collect())
    }

    /// The restored files of one operator per worker of the checkpoint, each worker's oldest
    /// first: a full snapshot, then the deltas written after it (see [`sluice_state::checkpoint`]).
    pub fn restored_chains(&self, kind: Contribution, id: &str) -> Result<Vec<Vec<bytes::Bytes>>> {
        let Some(m) = &self.restore else {
            return Ok(vec![]);
        };
        let prefix = Self::file_name(kind, id, 0);
        let prefix = &prefix[..prefix.len() - 1];
        let all = m.all_files();
        let stems: std::collections::BTreeSet<&str> = all
            .iter()
            .map(|(_, f, _)| f.as_str())
            .filter(|f| f.starts_with(prefix))
            .map(|f| f.split_once('+').map_or(f, |(stem, _)| stem))
            .collect();
        stems
            .into_iter()
            .map(|stem| {
                m.chain(stem)
                    .iter()
                    .map(|(epoch, name, _)| self.store.get(*epoch, name))
                    .collect()
            })
            .collect()
    }

    /// Commits checkpoint `epoch` if every contributor of every worker wrote its file; returns
    /// the number of files and their total size when it did.
    pub fn try_commit(
        &self,
        epoch: Epoch,
        workers: usize,
        (fingerprint, sources): (&str, &BTreeMap<String, String>),
        retained: usize,
    ) -> Result<Option<(usize, u64)>> {
        let mut files = BTreeMap::new();
        let mut inherited = BTreeMap::new();
        let mut checksums = BTreeMap::new();
        let present = self.store.list(epoch)?;
        for (name, size) in &present {
            if let Some(stem) = name.strip_suffix(FINAL_SUFFIX) {
                self.finished
                    .borrow_mut()
                    .insert(stem.to_string(), (epoch, name.clone(), *size));
            }
        }
        let mut bases: BTreeMap<u64, Manifest> = BTreeMap::new();
        for (kind, id) in self.contributors.borrow().iter() {
            for w in 0..workers {
                let name = Self::file_name(*kind, id, w);
                if let Some(size) = present.get(&name) {
                    files.insert(name, *size);
                    continue;
                }
                // A delta, `name+<base>`: it inherits the chain of committed checkpoint base.
                let delta_prefix = format!("{name}+");
                let delta = present
                    .range(delta_prefix.clone()..)
                    .next()
                    .filter(|(f, _)| f.starts_with(&delta_prefix));
                let Some((delta, size)) = delta else {
                    // A source that finished before this epoch: its final offsets still count.
                    let finished = self.finished.borrow().get(&name).cloned();
                    match finished {
                        Some((at, file, size)) if at < epoch => {
                            inherited
                                .insert(sluice_state::checkpoint::inherited_key(at, &file), size);
                            continue;
                        }
                        _ => return Ok(None),
                    }
                };
                if delta.ends_with(FINAL_SUFFIX) {
                    files.insert(delta.clone(), *size);
                    continue;
                }
                let Some(base) = sluice_state::checkpoint::delta_base(delta) else {
                    return Ok(None);
                };
                let base = match bases.entry(base) {
                    std::collections::btree_map::Entry::Occupied(m) => m.into_mut(),
                    std::collections::btree_map::Entry::Vacant(v) => {
                        match self.store.manifest(base) {
                            Ok(m) => v.insert(m),
                            // The base is gone or damaged: this checkpoint cannot be complete (the
                            // operator writes a full snapshot next time).
                            Err(_) => return Ok(None),
                        }
                    }
                };
                for (at, file, size) in base.chain(&name) {
                    let key = sluice_state::checkpoint::inherited_key(at, &file);
                    if let Some(sum) = base.checksum_of(at, &file) {
                        checksums.insert(key.clone(), sum);
                    }
                    inherited.insert(key, size);
                }
                files.insert(delta.clone(), *size);
            }
        }
        for (name, size) in &files {
            checksums.insert(
                name.clone(),
                self.store.stored_checksum(epoch, name, *size)?,
            );
        }
        let summary = (files.len(), files.values().sum());
        let manifest = Manifest {
            version: FORMAT_VERSION,
            epoch,
            plan_fingerprint: fingerprint.to_string(),
            sources: sources.clone(),
            workers,
            files,
            inherited,
            checksums,
        };
        self.store.commit(&manifest)?;
        self.store.retain(retained)?;
        Ok(Some(summary))
    }
}

impl CheckpointContext {
    /// Whether worker `index` of `peers` owns a key group.
    pub fn owner(index: usize, peers: usize) -> impl Fn(u16) -> bool {
        move |kg: u16| crate::runtime::worker_for_hash(kg as u64, peers) == index
    }

    /// The restored state files of operator `id` as chains (per worker of the checkpoint: a full
    /// snapshot, then deltas), each file as one batch.
    pub fn restored_chain_batches(
        &self,
        id: &str,
    ) -> Result<Vec<Vec<arrow::record_batch::RecordBatch>>> {
        self.restored_chains(Contribution::State, id)?
            .into_iter()
            .map(|chain| {
                chain
                    .into_iter()
                    .map(|file| {
                        let reader = arrow::ipc::reader::StreamReader::try_new(
                            std::io::Cursor::new(file),
                            None,
                        )?;
                        let schema = reader.schema();
                        let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
                        Ok(arrow::compute::concat_batches(&schema, &batches)?)
                    })
                    .collect()
            })
            .collect()
    }

    /// Feeds every worker's restored snapshot batches of operator `id` to `restore`, with the
    /// test for the key groups this worker owns (so a checkpoint restores on any worker count).
    pub fn restore_key_groups(
        &self,
        id: &str,
        index: usize,
        peers: usize,
        mut restore: impl FnMut(&arrow::record_batch::RecordBatch, &dyn Fn(u16) -> bool) -> Result<()>,
    ) -> Result<()> {
        let owns = Self::owner(index, peers);
        for file in self.restored(Contribution::State, id)? {
            let reader =
                arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(file), None)?;
            for batch in reader {
                restore(&batch?, &owns)?;
            }
        }
        Ok(())
    }
}
