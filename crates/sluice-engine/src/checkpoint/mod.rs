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

#[cfg(test)]
pub(crate) mod fuzz;
pub mod keyed;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use sluice_common::Result;
use sluice_sql::{JobPlan, SinkTarget, StreamNode};
use sluice_state::checkpoint::{CheckpointStore, Manifest, FORMAT_VERSION};
use timely::dataflow::operators::Capability;
use timely::progress::frontier::MutableAntichain;

use crate::runtime::metrics::InFlight;
use crate::runtime::{Epoch, Event};

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

/// A structural fingerprint of a plan: operators, schemas and aggregate calls. A checkpoint
/// restores only into a plan with the same fingerprint.
pub fn fingerprint(plan: &JobPlan) -> String {
    fn node(n: &StreamNode, out: &mut String) {
        let fields = |s: &arrow::datatypes::SchemaRef| {
            s.fields()
                .iter()
                .map(|f| format!("{}:{}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(",")
        };
        match n {
            StreamNode::Scan { table, schema, .. } => {
                out.push_str(&format!("scan({};{})", table.name, fields(schema)))
            }
            StreamNode::Values { rows } => out.push_str(&format!("values({})", rows.num_rows())),
            StreamNode::Project { input, schema, .. } => {
                node(input, out);
                out.push_str(&format!("project({})", fields(schema)));
            }
            StreamNode::Filter { input, .. } => {
                node(input, out);
                out.push_str("filter");
            }
            StreamNode::Union { inputs, .. } => {
                inputs.iter().for_each(|i| node(i, out));
                out.push_str(&format!("union({})", inputs.len()));
            }
            StreamNode::WindowAssign { input, kind, .. } => {
                node(input, out);
                out.push_str(&format!("window({kind:?})"));
            }
            StreamNode::Aggregate {
                input,
                aggs,
                window,
                schema,
                ..
            } => {
                node(input, out);
                let calls: Vec<String> = aggs
                    .iter()
                    .map(|a| {
                        format!(
                            "{:?}{}:{}",
                            a.func,
                            if a.distinct { "d" } else { "" },
                            a.output_type
                        )
                    })
                    .collect();
                let window = match window {
                    sluice_sql::AggWindow::None => "none".to_string(),
                    sluice_sql::AggWindow::Assigned { .. } => "assigned".to_string(),
                    sluice_sql::AggWindow::Session { gap, .. } => format!("session{gap}"),
                };
                out.push_str(&format!(
                    "aggregate({};{};{})",
                    calls.join(","),
                    window,
                    fields(schema)
                ));
            }
            StreamNode::Join {
                left,
                right,
                kind,
                left_keys,
                bound,
                schema,
                ..
            } => {
                node(left, out);
                node(right, out);
                out.push_str(&format!(
                    "join({kind:?};{};{bound:?};{})",
                    left_keys.len(),
                    fields(schema)
                ));
            }
            StreamNode::Rank {
                input,
                partition,
                limit,
                mode,
                schema,
                ..
            } => {
                node(input, out);
                out.push_str(&format!(
                    "rank({};{limit};{mode:?};{})",
                    partition.len(),
                    fields(schema)
                ));
            }
            StreamNode::TemporalJoin {
                left,
                right,
                kind,
                schema,
                ..
            } => {
                node(left, out);
                node(right, out);
                out.push_str(&format!("temporal({kind:?};{})", fields(schema)));
            }
            StreamNode::LookupJoin {
                input,
                dim,
                kind,
                schema,
                ..
            } => {
                node(input, out);
                node(dim, out);
                out.push_str(&format!("lookup({kind:?};{})", fields(schema)));
            }
            StreamNode::Over {
                input,
                partition,
                aggs,
                frame,
                schema,
                ..
            } => {
                node(input, out);
                let calls: Vec<String> = aggs.iter().map(|a| format!("{:?}", a.func)).collect();
                out.push_str(&format!(
                    "over({};{};{frame:?};{})",
                    partition.len(),
                    calls.join(","),
                    fields(schema)
                ));
            }
        }
    }
    // The version of how plans become operators: sub-plans and scans built once and shared
    // (2026-12) changed which operators hold state, so older checkpoints do not fit; v3: HOP
    // window aggregations keep panes, not windows.
    let mut out = String::from("operators v3;");
    for p in &plan.pipelines {
        node(&p.query, &mut out);
        match &p.sink {
            SinkTarget::Table(t) => out.push_str(&format!("->{}|", t.name)),
            SinkTarget::Select { index } => out.push_str(&format!("->select{index}|")),
        }
    }
    // FNV-1a: stable across builds, unlike the standard library's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in out.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What identifies the input of each source table of a plan: its connector and the options
/// that say which data it reads (a path, made absolute; a topic; a generator's seed and
/// fields). Tuning options (split size, parse-error handling, rates) are left out.
pub fn source_identities(plan: &JobPlan) -> BTreeMap<String, String> {
    fn walk(n: &StreamNode, out: &mut BTreeMap<String, String>) {
        if let StreamNode::Scan { table, .. } = n {
            out.insert(table.name.clone(), identity(&table.options));
        }
        for i in n.inputs() {
            walk(i, out);
        }
    }
    fn identity(options: &BTreeMap<String, String>) -> String {
        const KEYS: &[&str] = &[
            "connector",
            "path",
            "format",
            "topic",
            "topic-pattern",
            "properties.bootstrap.servers",
            "url",
            "table-name",
            "hostname",
            "database-name",
            "schema-name",
            "subject",
            "queue",
            "seed",
            "number-of-rows",
            // The generators: which stream, how the streams interleave, and their clocks.
            "nexmark.table",
            "nexmark.events",
            "event-rate",
            "start-time",
        ];
        let mut parts = vec![];
        for (k, v) in options {
            if !KEYS.contains(&k.as_str()) && !k.starts_with("fields.") {
                continue;
            }
            let v = if k == "path" {
                let plain = v.trim().strip_prefix("file://").unwrap_or(v.trim());
                std::fs::canonicalize(plain)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| plain.to_string())
            } else {
                v.clone()
            };
            parts.push(format!("{k} = '{v}'"));
        }
        parts.join(", ")
    }
    let mut out = BTreeMap::new();
    for p in &plan.pipelines {
        walk(&p.query, &mut out);
    }
    out
}

/// Writes checkpoint files on a background thread, so operators go on while their snapshots
/// are encoded and reach storage. A file appears (atomically) only once whole, and the
/// coordinator commits a checkpoint only when all of its files are there.
#[derive(Clone)]
pub struct CheckpointWriter {
    sender: std::sync::mpsc::Sender<(Epoch, String, Payload)>,
    /// Files queued or being written.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// A file to write: bytes, or a snapshot batch still to be encoded as Arrow IPC, or still to
/// be built (from a copy of an operator's state) and then encoded.
enum Payload {
    Bytes(Vec<u8>),
    Batch(arrow::record_batch::RecordBatch),
    Deferred(DeferredBatch),
}

/// Builds a snapshot batch on the writer thread.
pub type DeferredBatch = Box<dyn FnOnce() -> Result<arrow::record_batch::RecordBatch> + Send>;

impl CheckpointWriter {
    /// Starts the writer thread; it ends when every clone of the writer is dropped.
    pub fn start(
        store: Arc<CheckpointStore>,
        control: Arc<crate::runtime::control::JobControl>,
        compression: bool,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (sender, receiver) = std::sync::mpsc::channel::<(Epoch, String, Payload)>();
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let landed = in_flight.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                // Encoded straight into the file (no buffer the size of the snapshot).
                let put = |epoch: Epoch, name: &str, batch: &arrow::record_batch::RecordBatch| {
                    store.put_with(epoch, name, |out| write_ipc(out, batch, compression))
                };
                for (epoch, name, payload) in receiver {
                    let written = match payload {
                        Payload::Bytes(b) => store.put(epoch, &name, b),
                        Payload::Batch(batch) => put(epoch, &name, &batch),
                        Payload::Deferred(build) => build().and_then(|b| put(epoch, &name, &b)),
                    };
                    if let Err(e) = written {
                        control.checkpoint_failed(epoch, e);
                    }
                    landed.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .expect("spawn the checkpoint writer");
        (CheckpointWriter { sender, in_flight }, handle)
    }

    /// Queues a file of checkpoint `epoch`.
    pub fn write(&self, epoch: Epoch, name: String, bytes: Vec<u8>) {
        self.send(epoch, name, Payload::Bytes(bytes));
    }

    /// Queues a snapshot batch of checkpoint `epoch`, written as an Arrow IPC stream.
    pub fn write_batch(&self, epoch: Epoch, name: String, batch: arrow::record_batch::RecordBatch) {
        self.send(epoch, name, Payload::Batch(batch));
    }

    /// Queues a snapshot batch of checkpoint `epoch` that `build` makes on the writer thread.
    pub fn write_deferred(&self, epoch: Epoch, name: String, build: DeferredBatch) {
        self.send(epoch, name, Payload::Deferred(build));
    }

    fn send(&self, epoch: Epoch, name: String, payload: Payload) {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // The receiver lives until every writer is dropped, so sending cannot fail before then.
        let _ = self.sender.send((epoch, name, payload));
    }

    /// How many files this process has queued that have not reached storage (or failed) yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }
}

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
}

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

    /// The pending checkpoint epoch, once every input frontier has passed it.
    pub fn due(&self, frontiers: &[&MutableAntichain<Epoch>]) -> Option<Epoch> {
        (self.held.is_some()
            && frontiers.iter().all(|f| !f.less_equal(&self.next))
            && frontiers.iter().any(|f| !f.frontier().is_empty()))
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

/// A batch as an Arrow IPC stream: the format of operator snapshots.
pub fn ipc_bytes(batch: &arrow::record_batch::RecordBatch) -> Result<Vec<u8>> {
    // Sized up front: growing a buffer of tens of megabytes would copy it several times.
    let mut bytes = Vec::with_capacity(batch.get_array_memory_size() + 4096);
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(bytes)
}

/// Writes a snapshot batch as an Arrow IPC stream, with `compression` as LZ4 frames
/// (decompressed by any reader): snapshots are mostly small integers and repeated bytes, so
/// storage receives about a third, at a CPU cost the writer thread pays.
pub fn write_ipc(
    out: &mut dyn std::io::Write,
    batch: &arrow::record_batch::RecordBatch,
    compression: bool,
) -> Result<()> {
    let mut options = arrow::ipc::writer::IpcWriteOptions::default();
    if compression {
        options = options.try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))?;
    }
    let mut w =
        arrow::ipc::writer::StreamWriter::try_new_with_options(out, &batch.schema(), options)?;
    w.write(batch)?;
    w.finish()?;
    Ok(())
}

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
            w.commit(epoch)?;
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

#[cfg(test)]
mod identity_tests {
    /// A generator's identity covers what changes its rows: the Nexmark stream it reads and the
    /// event count that interleaves the streams, as well as the seed.
    #[test]
    fn a_generated_source_is_identified_by_what_makes_its_rows() {
        let plan = |options: &str| {
            let sql = format!(
                "CREATE TABLE s (id BIGINT) WITH ('connector' = 'datagen'{options});
                 SELECT * FROM s;"
            );
            super::source_identities(&sluice_sql::plan_script(&sql).unwrap())
        };
        let base = plan(", 'seed' = '1'");
        assert_eq!(base, plan(", 'seed' = '1'"));
        assert_ne!(base, plan(", 'seed' = '2'"));
        assert_ne!(base, plan(", 'seed' = '1', 'number-of-rows' = '10'"));
        let nexmark = |table: &str, events: u64| {
            let sql = format!(
                "CREATE TABLE t (auction BIGINT) WITH ('connector' = 'nexmark', 'nexmark.table' = '{table}', 'nexmark.events' = '{events}');
                 SELECT * FROM t;"
            );
            super::source_identities(&sluice_sql::plan_script(&sql).unwrap())
        };
        assert_eq!(nexmark("bid", 1000), nexmark("bid", 1000));
        assert_ne!(nexmark("bid", 1000), nexmark("auction", 1000));
        assert_ne!(nexmark("bid", 1000), nexmark("bid", 2000));
    }
}
