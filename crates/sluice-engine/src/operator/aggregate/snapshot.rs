//! Checkpointing an aggregation: its state as an Arrow batch, one row per group (or session),
//! each tagged with the key group its key hashes to. Restoring keeps only the rows whose key
//! group the worker owns, so a snapshot taken with N workers restores on M.
//!
//! Incremental checkpoints: with change tracking on, [`AggregateState::snapshot_delta`] writes
//! only the groups changed since the last snapshot, and a *tombstone* (a row with `rows` = 0)
//! for each key removed since then that an earlier snapshot holds. A restore reads a chain (a
//! full snapshot, then deltas): the newest file holding a key decides its rows.
//!
//! Layouts: the full one ([`snapshot_schema`]); without the window columns when no group has a
//! window; and *flat*, for full snapshots of state whose accumulators are flat arrays (COUNT,
//! SUM, AVG), with each accumulator field a column of its own instead of per-group bytes (a
//! quarter smaller, and encoded without a pass per group). Restoring reads all three.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, BooleanArray, Int64Array, UInt16Array,
};
use arrow::datatypes::{
    DataType, Field, Int64Type, Schema, SchemaRef, TimestampMillisecondType, UInt16Type,
};
use arrow::record_batch::RecordBatch;
use sluice_common::{Error, Result};
use sluice_state::accumulator::FrozenAccumulator;
use sluice_state::group_table::NO_TAG;
use sluice_state::snapshot::Reader;
use sluice_state::ByteSlots;

use crate::operator::aggregate::{AggregateState, Session};
use crate::runtime::{key_hash_state, KEY_GROUPS};

/// The layout of an aggregation snapshot.
pub fn snapshot_schema() -> SchemaRef {
    let [key_group, key] = crate::checkpoint::keyed::key_columns(false);
    Arc::new(Schema::new(vec![
        key_group,
        key,
        Field::new("rows", DataType::Int64, false),
        // Assigned windows: the window's end, and whether it already fired (allowed lateness).
        Field::new("window_end", DataType::Int64, true),
        Field::new("fired", DataType::Boolean, true),
        // Session windows: the session's bounds. For a sliced HOP window's pane, `session_end`
        // is the end of the last window its worker had fired.
        Field::new("session_start", DataType::Int64, true),
        Field::new("session_end", DataType::Int64, true),
        Field::new("accumulators", DataType::Binary, false),
        // The result emitted last (early firing and allowed lateness), row-encoded.
        Field::new("last_emitted", DataType::Binary, true),
    ]))
}

/// The layout of a snapshot of state without windows: the window columns are left out (they
/// would be null, and a third of each row).
fn unwindowed_schema() -> SchemaRef {
    let full = snapshot_schema();
    let keep = [0, 1, 2, 7, 8];
    Arc::new(full.project(&keep).expect("columns of the snapshot layout"))
}

/// Whether a batch is in the full layout; an error when it is in none of the layouts (the
/// flat one counts as not full).
fn is_full_layout(batch: &RecordBatch) -> Result<bool> {
    let schema = batch.schema();
    if flat_accumulators(batch).is_some() {
        return Ok(false);
    }
    if schema.fields() == snapshot_schema().fields() {
        Ok(true)
    } else if schema.fields() == unwindowed_schema().fields() {
        Ok(false)
    } else {
        Err(Error::Runtime(
            "aggregation snapshot has an unexpected layout".into(),
        ))
    }
}

/// A snapshot in the full layout (see [`snapshot_schema`]), whichever it was written in.
fn full_layout(batch: &RecordBatch) -> Result<std::borrow::Cow<'_, RecordBatch>> {
    if let Some(accs) = flat_accumulators(batch) {
        let unwindowed = from_flat(batch, &accs)?;
        return Ok(std::borrow::Cow::Owned(
            full_layout(&unwindowed)?.into_owned(),
        ));
    }
    if is_full_layout(batch)? {
        return Ok(std::borrow::Cow::Borrowed(batch));
    }
    let n = batch.num_rows();
    let c = |i: usize| batch.column(i).clone();
    let nulls: ArrayRef = Arc::new(Int64Array::new_null(n));
    let columns: Vec<ArrayRef> = vec![
        c(0),
        c(1),
        c(2),
        nulls.clone(),
        Arc::new(BooleanArray::new_null(n)),
        nulls.clone(),
        nulls,
        c(3),
        c(4),
    ];
    Ok(std::borrow::Cow::Owned(RecordBatch::try_new(
        snapshot_schema(),
        columns,
    )?))
}

/// Key group of each group's key. It is computed once per key and kept in the group table, so
/// a checkpoint hashes only the keys that are new since the last one.
fn key_groups(state: &mut AggregateState, gids: &[u32]) -> Result<Vec<u16>> {
    if state.global {
        // No GROUP BY: everything lives on the worker that owns key group 0.
        for g in gids {
            state.table.set_tag(*g, 0);
        }
        return Ok(vec![0; gids.len()]);
    }
    let new: Vec<u32> = gids
        .iter()
        .copied()
        .filter(|g| state.table.tag(*g) == NO_TAG)
        .collect();
    if !new.is_empty() {
        let mut keys = state.table.keys(&new)?;
        if let Some(p) = &state.partition_keys {
            keys = p.iter().map(|&i| keys[i].clone()).collect();
        }
        let mut hashes = vec![0u64; new.len()];
        datafusion_common::hash_utils::create_hashes(&keys, &key_hash_state(), &mut hashes)
            .map_err(|e| Error::Runtime(e.to_string()))?;
        for (g, h) in new.iter().zip(hashes) {
            state.table.set_tag(*g, (h % KEY_GROUPS) as u16);
        }
    }
    Ok(gids.iter().map(|g| state.table.tag(*g)).collect())
}

/// The columns of a snapshot, filled one group (or session) at a time without allocating per
/// group.
struct SnapshotColumns {
    gids: Vec<u32>,
    keys: BinaryBuilder,
    rows: Vec<i64>,
    /// Window columns, kept only for windowed state (otherwise all null).
    windowed: bool,
    windows: Vec<WindowCols>,
    accs: BinaryBuilder,
    last: BinaryBuilder,
    /// Scratch: one group's accumulator states.
    scratch: Vec<u8>,
}

impl SnapshotColumns {
    fn with_capacity(n: usize, windowed: bool) -> Self {
        SnapshotColumns {
            gids: Vec::with_capacity(n),
            keys: BinaryBuilder::with_capacity(n, n * 16),
            rows: Vec::with_capacity(n),
            windowed,
            windows: Vec::with_capacity(if windowed { n } else { 0 }),
            accs: BinaryBuilder::with_capacity(n, n * 32),
            last: BinaryBuilder::with_capacity(n, 0),
            scratch: vec![],
        }
    }

    /// Appends one group; `slot` holds its accumulators (the group itself, or its session's).
    fn push(&mut self, state: &impl Groups, g: u32, slot: u32, window: WindowCols) {
        self.gids.push(g);
        self.keys.append_value(state.key(g));
        self.rows.push(state.rows(g));
        if self.windowed {
            self.windows.push(window);
        }
        self.scratch.clear();
        for i in 0..state.accumulators() {
            // Each accumulator's state, prefixed with its length (see `snapshot::Reader::bytes`).
            let at = self.scratch.len();
            self.scratch.extend_from_slice(&[0; 4]);
            state.snapshot_accumulator(i, slot, &mut self.scratch);
            let len = (self.scratch.len() - at - 4) as u32;
            self.scratch[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        self.accs.append_value(&self.scratch);
        match window.session.is_none().then(|| state.last(g)).flatten() {
            Some(b) => self.last.append_value(b),
            None => self.last.append_null(),
        }
    }

    /// Appends every live group (not sessions): unwindowed, then by window end, then fired
    /// windows kept for allowed lateness.
    fn push_groups(&mut self, state: &impl Groups, windows: &Windows) {
        let live = |g: &u32| state.rows(*g) > 0;
        if windows.by_end.is_empty() && windows.cleanup.is_empty() {
            for g in (0..state.ids() as u32).filter(live) {
                self.push(state, g, g, WindowCols::default());
            }
        }
        for (end, gids) in &windows.by_end {
            for g in gids.iter().copied().filter(live) {
                let window = WindowCols {
                    end: Some(*end),
                    fired: Some(false),
                    session: None,
                    fired_through: windows.fired_through,
                };
                self.push(state, g, g, window);
            }
        }
        for (until, gids) in &windows.cleanup {
            let end = until - windows.allowed_lateness_ms;
            for g in gids.iter().copied().filter(live) {
                let window = WindowCols {
                    end: Some(end),
                    fired: Some(true),
                    session: None,
                    fired_through: None,
                };
                self.push(state, g, g, window);
            }
        }
    }
}

/// What a snapshot reads of each group: from the live state, or from a frozen copy of it.
trait Groups {
    /// One past the largest group id.
    fn ids(&self) -> usize;
    fn key(&self, g: u32) -> &[u8];
    fn rows(&self, g: u32) -> i64;
    fn accumulators(&self) -> usize;
    fn snapshot_accumulator(&self, i: usize, slot: u32, out: &mut Vec<u8>);
    fn last(&self, g: u32) -> Option<&[u8]>;
}

impl Groups for AggregateState {
    fn ids(&self) -> usize {
        self.rows.len()
    }
    fn key(&self, g: u32) -> &[u8] {
        self.table.key_bytes(g)
    }
    fn rows(&self, g: u32) -> i64 {
        self.rows[g as usize]
    }
    fn accumulators(&self) -> usize {
        self.accs.len()
    }
    fn snapshot_accumulator(&self, i: usize, slot: u32, out: &mut Vec<u8>) {
        self.accs[i].snapshot_group(slot, out)
    }
    fn last(&self, g: u32) -> Option<&[u8]> {
        self.last.get(g)
    }
}

/// Groups by window: open windows by end, fired ones by the watermark that ends their stay.
#[derive(Default)]
struct Windows {
    by_end: BTreeMap<i64, Vec<u32>>,
    cleanup: BTreeMap<i64, Vec<u32>>,
    allowed_lateness_ms: i64,
    /// Sliced windows: the end of the last window fired.
    fired_through: Option<i64>,
}

/// A copy of an aggregation's state for a full snapshot, taken on the worker in a few bulk
/// copies ([`AggregateState::freeze`]) and encoded on the checkpoint writer's thread
/// ([`FrozenState::encode`]), so that the worker pauses for the copy only. Encoding it gives the
/// same batch as [`AggregateState::snapshot`] at the time of the copy.
pub struct FrozenState {
    keys: ByteSlots,
    tags: Vec<u16>,
    rows: Vec<i64>,
    accs: Vec<FrozenAccumulator>,
    last: ByteSlots,
    windows: Windows,
    windowed: bool,
}

impl Groups for FrozenState {
    fn ids(&self) -> usize {
        self.rows.len()
    }
    fn key(&self, g: u32) -> &[u8] {
        self.keys.get(g).unwrap_or_default()
    }
    fn rows(&self, g: u32) -> i64 {
        self.rows[g as usize]
    }
    fn accumulators(&self) -> usize {
        self.accs.len()
    }
    fn snapshot_accumulator(&self, i: usize, slot: u32, out: &mut Vec<u8>) {
        self.accs[i].snapshot_group(slot, out)
    }
    fn last(&self, g: u32) -> Option<&[u8]> {
        self.last.get(g)
    }
}

impl FrozenState {
    /// The snapshot batch: in the flat layout (see [`FrozenState::encode_flat`]) when no group
    /// has a window or a last result, else as [`AggregateState::snapshot`] would write it.
    pub fn encode(&self) -> Result<RecordBatch> {
        if !self.windowed && self.last.is_empty() {
            return self.encode_flat();
        }
        let mut c = SnapshotColumns::with_capacity(self.keys.len(), self.windowed);
        c.push_groups(self, &self.windows);
        let key_group: Vec<u16> = c.gids.iter().map(|g| self.tags[*g as usize]).collect();
        c.finish(key_group)
    }
}

impl FrozenState {
    /// Every live group in the flat layout: key group, key and rows, then each accumulator's
    /// state fields as columns of their own.
    fn encode_flat(&self) -> Result<RecordBatch> {
        let gids: Vec<u32> = (0..self.rows.len() as u32)
            .filter(|g| self.rows[*g as usize] > 0)
            .collect();
        let key_bytes: usize = gids.iter().map(|g| self.key(*g).len()).sum();
        let mut keys = BinaryBuilder::with_capacity(gids.len(), key_bytes);
        for g in &gids {
            keys.append_value(self.key(*g));
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(UInt16Array::from_iter_values(
                gids.iter().map(|g| self.tags[*g as usize]),
            )),
            Arc::new(keys.finish()),
            Arc::new(Int64Array::from_iter_values(
                gids.iter().map(|g| self.rows[*g as usize]),
            )),
        ];
        let mut fields = unwindowed_schema().fields()[..3].to_vec();
        for (i, acc) in self.accs.iter().enumerate() {
            for (j, column) in acc.columns(&gids).into_iter().enumerate() {
                let name = format!("{FLAT_PREFIX}{i}.{j}");
                fields.push(Arc::new(Field::new(
                    name,
                    column.data_type().clone(),
                    false,
                )));
                columns.push(column);
            }
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }
}

/// Column names of accumulator fields in the flat layout: `acc<accumulator>.<field>`.
const FLAT_PREFIX: &str = "acc";

/// Accumulator `i`'s columns of a flat-layout batch (see [`FrozenState::encode_flat`]), by the
/// accumulator index in their names; `None` when `batch` is not in that layout.
fn flat_accumulators(batch: &RecordBatch) -> Option<Vec<Vec<ArrayRef>>> {
    let schema = batch.schema();
    let fields = schema.fields();
    if fields.len() < 3 || fields[..3] != unwindowed_schema().fields()[..3] {
        return None;
    }
    let mut accs: Vec<Vec<ArrayRef>> = vec![];
    for (f, column) in fields[3..].iter().zip(&batch.columns()[3..]) {
        let (acc, field) = f.name().strip_prefix(FLAT_PREFIX)?.split_once('.')?;
        let (acc, field): (usize, usize) = (acc.parse().ok()?, field.parse().ok()?);
        if acc == accs.len() {
            accs.push(vec![]);
        }
        // Accumulators in order, each with its fields in order.
        if acc + 1 != accs.len() || field != accs[acc].len() {
            return None;
        }
        accs[acc].push(column.clone());
    }
    Some(accs)
}

/// A flat-layout batch in the unwindowed layout: each row's accumulator fields as the bytes
/// [`AggregateState::snapshot`] writes.
fn from_flat(batch: &RecordBatch, accs: &[Vec<ArrayRef>]) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let mut bytes = BinaryBuilder::with_capacity(n, n * 4 * (accs.len() + 2));
    let mut scratch = vec![];
    for i in 0..n {
        scratch.clear();
        for columns in accs {
            let at = scratch.len();
            scratch.extend_from_slice(&[0; 4]);
            sluice_state::accumulator::group_bytes_from_columns(columns, i, &mut scratch)
                .map_err(|e| Error::Runtime(e.to_string()))?;
            let len = (scratch.len() - at - 4) as u32;
            scratch[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        bytes.append_value(&scratch);
    }
    let columns: Vec<ArrayRef> = vec![
        batch.column(0).clone(),
        batch.column(1).clone(),
        batch.column(2).clone(),
        Arc::new(bytes.finish()),
        Arc::new(arrow::array::BinaryArray::new_null(n)),
    ];
    Ok(RecordBatch::try_new(unwindowed_schema(), columns)?)
}

/// A snapshot row's window columns.
#[derive(Default, Clone, Copy)]
struct WindowCols {
    end: Option<i64>,
    fired: Option<bool>,
    session: Option<(i64, i64)>,
    fired_through: Option<i64>,
}

/// Groups changed and keys removed over some stretch of time.
#[derive(Default)]
struct ChangeSet {
    /// Groups (keys, for sessions) changed.
    changed: Vec<u32>,
    /// Keys removed that a snapshot holds: key group and key bytes.
    removed_groups: Vec<u16>,
    removed_keys: Vec<u8>,
    removed_ends: Vec<usize>,
}

impl ChangeSet {
    fn len(&self) -> usize {
        self.changed.len() + self.removed_groups.len()
    }

    fn push_removed(&mut self, key_group: u16, key: &[u8]) {
        self.removed_groups.push(key_group);
        self.removed_keys.extend_from_slice(key);
        self.removed_ends.push(self.removed_keys.len());
    }

    fn extend(&mut self, other: &ChangeSet) {
        self.changed.extend_from_slice(&other.changed);
        let mut start = 0;
        for (kg, end) in other.removed_groups.iter().zip(&other.removed_ends) {
            self.push_removed(*kg, &other.removed_keys[start..*end]);
            start = *end;
        }
    }
}

/// A snapshot written since the last full one (included): a later delta may build on it once
/// its checkpoint is committed.
struct Written {
    epoch: u64,
    /// What changed between the snapshot before it and this one.
    changes: ChangeSet,
    /// Rows of the chain (full snapshot and deltas) up to this snapshot, and its deltas.
    chain_rows: usize,
    chain_len: usize,
}

/// What changed since the last snapshot, for incremental checkpoints.
#[derive(Default)]
pub(crate) struct Changes {
    enabled: bool,
    current: ChangeSet,
    is_changed: Vec<bool>,
    /// Snapshots since (and with) the last full one, oldest first.
    written: Vec<Written>,
    /// More than half of the groups changed since the last snapshot: the next one is full, and
    /// tracking stops until then (it would cost time on every group and save nothing).
    overflow: bool,
}

impl Changes {
    /// Notes that group `g` of `groups` changed.
    #[inline]
    pub(crate) fn mark(&mut self, g: u32, groups: usize) {
        if !self.enabled || self.overflow {
            return;
        }
        let i = g as usize;
        if i >= self.is_changed.len() {
            self.is_changed.resize(i + 1, false);
        }
        if !self.is_changed[i] {
            self.is_changed[i] = true;
            self.current.changed.push(g);
            if self.current.changed.len() * 2 > groups {
                self.overflow = true;
            }
        }
    }

    /// Notes that group `g` is about to be removed: a tombstone if a snapshot holds its key.
    pub(crate) fn removed(&mut self, table: &sluice_state::GroupTable, g: u32) {
        if !self.enabled || self.overflow || table.tag(g) == NO_TAG {
            return;
        }
        self.current.push_removed(table.tag(g), table.key_bytes(g));
    }

    /// Starts a new stretch of changes (after a snapshot), returning the last one.
    fn take(&mut self) -> ChangeSet {
        for g in &self.current.changed {
            self.is_changed[*g as usize] = false;
        }
        self.overflow = false;
        std::mem::take(&mut self.current)
    }
}

/// Longest chain of deltas after a full snapshot.
const MAX_DELTAS: usize = 16;

impl AggregateState {
    /// Tracks changes between snapshots, so that checkpoints can be incremental.
    pub fn track_changes(&mut self) {
        self.changes.enabled = true;
    }

    /// What the next snapshot can build on: the newest snapshot since the last full one whose
    /// checkpoint is `committed`, if a delta on top of it is worth writing. It is when at most
    /// half of the groups changed since then (a delta of nearly every group saves nothing and
    /// costs more to write) and the chain, with the delta, holds fewer rows than a full
    /// snapshot would (a restore then reads at most about twice the state).
    pub fn delta_base(&self, committed: impl Fn(u64) -> bool) -> Option<u64> {
        let c = &self.changes;
        // A sliced window's panes record how far their worker fired, which changes for every
        // pane at each window: their rows in older files go stale.
        if !c.enabled || c.overflow || self.slicing.is_some() {
            return None;
        }
        let at = c.written.iter().rposition(|w| committed(w.epoch))?;
        let base = &c.written[at];
        let pending = c.current.len()
            + c.written[at + 1..]
                .iter()
                .map(|w| w.changes.len())
                .sum::<usize>();
        let groups = self.table.len().max(1);
        (base.chain_len < MAX_DELTAS && pending * 2 <= groups && base.chain_rows + pending < groups)
            .then_some(base.epoch)
    }

    /// The groups changed since snapshot `base` (see [`AggregateState::delta_base`]), and
    /// tombstones for the keys removed since then, as the snapshot of checkpoint `epoch`.
    pub fn snapshot_delta(&mut self, base: u64, epoch: u64) -> Result<RecordBatch> {
        let delta = self.delta_since(base, epoch);
        if delta.is_err() {
            // Changes may be lost: only a full snapshot is safe next.
            self.changes.written.clear();
        }
        delta
    }

    fn delta_since(&mut self, base: u64, epoch: u64) -> Result<RecordBatch> {
        let at = self
            .changes
            .written
            .iter()
            .position(|w| w.epoch == base)
            .ok_or_else(|| {
                Error::Runtime(format!("no snapshot of checkpoint {base} to build on"))
            })?;
        let now = self.changes.take();
        // Changes since the base: those of the snapshots written after it (whose checkpoints
        // did not commit, or not yet), and the current ones.
        let mut since = ChangeSet::default();
        for w in &self.changes.written[at + 1..] {
            since.extend(&w.changes);
        }
        since.extend(&now);
        // In group order: state is laid out by group id, so this reads it front to back.
        let mut changed = std::mem::take(&mut since.changed);
        changed.sort_unstable();
        changed.dedup();
        let windowed = !matches!(self.window, sluice_sql::AggWindow::None);
        let mut c = SnapshotColumns::with_capacity(changed.len(), windowed);
        if let Some(s) = &self.sessions {
            for key in &changed {
                c.push_sessions(self, *key, s.open.get(key).map_or(&[][..], |v| &v[..]));
            }
        } else {
            let live: Vec<u32> = changed
                .iter()
                .copied()
                .filter(|g| self.rows[*g as usize] > 0)
                .collect();
            // A window's end is part of its group key; it fired once the watermark passed it.
            let ends = match self.window {
                sluice_sql::AggWindow::Assigned { end_key, .. } if !live.is_empty() => {
                    let keys = self.table.keys(&live)?;
                    Some(
                        keys[end_key]
                            .as_primitive::<TimestampMillisecondType>()
                            .clone(),
                    )
                }
                _ => None,
            };
            for (i, g) in live.iter().enumerate() {
                let window = match &ends {
                    Some(e) => WindowCols {
                        end: Some(e.value(i)),
                        fired: Some(e.value(i) <= self.watermark),
                        session: None,
                        fired_through: None,
                    },
                    None => WindowCols::default(),
                };
                c.push(self, *g, *g, window);
            }
            // Still a group but with no rows left (retracted): gone from the state's view.
            for g in changed.iter().copied() {
                if self.rows[g as usize] <= 0
                    && self.table.contains(g)
                    && self.table.tag(g) != NO_TAG
                {
                    since.push_removed(self.table.tag(g), self.table.key_bytes(g));
                }
            }
        }
        let mut key_group = key_groups(self, &c.gids)?;
        key_group.extend_from_slice(&since.removed_groups);
        let mut start = 0;
        for end in &since.removed_ends {
            c.push_tombstone(&since.removed_keys[start..*end]);
            start = *end;
        }
        let (chain_rows, chain_len) = {
            let b = &self.changes.written[at];
            (b.chain_rows + c.rows.len(), b.chain_len + 1)
        };
        self.changes.written.push(Written {
            epoch,
            changes: now,
            chain_rows,
            chain_len,
        });
        c.finish(key_group)
    }

    /// The whole state as the snapshot of checkpoint `epoch`: later deltas build on it.
    pub fn snapshot_full(&mut self, epoch: u64) -> Result<RecordBatch> {
        let batch = self.snapshot()?;
        self.full_snapshot_taken(epoch);
        Ok(batch)
    }

    /// The whole state as the snapshot of checkpoint `epoch`, copied for encoding elsewhere
    /// ([`FrozenState::encode`]), reusing the buffers of `spare` (an earlier copy); `None` when
    /// the state has sessions or accumulators that are not flat arrays (see
    /// [`sluice_state::Accumulator::freeze`]): [`AggregateState::snapshot_full`] then encodes it
    /// in place.
    pub fn freeze(
        &mut self,
        epoch: u64,
        spare: Option<FrozenState>,
    ) -> Result<Option<FrozenState>> {
        if self.sessions.is_some() {
            return Ok(None);
        }
        let (spare_accs, mut frozen) = match spare {
            Some(mut f) => (std::mem::take(&mut f.accs), Some(f)),
            None => (vec![], None),
        };
        let mut spare_accs = spare_accs.into_iter();
        let mut accs = Vec::with_capacity(self.accs.len());
        for acc in &self.accs {
            match acc.freeze(spare_accs.next()) {
                Some(a) => accs.push(a),
                None => return Ok(None),
            }
        }
        // Key groups of the keys new since the last snapshot, so that the copy has them all.
        let untagged: Vec<u32> = (0..self.rows.len() as u32)
            .filter(|g| self.rows[*g as usize] > 0 && self.table.tag(*g) == NO_TAG)
            .collect();
        key_groups(self, &untagged)?;
        let f = frozen.get_or_insert_with(|| FrozenState {
            keys: ByteSlots::default(),
            tags: vec![],
            rows: vec![],
            accs: vec![],
            last: ByteSlots::default(),
            windows: Windows::default(),
            windowed: false,
        });
        f.keys.clone_from(self.table.key_slots());
        f.tags.clear();
        f.tags.extend_from_slice(self.table.tags());
        f.rows.clone_from(&self.rows);
        f.accs = accs;
        f.last.clone_from(&self.last);
        f.windows.by_end.clone_from(&self.by_end);
        f.windows.cleanup.clone_from(&self.cleanup);
        f.windows.allowed_lateness_ms = self.emit.allowed_lateness_ms;
        f.windows.fired_through = self.fired_through();
        f.windowed = !self.by_end.is_empty() || !self.cleanup.is_empty();
        self.full_snapshot_taken(epoch);
        Ok(frozen)
    }

    /// Sliced windows: the end of the last window fired, if any.
    fn fired_through(&self) -> Option<i64> {
        self.slicing
            .as_ref()
            .map(|s| s.fired_until)
            .filter(|f| *f != i64::MIN)
    }

    /// Change tracking after a full snapshot of checkpoint `epoch`: later deltas build on it.
    fn full_snapshot_taken(&mut self, epoch: u64) {
        self.changes.take();
        if self.changes.enabled {
            self.changes.written = vec![Written {
                epoch,
                changes: ChangeSet::default(),
                chain_rows: 0,
                chain_len: 0,
            }];
        } else {
            self.changes.written.clear();
        }
    }

    /// The whole state as one batch (see [`snapshot_schema`]).
    pub fn snapshot(&mut self) -> Result<RecordBatch> {
        let windowed =
            self.sessions.is_some() || !self.by_end.is_empty() || !self.cleanup.is_empty();
        let mut c = SnapshotColumns::with_capacity(self.table.len(), windowed);
        if let Some(s) = &self.sessions {
            for (key, sessions) in &s.open {
                c.push_sessions(self, *key, sessions);
            }
        } else {
            let windows = Windows {
                by_end: std::mem::take(&mut self.by_end),
                cleanup: std::mem::take(&mut self.cleanup),
                allowed_lateness_ms: self.emit.allowed_lateness_ms,
                fired_through: self.fired_through(),
            };
            c.push_groups(self, &windows);
            self.by_end = windows.by_end;
            self.cleanup = windows.cleanup;
        }
        let key_group = key_groups(self, &c.gids)?;
        // Deltas cannot build on anything older than a full snapshot.
        self.changes.take();
        self.changes.written.clear();
        c.finish(key_group)
    }

    /// Restores the chains of files (per worker: a full snapshot, then deltas; each file as one
    /// batch) of a checkpoint, keeping the key groups `owns` accepts: a key's rows come from the
    /// newest file that holds it, and a tombstone there means the key is gone.
    pub fn restore_chains(
        &mut self,
        chains: &[Vec<RecordBatch>],
        owns: impl Fn(u16) -> bool,
    ) -> Result<()> {
        let rows: usize = chains.iter().flatten().map(|b| b.num_rows()).sum();
        self.table.reserve(rows);
        for chain in chains {
            if let [only] = &chain[..] {
                self.restore(only, &owns)?;
                continue;
            }
            if self.sessions.is_none() {
                self.restore_chain_by_key(chain, &owns)?;
                continue;
            }
            // Sessions (several rows per key): newest first, a key's rows are those of the
            // first file that has it.
            let rows: usize = chain.iter().map(|b| b.num_rows()).sum();
            let mut owner: hashbrown::HashMap<&[u8], usize> =
                hashbrown::HashMap::with_capacity(rows);
            for (at, batch) in chain.iter().enumerate().rev() {
                // Every layout starts with key group, key and rows.
                is_full_layout(batch)?;
                let key_group = batch.column(0).as_primitive::<UInt16Type>();
                let keys = batch.column(1).as_binary::<i32>();
                let rows = batch.column(2).as_primitive::<Int64Type>();
                let keep: BooleanArray = (0..batch.num_rows())
                    .map(|i| {
                        let newest = *owner.entry(keys.value(i)).or_insert(at) == at;
                        Some(newest && rows.value(i) > 0 && owns(key_group.value(i)))
                    })
                    .collect();
                let kept = arrow::compute::filter_record_batch(batch, &keep)?;
                self.restore(&kept, |_| true)?;
            }
        }
        Ok(())
    }
}

impl SnapshotColumns {
    /// Appends the open sessions of `key`.
    fn push_sessions(&mut self, state: &AggregateState, key: u32, sessions: &[Session]) {
        for sess in sessions {
            let window = WindowCols {
                session: Some((sess.start, sess.end)),
                ..Default::default()
            };
            self.push(state, key, sess.slot, window);
        }
    }

    /// A tombstone: `key` is gone.
    fn push_tombstone(&mut self, key: &[u8]) {
        self.keys.append_value(key);
        self.rows.push(0);
        if self.windowed {
            self.windows.push(WindowCols::default());
        }
        self.accs.append_value(b"");
        self.last.append_null();
    }

    /// The batch, given each row's key group.
    fn finish(mut self, key_group: Vec<u16>) -> Result<RecordBatch> {
        let key_group: UInt16Array = key_group.into_iter().collect();
        if !self.windowed {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(key_group),
                Arc::new(self.keys.finish()),
                Arc::new(Int64Array::from(std::mem::take(&mut self.rows))),
                Arc::new(self.accs.finish()),
                Arc::new(self.last.finish()),
            ];
            return Ok(RecordBatch::try_new(unwindowed_schema(), columns)?);
        }
        let c = &mut self;
        let w = &c.windows;
        let window_column = |f: fn(&WindowCols) -> Option<i64>| -> ArrayRef {
            Arc::new(w.iter().map(f).collect::<Int64Array>())
        };
        let fired: ArrayRef = Arc::new(w.iter().map(|w| w.fired).collect::<BooleanArray>());
        let columns: Vec<ArrayRef> = vec![
            Arc::new(key_group),
            Arc::new(c.keys.finish()),
            Arc::new(Int64Array::from(std::mem::take(&mut c.rows))),
            window_column(|w| w.end),
            fired,
            window_column(|w| w.session.map(|s| s.0)),
            window_column(|w| w.session.map(|s| s.1).or(w.fired_through)),
            Arc::new(c.accs.finish()),
            Arc::new(c.last.finish()),
        ];
        Ok(RecordBatch::try_new(snapshot_schema(), columns)?)
    }
}

impl AggregateState {
    /// One chain of a state with one row per key, newest file first, with the group table as
    /// the record of keys seen: a key already there came from a newer file (or is a newer
    /// tombstone's marker); a tombstone leaves a marker group, removed once the chain is read.
    fn restore_chain_by_key(
        &mut self,
        chain: &[RecordBatch],
        owns: &impl Fn(u16) -> bool,
    ) -> Result<()> {
        let mut markers = vec![];
        for batch in chain.iter().rev() {
            // Every layout starts with key group, key and rows.
            is_full_layout(batch)?;
            let key_group = batch.column(0).as_primitive::<UInt16Type>();
            let keys = batch.column(1).as_binary::<i32>();
            let rows = batch.column(2).as_primitive::<Int64Type>();
            let new: Vec<usize> = (0..batch.num_rows())
                .filter(|i| owns(key_group.value(*i)) && self.table.get(keys.value(*i)).is_none())
                .collect();
            let mut live = vec![false; batch.num_rows()];
            for i in new.iter().copied().filter(|i| rows.value(*i) > 0) {
                live[i] = true;
            }
            let kept = arrow::compute::filter_record_batch(batch, &BooleanArray::from(live))?;
            self.restore(&kept, |_| true)?;
            // A delta can hold a key's tombstone and its new row (removed, then added again
            // since its base): the row wins.
            for i in new.into_iter().filter(|i| rows.value(*i) <= 0) {
                if self.table.get(keys.value(i)).is_none() {
                    markers.push(self.table.intern_bytes(keys.value(i)));
                }
            }
            self.rows.resize(self.table.capacity(), 0);
        }
        for g in markers {
            self.table.remove(g);
        }
        Ok(())
    }

    /// Loads the rows of a snapshot whose key group `owns` accepts. The state must be empty.
    pub fn restore(&mut self, batch: &RecordBatch, owns: impl Fn(u16) -> bool) -> Result<()> {
        let batch = full_layout(batch)?;
        let batch = batch.as_ref();
        let corrupt = |e: sluice_state::snapshot::CorruptSnapshot| Error::Runtime(e.to_string());
        let col = |i: usize| batch.column(i);
        let key_group = col(0).as_primitive::<UInt16Type>();
        let keys = col(1).as_binary::<i32>();
        let rows = col(2).as_primitive::<Int64Type>();
        let ends = col(3).as_primitive::<Int64Type>();
        let fired = col(4).as_boolean();
        let (s_start, s_end) = (
            col(5).as_primitive::<Int64Type>(),
            col(6).as_primitive::<Int64Type>(),
        );
        let accs = col(7).as_binary::<i32>();
        let last = col(8).as_binary::<i32>();
        for i in 0..batch.num_rows() {
            if !owns(key_group.value(i)) {
                continue;
            }
            let g = self.table.intern_bytes(keys.value(i));
            self.table.set_tag(g, key_group.value(i));
            let capacity = self.table.capacity();
            self.rows.resize(capacity, 0);
            self.is_dirty.resize(capacity, false);
            self.rows[g as usize] = rows.value(i);
            let slot = match self.sessions.as_mut() {
                Some(s) => {
                    let slot = s.free_slots.pop().unwrap_or_else(|| {
                        s.slots += 1;
                        s.slot_key.push(0);
                        (s.slots - 1) as u32
                    });
                    s.slot_key[slot as usize] = g;
                    let sess = Session {
                        start: s_start.value(i),
                        end: s_end.value(i),
                        slot,
                    };
                    s.open.entry(g).or_default().push(sess);
                    s.ends.insert((sess.end, slot));
                    slot
                }
                None => {
                    if ends.is_valid(i) {
                        let end = ends.value(i);
                        if fired.value(i) {
                            self.cleanup
                                .entry(end + self.emit.allowed_lateness_ms)
                                .or_default()
                                .push(g);
                        } else {
                            self.by_end.entry(end).or_default().push(g);
                        }
                    }
                    if last.is_valid(i) {
                        self.last.set(g, last.value(i));
                    }
                    if let (Some(s), true) = (self.slicing.as_mut(), s_end.is_valid(i)) {
                        let f = &mut s.restored_fired;
                        f.resize(f.len().max(g as usize + 1), i64::MIN);
                        f[g as usize] = s_end.value(i);
                    }
                    g
                }
            };
            let mut r = Reader(accs.value(i));
            for acc in self.accs.iter_mut() {
                let bytes = r.bytes().map_err(corrupt)?;
                acc.restore_group(slot, bytes).map_err(corrupt)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::{BinaryArray, Int64Array};
    use datafusion_physical_expr::expressions::Column;
    use sluice_common::{ChangeBatch, Op};
    use sluice_sql::{AggCall, AggFunc, AggWindow, EmitPolicy, PhysExpr};

    use super::*;
    use crate::runtime::worker_for_hash;

    fn input_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]))
    }

    /// An aggregate call with a BIGINT result.
    fn call(func: AggFunc, arg: Option<PhysExpr>, distinct: bool) -> AggCall {
        AggCall {
            func,
            arg,
            distinct,
            filter: None,
            output_type: DataType::Int64,
        }
    }

    fn state() -> AggregateState {
        let k: PhysExpr = Arc::new(Column::new("k", 0));
        let v: PhysExpr = Arc::new(Column::new("v", 1));
        let calls = vec![
            call(AggFunc::Count, None, false),
            call(AggFunc::Sum, Some(v.clone()), false),
            call(AggFunc::Max, Some(v.clone()), false),
            call(AggFunc::Count, Some(v), true),
        ];
        let out = Arc::new(Schema::new(
            ["k", "n", "s", "m", "d"]
                .iter()
                .map(|n| Field::new(*n, DataType::Int64, true))
                .collect::<Vec<_>>(),
        ));
        AggregateState::try_new(
            vec![k],
            calls,
            AggWindow::None,
            EmitPolicy::default(),
            None,
            out,
            &input_schema(),
        )
        .unwrap()
    }

    fn batch(rows: &[(i64, i64)]) -> ChangeBatch {
        let k = Int64Array::from_iter_values(rows.iter().map(|r| r.0));
        let v = Int64Array::from_iter_values(rows.iter().map(|r| r.1));
        ChangeBatch::inserts(
            RecordBatch::try_new(input_schema(), vec![Arc::new(k), Arc::new(v)]).unwrap(),
        )
    }

    /// Every live group's key and results.
    fn current(s: &AggregateState) -> BTreeMap<i64, Vec<i64>> {
        let gids: Vec<u32> = (0..s.rows.len() as u32)
            .filter(|g| s.rows[*g as usize] > 0)
            .collect();
        let keys = s.output_keys(&gids).unwrap();
        let results = s.results(&gids).unwrap();
        (0..gids.len())
            .map(|i| {
                let key = keys[0].as_primitive::<Int64Type>().value(i);
                (
                    key,
                    results
                        .iter()
                        .map(|r| r.as_primitive::<Int64Type>().value(i))
                        .collect(),
                )
            })
            .collect()
    }

    /// COUNT and SUM (flat arrays): a frozen copy encodes to exactly the snapshot of the state
    /// when it was copied (key groups included), however the state changed since, and a copy
    /// that reuses an earlier one's buffers does too. MIN/MAX state is not copied.
    #[test]
    fn a_frozen_copy_encodes_as_the_state_was() {
        use rand::{Rng, SeedableRng};
        let make = || {
            let k: PhysExpr = Arc::new(Column::new("k", 0));
            let v: PhysExpr = Arc::new(Column::new("v", 1));
            let out = Arc::new(Schema::new(
                ["k", "n", "s"]
                    .iter()
                    .map(|n| Field::new(*n, DataType::Int64, true))
                    .collect::<Vec<_>>(),
            ));
            AggregateState::try_new(
                vec![k],
                vec![
                    call(AggFunc::Count, None, false),
                    call(AggFunc::Sum, Some(v), false),
                ],
                AggWindow::None,
                EmitPolicy::default(),
                None,
                out,
                &input_schema(),
            )
            .unwrap()
        };
        let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
        let (mut live, mut twin) = (make(), make());
        live.track_changes();
        let mut spare = None;
        for round in 0..6u64 {
            let rows: Vec<(i64, i64)> = (0..2000)
                .map(|_| {
                    (
                        rng.random_range(0..(round as i64 + 1) * 300),
                        rng.random_range(-5..50),
                    )
                })
                .collect();
            for s in [&mut live, &mut twin] {
                s.apply(&batch(&rows)).unwrap();
            }
            let frozen = live
                .freeze(round, spare.take())
                .unwrap()
                .expect("flat state");
            let want = twin.snapshot().unwrap();
            // The state moves on (new keys, updated ones) before the copy is encoded.
            live.apply(&batch(&[(-1, 7), (0, 1), (1_000_000, 2)]))
                .unwrap();
            let got = frozen.encode().unwrap();
            // Flat: accumulator fields as columns; the same rows as the per-group encoding.
            assert!(flat_accumulators(&got).is_some(), "round {round}");
            assert_eq!(
                full_layout(&got).unwrap().as_ref(),
                full_layout(&want).unwrap().as_ref(),
                "round {round}"
            );
            assert!(got.get_array_memory_size() < want.get_array_memory_size());
            assert!(got.num_rows() > 250);
            // Restored, the flat snapshot is the state the per-group one restores.
            let mut restored = make();
            restored.restore(&got, |_| true).unwrap();
            assert_eq!(restored.snapshot().unwrap(), want, "round {round}");
            let key_group = got.column(0).as_primitive::<UInt16Type>();
            assert!(key_group.values().iter().all(|kg| *kg != NO_TAG));
            spare = Some(frozen);
            twin.apply(&batch(&[(-1, 7), (0, 1), (1_000_000, 2)]))
                .unwrap();
        }
        // MAX keeps a map per group: no copy, the caller encodes in place.
        assert!(state().freeze(9, None).unwrap().is_none());
    }

    /// The rows worker `w` of `n` gets when the exchange routes them by the key `key` gives.
    fn owned_by<T: Copy>(rows: &[T], key: impl Fn(&T) -> i64, w: usize, n: usize) -> Vec<T> {
        let keys = Int64Array::from_iter_values(rows.iter().map(key));
        let mut hashes = vec![0u64; rows.len()];
        datafusion_common::hash_utils::create_hashes(
            &[Arc::new(keys) as ArrayRef],
            &key_hash_state(),
            &mut hashes,
        )
        .unwrap();
        rows.iter()
            .zip(&hashes)
            .filter(|(_, h)| worker_for_hash(**h, n) == w)
            .map(|(r, _)| *r)
            .collect()
    }

    #[test]
    fn a_snapshot_restores_on_another_worker_count() {
        let first: Vec<(i64, i64)> = (0..500).map(|i| (i % 37, (i * 7919) % 101)).collect();
        let second: Vec<(i64, i64)> = (0..500).map(|i| (i % 53, (i * 104729) % 97)).collect();
        let mut one = state();
        one.apply(&batch(&first)).unwrap();
        let snap = one.snapshot().unwrap();
        assert_eq!(snap.num_rows(), 37);
        one.apply(&batch(&second)).unwrap();

        // Restore on two workers, each keeping the key groups it owns, and route the rest of the
        // input the way the exchange does.
        let mut parts = vec![];
        for w in 0..2 {
            let mut s = state();
            s.restore(&snap, |kg| worker_for_hash(kg as u64, 2) == w)
                .unwrap();
            let mine = owned_by(&second, |r| r.0, w, 2);
            s.apply(&batch(&mine)).unwrap();
            parts.push(current(&s));
        }
        let mut merged = parts[0].clone();
        for (k, v) in &parts[1] {
            assert!(
                merged.insert(*k, v.clone()).is_none(),
                "key {k} restored on both workers"
            );
        }
        assert_eq!(merged, current(&one));
    }

    /// A snapshot altered inside its bytes (as a crafted file whose checksums were made to
    /// match would be) restores or fails with an error: never a panic, a hang, or a huge
    /// allocation (which would abort the test). Checksums catch damage before this; this is the
    /// decoders' own defence.
    #[test]
    fn altered_snapshot_bytes_restore_or_fail_cleanly() {
        let rows: Vec<(i64, i64)> = (0..20_000)
            .map(|i| (i % 5_000, (i * 7919) % 1_003))
            .collect();
        let mut one = state();
        one.apply(&batch(&rows)).unwrap();
        crate::checkpoint::fuzz::altered_snapshots_restore_or_fail(
            &one.snapshot().unwrap(),
            200,
            |b| {
                let mut s = state();
                let restored = s.restore(b, |_| true).is_ok();
                if restored {
                    // A restored state still runs: new rows update the restored groups.
                    let _ = s.apply(&batch(&rows[..2_000]));
                    let _ = s.advance_watermark(i64::MAX);
                }
                restored
            },
        );
    }

    /// The input of [`sliced_hop`]: key, pane start and end, value.
    fn pane_input() -> Schema {
        let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None);
        Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("ws", ts.clone(), false),
            Field::new("we", ts, false),
            Field::new("v", DataType::Int64, false),
        ])
    }

    /// A HOP window (3 s, sliding by 1 s) per key, aggregated in panes: COUNT(*), SUM and,
    /// unless `flat`, MAX. Input: key, pane start and end (a tumbling window of the slide), value.
    fn sliced_hop(flat: bool) -> AggregateState {
        let input = pane_input();
        let ts = input.field(1).data_type().clone();
        let col = |n: &str, i: usize| Arc::new(Column::new(n, i)) as PhysExpr;
        let mut calls = vec![
            call(AggFunc::Count, None, false),
            call(AggFunc::Sum, Some(col("v", 3)), false),
        ];
        let mut out = vec![
            Field::new("k", DataType::Int64, false),
            Field::new("ws", ts.clone(), false),
            Field::new("we", ts, false),
            Field::new("n", DataType::Int64, true),
            Field::new("s", DataType::Int64, true),
        ];
        if !flat {
            calls.push(call(AggFunc::Max, Some(col("v", 3)), false));
            out.push(Field::new("m", DataType::Int64, true));
        }
        let mut s = AggregateState::try_new(
            vec![col("k", 0), col("ws", 1), col("we", 2)],
            calls,
            AggWindow::Assigned {
                start_key: 1,
                end_key: 2,
                as_struct: false,
            },
            EmitPolicy::default(),
            None,
            Arc::new(Schema::new(out)),
            &input,
        )
        .unwrap();
        s.partition_by(vec![0]);
        s.slice(3000, 1000, &input).unwrap();
        s
    }

    /// Rows (key, time, value) as the input of [`sliced_hop`]: each in its pane.
    fn panes(rows: &[(i64, i64, i64)]) -> ChangeBatch {
        let schema = Arc::new(pane_input());
        let start = |t: i64| t.div_euclid(1000) * 1000;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(arrow::array::TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| start(r.1)),
            )),
            Arc::new(arrow::array::TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| start(r.1) + 1000),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
        ];
        ChangeBatch::inserts(RecordBatch::try_new(schema, columns).unwrap())
    }

    /// Output rows as (key, window start, window end, results...), counted.
    fn window_rows(out: &[ChangeBatch], into: &mut BTreeMap<Vec<i64>, usize>) {
        for b in out {
            assert!(b.is_append_only(), "windows fire once");
            for i in 0..b.num_rows() {
                let row: Vec<i64> = b
                    .data
                    .columns()
                    .iter()
                    .map(|c| {
                        let c = arrow::compute::cast(c, &DataType::Int64).unwrap();
                        c.as_primitive::<Int64Type>().value(i)
                    })
                    .collect();
                *into.entry(row).or_default() += 1;
            }
        }
    }

    /// A sliced HOP window gives every window's results once, equal to a direct computation,
    /// uninterrupted and when its state is snapshotted mid-stream (after some windows fired,
    /// while their panes are still needed by later ones) and restored on two workers: windows
    /// fired before the snapshot are not fired again, none is lost.
    #[test]
    fn sliced_hop_windows_fire_once_across_a_restore_on_another_worker_count() {
        use rand::{Rng, SeedableRng};
        for flat in [true, false] {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
            // Times mostly rising, up to 1 s out of order; the watermark trails by 1.5 s, so no
            // row is late. Keys sparse enough that some windows of a key hold one pane only.
            let mut batches = vec![];
            let mut t = 0i64;
            for _ in 0..40 {
                let rows: Vec<(i64, i64, i64)> = (0..30)
                    .map(|_| {
                        t += rng.random_range(0..60);
                        let time = t - rng.random_range(0..1000);
                        (rng.random_range(0..12), time, rng.random_range(-50..100))
                    })
                    .collect();
                batches.push((rows, t - 1500));
            }
            // The answer: every window [e - 3 s, e) holding rows of a key.
            let mut want: BTreeMap<Vec<i64>, usize> = BTreeMap::new();
            let mut windows: BTreeMap<(i64, i64), Vec<i64>> = BTreeMap::new();
            for (k, time, v) in batches.iter().flat_map(|(rows, _)| rows.iter()) {
                let first_end = time.div_euclid(1000) * 1000 + 1000;
                for end in [first_end, first_end + 1000, first_end + 2000] {
                    windows.entry((*k, end)).or_default().push(*v);
                }
            }
            for ((k, end), vs) in &windows {
                let mut row = vec![*k, end - 3000, *end, vs.len() as i64, vs.iter().sum()];
                if !flat {
                    row.push(*vs.iter().max().unwrap());
                }
                want.insert(row, 1);
            }

            let mut one = sliced_hop(flat);
            let (mut got, mut before, mut out) = (BTreeMap::new(), vec![], vec![]);
            let mut snap = None;
            for (i, (rows, wm)) in batches.iter().enumerate() {
                out.extend(one.apply(&panes(rows)).unwrap().output);
                out.extend(one.advance_watermark(*wm).unwrap());
                if i == 19 {
                    snap = Some(if flat {
                        one.freeze(1, None)
                            .unwrap()
                            .expect("flat")
                            .encode()
                            .unwrap()
                    } else {
                        one.snapshot().unwrap()
                    });
                    before = out.clone();
                }
            }
            out.extend(one.advance_watermark(i64::MAX).unwrap());
            window_rows(&out, &mut got);
            assert_eq!(got, want, "uninterrupted, flat {flat}");

            // Restored on two workers, each fed its keys' rows from the snapshot on.
            let snap = snap.unwrap();
            let mut got = BTreeMap::new();
            window_rows(&before, &mut got);
            for w in 0..2 {
                let mut s = sliced_hop(flat);
                s.restore(&snap, |kg| worker_for_hash(kg as u64, 2) == w)
                    .unwrap();
                let mut out = vec![];
                for (rows, wm) in &batches[20..] {
                    let mine = owned_by(rows, |r| r.0, w, 2);
                    out.extend(s.apply(&panes(&mine)).unwrap().output);
                    out.extend(s.advance_watermark(*wm).unwrap());
                }
                out.extend(s.advance_watermark(i64::MAX).unwrap());
                window_rows(&out, &mut got);
            }
            assert_eq!(got, want, "restored on two workers, flat {flat}");
        }
    }

    /// Input of the session tests: a key and an event time.
    fn session_input() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new(
                "ts",
                DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
                false,
            ),
        ]))
    }

    /// COUNT(*) per key and session with the given gap.
    fn session_count(gap: i64) -> AggregateState {
        let out = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new(
                "window_start",
                sluice_sql::functions::window_time_type(),
                false,
            ),
            Field::new(
                "window_end",
                sluice_sql::functions::window_time_type(),
                false,
            ),
            Field::new("n", DataType::Int64, false),
        ]));
        AggregateState::try_new(
            vec![Arc::new(Column::new("k", 0))],
            vec![AggCall {
                func: AggFunc::Count,
                arg: None,
                distinct: false,
                filter: None,
                output_type: DataType::Int64,
            }],
            AggWindow::Session {
                gap,
                time: Arc::new(Column::new("ts", 1)),
                output: sluice_sql::SessionOutput::Columns { start: 1, end: 2 },
            },
            EmitPolicy::default(),
            None,
            out,
            &session_input(),
        )
        .unwrap()
    }

    /// Sessions (and their merging after a restore) and assigned windows survive a snapshot.
    #[test]
    fn windows_and_sessions_survive_a_snapshot() {
        use arrow::array::TimestampMillisecondArray;
        let schema = session_input();
        let make = || session_count(10);
        let rows = |r: &[(i64, i64)]| {
            let k = Int64Array::from_iter_values(r.iter().map(|x| x.0));
            let t = TimestampMillisecondArray::from_iter_values(r.iter().map(|x| x.1));
            ChangeBatch::inserts(
                RecordBatch::try_new(schema.clone(), vec![Arc::new(k), Arc::new(t)]).unwrap(),
            )
        };
        let render = |b: Option<ChangeBatch>| {
            let mut v = sluice_connectors::memory::row_strings(&b.unwrap().data).unwrap();
            v.sort();
            v
        };
        // A bridging row and a new session in one batch: the new session must not inherit the
        // slot of the session merged away in the same batch.
        {
            let mut s = make();
            s.apply(&rows(&[(1, 0), (1, 15)])).unwrap();
            s.apply(&rows(&[(1, 8), (1, 100)])).unwrap();
            let out = render(s.advance_watermark(i64::MAX).unwrap());
            assert_eq!(
                out,
                vec![
                    vec![
                        "1",
                        "1970-01-01 00:00:00.000",
                        "1970-01-01 00:00:00.025",
                        "3"
                    ],
                    vec![
                        "1",
                        "1970-01-01 00:00:00.100",
                        "1970-01-01 00:00:00.110",
                        "1"
                    ],
                ]
            );
        }
        // Sessions [0, 10) and [15, 25) for key 1; a row at 8 bridges them after the restore.
        let mut a = make();
        a.apply(&rows(&[(1, 0), (1, 15), (2, 5)])).unwrap();
        let mut b = make();
        b.restore(&a.snapshot().unwrap(), |_| true).unwrap();
        for s in [&mut a, &mut b] {
            s.apply(&rows(&[(1, 8)])).unwrap();
        }
        let (fa, fb) = (
            a.advance_watermark(i64::MAX).unwrap(),
            b.advance_watermark(i64::MAX).unwrap(),
        );
        let (ra, rb) = (render(fa), render(fb));
        assert_eq!(ra, rb);
        assert_eq!(ra.len(), 2, "key 1 merged into one session: {ra:?}");
        assert_eq!(
            ra[0],
            vec![
                "1",
                "1970-01-01 00:00:00.000",
                "1970-01-01 00:00:00.025",
                "3"
            ]
        );
    }

    /// One step of a randomized run: a batch of changes, or a watermark.
    enum Step {
        Apply(ChangeBatch),
        Watermark(i64),
        EarlyFire,
    }

    fn run(s: &mut AggregateState, step: &Step) {
        match step {
            Step::Apply(b) => {
                s.apply(b).unwrap();
            }
            Step::Watermark(w) => {
                s.advance_watermark(*w).unwrap();
            }
            Step::EarlyFire => {
                s.early_fire().unwrap();
            }
        }
    }

    /// Rows of a full snapshot, in a canonical order.
    fn canonical(s: &mut AggregateState) -> Vec<Vec<String>> {
        let mut rows = sluice_connectors::memory::row_strings(&s.snapshot().unwrap()).unwrap();
        rows.sort();
        rows
    }

    /// Feeds the same random steps to a state that tracks changes (checkpointed as a chain: a
    /// full snapshot, then deltas) and to an untracked twin; after every checkpoint, a state
    /// restored from the chain must equal the twin (`same`).
    fn chains_restore_the_state(
        make: impl Fn() -> AggregateState,
        mut next: impl FnMut(&mut rand::rngs::SmallRng) -> Step,
        same: impl Fn(&mut AggregateState, &mut AggregateState, &[RecordBatch]),
        flat: bool,
    ) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let (mut live, mut twin) = (make(), make());
        live.track_changes();
        let mut chain: Vec<(u64, RecordBatch)> = vec![];
        let mut epoch = 0;
        let (mut deltas, mut tombstones, mut frozen) = (0, 0, 0);
        // Steps the live state ran past a snapshot, which the twin has yet to run.
        let mut ahead: Vec<Step> = vec![];
        let mut spare = None;
        for _ in 0..150 {
            for step in ahead.drain(..) {
                run(&mut twin, &step);
            }
            for _ in 0..rng.random_range(1..4) {
                let step = next(&mut rng);
                run(&mut live, &step);
                run(&mut twin, &step);
            }
            // Any mix of full snapshots and deltas must restore the same state (when to write
            // which is the operator's policy, `delta_base`). A delta may build on an older
            // snapshot than the last, when the checkpoints after it did not commit: then the
            // chain drops their files. After more than half of the groups changed, only a full
            // snapshot is possible.
            epoch += 1;
            if chain.is_empty() || rng.random_bool(0.15) || live.changes.overflow {
                match live.freeze(epoch, spare.take()).unwrap() {
                    // A frozen copy is the state when copied: the state moves on before the
                    // copy is encoded (as it does while the writer thread encodes it).
                    Some(f) if rng.random_bool(0.5) => {
                        for _ in 0..rng.random_range(1..3) {
                            let step = next(&mut rng);
                            run(&mut live, &step);
                            ahead.push(step);
                        }
                        chain = vec![(epoch, f.encode().unwrap())];
                        spare = Some(f);
                        frozen += 1;
                    }
                    _ => chain = vec![(epoch, live.snapshot_full(epoch).unwrap())],
                }
            } else {
                let base = chain[rng.random_range(0..chain.len())].0;
                chain.retain(|(e, _)| *e <= base);
                let delta = live.snapshot_delta(base, epoch).unwrap();
                let rows = delta.column(2).as_primitive::<Int64Type>();
                tombstones += rows.values().iter().filter(|r| **r == 0).count();
                chain.push((epoch, delta));
                deltas += 1;
            }
            let files: Vec<RecordBatch> = chain.iter().map(|(_, b)| b.clone()).collect();
            let mut restored = make();
            restored
                .restore_chains(std::slice::from_ref(&files), |_| true)
                .unwrap();
            same(&mut restored, &mut twin, &files);
        }
        assert!(deltas > 30, "only {deltas} deltas written");
        assert!(tombstones > 0, "no delta removed a key");
        if flat {
            assert!(frozen > 3, "only {frozen} frozen copies encoded");
        }
    }

    /// Unwindowed COUNT, SUM, MAX, COUNT DISTINCT with retractions that remove groups; the chain
    /// also restores split over two workers.
    #[test]
    fn incremental_chains_restore_an_updating_aggregation() {
        use rand::Rng;
        let mut present: Vec<(i64, i64)> = vec![];
        chains_restore_the_state(
            state,
            |rng| {
                let mut rows = vec![];
                let mut ops = vec![];
                for _ in 0..rng.random_range(1..40) {
                    if !present.is_empty() && rng.random_bool(0.4) {
                        let at = rng.random_range(0..present.len());
                        rows.push(present.swap_remove(at));
                        ops.push(Op::Delete);
                    } else {
                        let row = (rng.random_range(0..300), rng.random_range(0..50));
                        present.push(row);
                        rows.push(row);
                        ops.push(Op::Insert);
                    }
                }
                Step::Apply(ChangeBatch::with_ops(batch(&rows).data, ops))
            },
            |restored, twin, chain| {
                let want = current(twin);
                assert_eq!(current(restored), want);
                let mut merged = BTreeMap::new();
                for w in 0..2 {
                    let mut part = state();
                    part.restore_chains(&[chain.to_vec()], |kg| worker_for_hash(kg as u64, 2) == w)
                        .unwrap();
                    merged.extend(current(&part));
                }
                assert_eq!(merged, want);
            },
            false,
        );
    }

    /// Tumbling windows with early firing and allowed lateness: windows open, emit early, fire
    /// (kept for late rows, which update them), and are dropped as the watermark moves.
    #[test]
    fn incremental_chains_restore_windows() {
        use arrow::array::TimestampMillisecondArray;
        use arrow::datatypes::TimeUnit;
        use rand::Rng;
        let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("ws", ts.clone(), false),
            Field::new("we", ts.clone(), false),
            Field::new("v", DataType::Int64, false),
        ]));
        let out = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("ws", ts.clone(), false),
            Field::new("we", ts.clone(), false),
            Field::new("n", DataType::Int64, true),
            Field::new("s", DataType::Int64, true),
        ]));
        let col = |i: usize, name: &str| -> PhysExpr { Arc::new(Column::new(name, i)) };
        let make = || {
            AggregateState::try_new(
                vec![col(0, "k"), col(1, "ws"), col(2, "we")],
                vec![
                    call(AggFunc::Count, None, false),
                    call(AggFunc::Sum, Some(col(3, "v")), false),
                ],
                AggWindow::Assigned {
                    start_key: 1,
                    end_key: 2,
                    as_struct: false,
                },
                EmitPolicy {
                    allowed_lateness_ms: 300,
                    early_fire_ms: Some(1),
                    ..EmitPolicy::default()
                },
                None,
                out.clone(),
                &schema,
            )
            .unwrap()
        };
        let mut now = 0i64;
        chains_restore_the_state(
            make,
            |rng| {
                if rng.random_bool(0.3) {
                    now += rng.random_range(0..300);
                    return Step::Watermark(now);
                }
                if rng.random_bool(0.3) {
                    return Step::EarlyFire;
                }
                let n = rng.random_range(1..30);
                let rows: Vec<(i64, i64, i64)> = (0..n)
                    .map(|_| {
                        let t = now - 400 + rng.random_range(0..1000);
                        (
                            rng.random_range(0..20),
                            t - t.rem_euclid(100),
                            rng.random_range(0..9),
                        )
                    })
                    .collect();
                let k = Int64Array::from_iter_values(rows.iter().map(|r| r.0));
                let ws = TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1));
                let we =
                    TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1 + 100));
                let v = Int64Array::from_iter_values(rows.iter().map(|r| r.2));
                Step::Apply(ChangeBatch::inserts(
                    RecordBatch::try_new(
                        schema.clone(),
                        vec![Arc::new(k), Arc::new(ws), Arc::new(we), Arc::new(v)],
                    )
                    .unwrap(),
                ))
            },
            |restored, twin, _| assert_eq!(canonical(restored), canonical(twin)),
            true,
        );
    }

    /// Session windows: sessions open, merge and close (removing their key).
    #[test]
    fn incremental_chains_restore_sessions() {
        use arrow::array::TimestampMillisecondArray;
        use rand::Rng;
        let schema = session_input();
        let make = || session_count(50);
        let mut now = 0i64;
        chains_restore_the_state(
            make,
            |rng| {
                if rng.random_bool(0.3) {
                    now += rng.random_range(0..100);
                    return Step::Watermark(now);
                }
                let n = rng.random_range(1..20);
                let rows: Vec<(i64, i64)> = (0..n)
                    .map(|_| (rng.random_range(0..15), now + rng.random_range(0..300)))
                    .collect();
                let k = Int64Array::from_iter_values(rows.iter().map(|r| r.0));
                let t = TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.1));
                Step::Apply(ChangeBatch::inserts(
                    RecordBatch::try_new(schema.clone(), vec![Arc::new(k), Arc::new(t)]).unwrap(),
                ))
            },
            |restored, twin, _| assert_eq!(canonical(restored), canonical(twin)),
            false,
        );
    }

    #[test]
    fn a_damaged_snapshot_is_an_error() {
        let mut s = state();
        s.apply(&batch(&[(1, 5), (1, 6)])).unwrap();
        let snap = s.snapshot().unwrap();
        let at = snap.schema().index_of("accumulators").unwrap();
        let accs = snap.column(at).as_binary::<i32>();
        let cut = BinaryArray::from_iter_values([&accs.value(0)[..accs.value(0).len() - 3]]);
        let mut columns = snap.columns().to_vec();
        columns[at] = Arc::new(cut);
        let damaged = RecordBatch::try_new(snap.schema(), columns).unwrap();
        let err = state().restore(&damaged, |_| true).unwrap_err();
        assert!(err.to_string().contains("corrupt state snapshot"), "{err}");
    }
}
