//! Retractable aggregate state over all groups of an operator.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use arrow::array::{Array, ArrayRef, AsArray, Decimal128Array, Float64Array, Int64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Decimal128Type, Float64Type, Int64Type};
use arrow::error::ArrowError;
use arrow_row::{RowConverter, SortField};

use crate::snapshot::{CorruptSnapshot, Reader, Writer};

/// The aggregate function an accumulator computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccKind {
    Count,
    Sum,
    Avg,
    Min,
    Max,
}

/// Numeric representation used while summing.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int,
    Float,
    Decimal { scale: i8 },
}

enum State {
    /// COUNT: non-null rows per group.
    Count(Vec<i64>),
    /// SUM/AVG over integers: sum and non-null count.
    SumInt(Vec<i64>, Vec<i64>),
    SumFloat(Vec<f64>, Vec<i64>),
    SumDecimal(Vec<i128>, Vec<i64>),
    /// MIN/MAX: a multiset of row-encoded values, so retractions are exact.
    Extreme {
        converter: RowConverter,
        values: Vec<BTreeMap<Box<[u8]>, i64>>,
    },
}

impl State {
    /// Writes group `g`'s state (see [`Accumulator::snapshot_group`]).
    #[inline]
    fn snapshot_group(&self, g: usize, w: &mut Writer) {
        match self {
            State::Count(c) => w.i64(c[g]),
            State::SumInt(s, c) => {
                w.i64(s[g]);
                w.i64(c[g]);
            }
            State::SumFloat(s, c) => {
                w.f64(s[g]);
                w.i64(c[g]);
            }
            State::SumDecimal(s, c) => {
                w.i128(s[g]);
                w.i64(c[g]);
            }
            State::Extreme { values, .. } => {
                w.multiset(values[g].iter().map(|(k, m)| (&k[..], *m)))
            }
        }
    }
}

/// A copy of an accumulator's per-group state ([`Accumulator::freeze`]), which can be encoded
/// on another thread while the accumulator goes on.
pub struct FrozenAccumulator(State);

impl FrozenAccumulator {
    /// Appends group `gid`'s state to `out`, as [`Accumulator::snapshot_group`] did when frozen.
    #[inline]
    pub fn snapshot_group(&self, gid: u32, out: &mut Vec<u8>) {
        self.0.snapshot_group(gid as usize, &mut Writer(out));
    }

    /// The states of groups `gids` as columns, one per field [`Accumulator::snapshot_group`]
    /// writes and in its order (BIGINT, DOUBLE or DECIMAL(38, 0) for 128-bit integers): a
    /// group's fields in little-endian bytes, concatenated, are its snapshot bytes (see
    /// [`group_bytes_from_columns`]).
    pub fn columns(&self, gids: &[u32]) -> Vec<ArrayRef> {
        fn gather<T: Copy>(v: &[T], gids: &[u32]) -> Vec<T> {
            gids.iter().map(|g| v[*g as usize]).collect()
        }
        let ints = |v: &[i64]| -> ArrayRef { Arc::new(Int64Array::from(gather(v, gids))) };
        match &self.0 {
            State::Count(c) => vec![ints(c)],
            State::SumInt(s, c) => vec![ints(s), ints(c)],
            State::SumFloat(s, c) => {
                vec![Arc::new(Float64Array::from(gather(s, gids))), ints(c)]
            }
            State::SumDecimal(s, c) => vec![
                Arc::new(
                    Decimal128Array::from(gather(s, gids))
                        .with_precision_and_scale(38, 0)
                        .expect("DECIMAL(38, 0) is valid"),
                ),
                ints(c),
            ],
            State::Extreme { .. } => unreachable!("MIN/MAX state is not frozen"),
        }
    }
}

/// Appends row `i`'s snapshot bytes of one accumulator, given the columns
/// [`FrozenAccumulator::columns`] wrote for it; an error names a column of another type.
pub fn group_bytes_from_columns(
    columns: &[ArrayRef],
    i: usize,
    out: &mut Vec<u8>,
) -> Result<(), CorruptSnapshot> {
    let mut w = Writer(out);
    for c in columns {
        match c.data_type() {
            DataType::Int64 => w.i64(c.as_primitive::<Int64Type>().value(i)),
            DataType::Float64 => w.f64(c.as_primitive::<Float64Type>().value(i)),
            DataType::Decimal128(_, _) => w.i128(c.as_primitive::<Decimal128Type>().value(i)),
            _ => return Err(CorruptSnapshot("accumulator column of an unexpected type")),
        }
    }
    Ok(())
}

/// How often each (row-encoded) value occurs in a group (hashbrown with foldhash: a value is
/// looked up by reference).
type Multiplicities = hashbrown::HashMap<ValueKey, i64>;

/// A row-encoded value: in place when short (a number, a short string), else on the heap. A
/// COUNT(DISTINCT) over a million values would otherwise allocate (and at the end free) a
/// million small boxes.
#[derive(Clone)]
enum ValueKey {
    Inline(u8, [u8; INLINE_KEY]),
    Heap(Box<[u8]>),
}

const INLINE_KEY: usize = 22;

impl std::ops::Deref for ValueKey {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ValueKey::Inline(len, bytes) => &bytes[..*len as usize],
            ValueKey::Heap(b) => b,
        }
    }
}

impl std::borrow::Borrow<[u8]> for ValueKey {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl From<&[u8]> for ValueKey {
    fn from(v: &[u8]) -> Self {
        if v.len() <= INLINE_KEY {
            let mut bytes = [0u8; INLINE_KEY];
            bytes[..v.len()].copy_from_slice(v);
            ValueKey::Inline(v.len() as u8, bytes)
        } else {
            ValueKey::Heap(v.into())
        }
    }
}

// Hashed and compared as the bytes, so that lookups by `&[u8]` find it.
impl std::hash::Hash for ValueKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl PartialEq for ValueKey {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for ValueKey {}

/// The value multiplicities of a DISTINCT aggregate.
enum Distinct {
    Own(RowConverter, Vec<Multiplicities>),
    /// Member `.1` of a family sharing one table (see [`DistinctFamily`]).
    Shared(Arc<Mutex<DistinctFamily>>, usize),
}

/// The most DISTINCT aggregates one [`DistinctFamily`] serves.
pub const FAMILY_MAX: usize = 4;

/// Value multiplicities per group for up to [`FAMILY_MAX`] DISTINCT aggregates over the same
/// argument that differ only in their FILTER (`COUNT(DISTINCT bidder) FILTER (WHERE ...)`, as in
/// Nexmark q15–q16): each value is kept and looked up once per row for all of them, with one
/// multiplicity per member. Each member snapshots and restores its own multiplicities, in the
/// layout of an unshared DISTINCT.
pub struct DistinctFamily {
    converter: RowConverter,
    tables: Tables,
}

/// Per group: each value and its multiplicities (one per member).
type Table<K, C> = hashbrown::HashMap<K, C>;

/// A value's multiplicity per member of a family.
trait MemberCounts: Copy + Default {
    fn get(&self, member: usize) -> i64;
    fn set(&mut self, member: usize, count: i64);
    /// Adds `sign` to a member's multiplicity; returns its [`transition`], or `None` for a
    /// change this kind cannot record.
    fn add(&mut self, member: usize, sign: i64) -> Option<i64>;
    /// No member holds the value.
    fn is_empty(&self) -> bool;
}

/// Exact multiplicities: values arrive and leave.
type Counts = [i64; FAMILY_MAX];

impl MemberCounts for Counts {
    #[inline]
    fn get(&self, member: usize) -> i64 {
        self[member]
    }
    #[inline]
    fn set(&mut self, member: usize, count: i64) {
        self[member] = count;
    }
    #[inline]
    fn add(&mut self, member: usize, sign: i64) -> Option<i64> {
        let before = self[member];
        self[member] += sign;
        Some(transition(before, self[member]))
    }
    #[inline]
    fn is_empty(&self) -> bool {
        self.iter().all(|c| *c == 0)
    }
}

/// For append-only input, where a value never leaves: whether each member has seen it, one bit
/// per member (a table entry of 16 bytes for a BIGINT instead of 40). Its multiplicity reads
/// as 1.
#[derive(Clone, Copy, Default)]
struct Seen(u8);

impl MemberCounts for Seen {
    #[inline]
    fn get(&self, member: usize) -> i64 {
        i64::from((self.0 >> member) & 1)
    }
    #[inline]
    fn set(&mut self, member: usize, count: i64) {
        self.0 = (self.0 & !(1 << member)) | (u8::from(count > 0) << member);
    }
    #[inline]
    fn add(&mut self, member: usize, sign: i64) -> Option<i64> {
        if sign < 0 {
            return None;
        }
        let before = self.get(member);
        self.0 |= 1 << member;
        Some(1 - before)
    }
    #[inline]
    fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// A family's tables, by how values are kept (BIGINTs as themselves: no row encoding, an
/// integer hash, smaller entries; others row-encoded) and whether they can leave.
enum Tables {
    Ints(Vec<Table<i64, Counts>>),
    Bytes(Vec<Table<ValueKey, Counts>>),
    IntsSeen(Vec<Table<i64, Seen>>),
    BytesSeen(Vec<Table<ValueKey, Seen>>),
}

fn retraction_error() -> ArrowError {
    ArrowError::InvalidArgumentError(
        "a retraction reached DISTINCT state kept for append-only input".into(),
    )
}

/// Applies rows to tables whose entry for row `i` `entry` finds (creating it) and `remove`
/// drops; `signs[m][i]` per member, results in `effective`.
fn apply_rows<K, C, E, R>(
    tables: &mut [Table<K, C>],
    gids: &[u32],
    signs: &[&[i64]],
    valid: impl Fn(usize) -> bool,
    mut entry: E,
    mut remove: R,
    effective: &mut [Vec<i64>],
) -> Result<(), ArrowError>
where
    C: MemberCounts,
    E: FnMut(&mut Table<K, C>, usize) -> &mut C,
    R: FnMut(&mut Table<K, C>, usize),
{
    for i in 0..gids.len() {
        if !valid(i) || signs.iter().all(|s| s[i] == 0) {
            continue;
        }
        let table = &mut tables[gids[i] as usize];
        let c = entry(table, i);
        for (m, s) in signs.iter().enumerate() {
            if s[i] != 0 {
                effective[m][i] = c.add(m, s[i]).ok_or_else(retraction_error)?;
            }
        }
        if c.is_empty() {
            remove(table, i);
        }
    }
    Ok(())
}

/// [`apply_rows`] for BIGINT values.
fn apply_ints<C: MemberCounts>(
    tables: &mut [Table<i64, C>],
    gids: &[u32],
    signs: &[&[i64]],
    values: &ArrayRef,
    effective: &mut [Vec<i64>],
) -> Result<(), ArrowError> {
    let v = values.as_primitive::<Int64Type>().values();
    apply_rows(
        tables,
        gids,
        signs,
        |i| values.is_valid(i),
        |t, i| t.entry(v[i]).or_default(),
        |t, i| {
            t.remove(&v[i]);
        },
        effective,
    )
}

/// [`apply_rows`] for row-encoded values.
fn apply_bytes<C: MemberCounts>(
    tables: &mut [Table<ValueKey, C>],
    gids: &[u32],
    signs: &[&[i64]],
    values: &ArrayRef,
    rows: &arrow_row::Rows,
    effective: &mut [Vec<i64>],
) -> Result<(), ArrowError> {
    apply_rows(
        tables,
        gids,
        signs,
        |i| values.is_valid(i),
        |t, i| t.entry_ref(rows.row(i).as_ref()).or_default(),
        |t, i| {
            t.remove(rows.row(i).as_ref());
        },
        effective,
    )
}

/// Clears a member's multiplicities in one table.
fn reset_member<K, C: MemberCounts>(table: &mut Table<K, C>, member: usize) {
    table.retain(|_, c| {
        c.set(member, 0);
        !c.is_empty()
    });
}

/// Adds a member's multiplicities of table `s` into table `d`; returns how many more of its
/// values `d` holds (values that arrived less values that left), visiting only `s`.
fn combine_member<K: std::hash::Hash + Eq + Clone, C: MemberCounts>(
    tables: &mut [Table<K, C>],
    member: usize,
    d: usize,
    s: usize,
) -> i64 {
    let from: Vec<(K, i64)> = tables[s]
        .iter()
        .filter(|(_, c)| c.get(member) != 0)
        .map(|(k, c)| (k.clone(), c.get(member)))
        .collect();
    let mut delta = 0;
    for (k, m) in from {
        let c = tables[d].entry(k).or_default();
        let before = c.get(member);
        c.set(member, before + m);
        delta += transition(before, c.get(member));
    }
    delta
}

/// A member's values (BIGINTs) in one table and their multiplicities.
fn member_ints<C: MemberCounts>(table: &Table<i64, C>, member: usize) -> (Vec<i64>, Vec<i64>) {
    table
        .iter()
        .filter(|(_, c)| c.get(member) != 0)
        .map(|(v, c)| (*v, c.get(member)))
        .unzip()
}

/// A member's values (row-encoded) in one table and their multiplicities.
fn member_bytes<C: MemberCounts>(
    table: &Table<ValueKey, C>,
    member: usize,
) -> Vec<(Box<[u8]>, i64)> {
    table
        .iter()
        .filter(|(_, c)| c.get(member) != 0)
        .map(|(k, c)| (Box::<[u8]>::from(&k[..]), c.get(member)))
        .collect()
}

/// Sets a member's multiplicities in one table (a restore), replacing what it had there.
fn restore_member<K: std::hash::Hash + Eq, C: MemberCounts>(
    table: &mut Table<K, C>,
    member: usize,
    values: impl Iterator<Item = (K, i64)>,
) {
    reset_member(table, member);
    for (k, m) in values {
        table.entry(k).or_default().set(member, m);
    }
}

/// Approximate bytes held by tables of `K` keys and `C` multiplicities.
fn tables_size<K, C>(tables: &[Table<K, C>]) -> usize {
    let entry = std::mem::size_of::<(K, C)>() + 1;
    tables.iter().map(|m| 48 + m.capacity() * entry).sum()
}

impl DistinctFamily {
    /// A family for values of `input_type`, shared by the accumulators it is passed to.
    pub fn try_new(input_type: &DataType) -> Result<Arc<Mutex<Self>>, ArrowError> {
        let tables = match input_type {
            DataType::Int64 => Tables::Ints(vec![]),
            _ => Tables::Bytes(vec![]),
        };
        Ok(Arc::new(Mutex::new(DistinctFamily {
            converter: RowConverter::new(vec![SortField::new(input_type.clone())])?,
            tables,
        })))
    }

    /// The input never retracts: values are kept as seen or not per member instead of counted.
    /// Only before any update (a retraction afterwards is an error, not a wrong count).
    pub fn set_append_only(&mut self) {
        let (held, ints): (usize, bool) = match &self.tables {
            Tables::Ints(t) => (t.iter().map(|m| m.len()).sum(), true),
            Tables::IntsSeen(t) => (t.iter().map(|m| m.len()).sum(), true),
            Tables::Bytes(t) => (t.iter().map(|m| m.len()).sum(), false),
            Tables::BytesSeen(t) => (t.iter().map(|m| m.len()).sum(), false),
        };
        if held == 0 {
            self.tables = if ints {
                Tables::IntsSeen(vec![])
            } else {
                Tables::BytesSeen(vec![])
            };
        }
    }

    fn resize(&mut self, n: usize) {
        match &mut self.tables {
            Tables::Ints(t) if n > t.len() => t.resize_with(n, Default::default),
            Tables::Bytes(t) if n > t.len() => t.resize_with(n, Default::default),
            Tables::IntsSeen(t) if n > t.len() => t.resize_with(n, Default::default),
            Tables::BytesSeen(t) if n > t.len() => t.resize_with(n, Default::default),
            _ => {}
        }
    }

    /// Applies rows for every member at once: `signs[m][i]` is row `i`'s sign for member `m`
    /// (0: filtered out). Returns each member's effective signs: +1 where a value arrived in
    /// its group, -1 where it left, else 0.
    pub fn update(
        &mut self,
        gids: &[u32],
        signs: &[&[i64]],
        values: &ArrayRef,
    ) -> Result<Vec<Vec<i64>>, ArrowError> {
        let mut effective = vec![vec![0i64; gids.len()]; signs.len()];
        let e = &mut effective;
        match &mut self.tables {
            Tables::Ints(t) => apply_ints(t, gids, signs, values, e)?,
            Tables::IntsSeen(t) => apply_ints(t, gids, signs, values, e)?,
            Tables::Bytes(t) => {
                let rows = self
                    .converter
                    .convert_columns(std::slice::from_ref(values))?;
                apply_bytes(t, gids, signs, values, &rows, e)?
            }
            Tables::BytesSeen(t) => {
                let rows = self
                    .converter
                    .convert_columns(std::slice::from_ref(values))?;
                apply_bytes(t, gids, signs, values, &rows, e)?
            }
        }
        Ok(effective)
    }

    /// One member's rows (an accumulator updated on its own).
    fn update_member(
        &mut self,
        member: usize,
        gids: &[u32],
        signs: &[i64],
        values: &ArrayRef,
    ) -> Result<Vec<i64>, ArrowError> {
        let zeros = vec![0; gids.len()];
        let mut all: Vec<&[i64]> = vec![&zeros[..]; member + 1];
        all[member] = signs;
        Ok(self.update(gids, &all, values)?.swap_remove(member))
    }

    /// Values of a member in a group (row-encoded), with their multiplicities.
    fn member(&self, member: usize, g: usize) -> Vec<(Box<[u8]>, i64)> {
        let (values, counts) = match &self.tables {
            Tables::Ints(t) => member_ints(&t[g], member),
            Tables::IntsSeen(t) => member_ints(&t[g], member),
            Tables::Bytes(t) => return member_bytes(&t[g], member),
            Tables::BytesSeen(t) => return member_bytes(&t[g], member),
        };
        let array: ArrayRef = Arc::new(Int64Array::from(values));
        let rows = self
            .converter
            .convert_columns(&[array])
            .expect("BIGINT values encode");
        rows.iter().map(|r| r.as_ref().into()).zip(counts).collect()
    }

    /// Sets a member's multiplicities in a group (a restore), replacing what it had there.
    fn restore(
        &mut self,
        member: usize,
        g: usize,
        values: crate::snapshot::Multiset,
    ) -> Result<(), CorruptSnapshot> {
        self.resize(g + 1);
        let ints = match &self.tables {
            Tables::Ints(_) | Tables::IntsSeen(_) => {
                let parser = self.converter.parser();
                let decoded = self
                    .converter
                    .convert_rows(values.iter().map(|(k, _)| parser.parse(k)))
                    .map_err(|_| CorruptSnapshot("a DISTINCT value that is not a BIGINT"))?;
                decoded[0].as_primitive::<Int64Type>().values().to_vec()
            }
            _ => vec![],
        };
        let counts = values.iter().map(|(_, m)| *m);
        match &mut self.tables {
            Tables::Ints(t) => restore_member(&mut t[g], member, ints.into_iter().zip(counts)),
            Tables::IntsSeen(t) => restore_member(&mut t[g], member, ints.into_iter().zip(counts)),
            Tables::Bytes(t) => {
                let keys = values.iter().map(|(k, m)| (ValueKey::from(&k[..]), *m));
                restore_member(&mut t[g], member, keys)
            }
            Tables::BytesSeen(t) => {
                let keys = values.iter().map(|(k, m)| (ValueKey::from(&k[..]), *m));
                restore_member(&mut t[g], member, keys)
            }
        }
        Ok(())
    }

    /// Clears a member's multiplicities in a group.
    fn reset(&mut self, member: usize, g: usize) {
        match &mut self.tables {
            Tables::Ints(t) => reset_member(&mut t[g], member),
            Tables::Bytes(t) => reset_member(&mut t[g], member),
            Tables::IntsSeen(t) => reset_member(&mut t[g], member),
            Tables::BytesSeen(t) => reset_member(&mut t[g], member),
        }
    }

    /// Adds a member's multiplicities of group `s` into group `d`; returns the change in the
    /// member's number of values in `d`.
    fn combine(&mut self, member: usize, d: usize, s: usize) -> i64 {
        match &mut self.tables {
            Tables::Ints(t) => combine_member(t, member, d, s),
            Tables::Bytes(t) => combine_member(t, member, d, s),
            Tables::IntsSeen(t) => combine_member(t, member, d, s),
            Tables::BytesSeen(t) => combine_member(t, member, d, s),
        }
    }

    /// Approximate bytes held.
    fn size_bytes(&self) -> usize {
        match &self.tables {
            Tables::Ints(t) => tables_size(t),
            Tables::IntsSeen(t) => tables_size(t),
            Tables::Bytes(t) => tables_size(t),
            Tables::BytesSeen(t) => tables_size(t),
        }
    }
}

/// A value's effect on the inner state of a DISTINCT: its first arrival and last departure.
#[inline]
fn transition(before: i64, after: i64) -> i64 {
    match (before > 0, after > 0) {
        (false, true) => 1,
        (true, false) => -1,
        _ => 0,
    }
}

fn lock(family: &Mutex<DistinctFamily>) -> MutexGuard<'_, DistinctFamily> {
    family
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One aggregate's state over all groups, indexed by group id.
pub struct Accumulator {
    kind: AccKind,
    num: Num,
    input_type: DataType,
    output_type: DataType,
    state: State,
    /// For DISTINCT: multiplicity of each value per group; the inner state sees a value once.
    distinct: Option<Distinct>,
    /// The input never retracts: MIN/MAX keep only the current extreme (a value beaten once
    /// can never come back).
    append_only: bool,
}

fn num_of(t: &DataType) -> Num {
    match t {
        DataType::Float16 | DataType::Float32 | DataType::Float64 => Num::Float,
        DataType::Decimal32(_, s)
        | DataType::Decimal64(_, s)
        | DataType::Decimal128(_, s)
        | DataType::Decimal256(_, s) => Num::Decimal { scale: *s },
        _ => Num::Int,
    }
}

impl Accumulator {
    /// State for `kind` over values of `input_type` (`Null` for `COUNT(*)`), producing `output_type`.
    pub fn try_new(
        kind: AccKind,
        input_type: DataType,
        output_type: DataType,
        distinct: bool,
    ) -> Result<Self, ArrowError> {
        let num = num_of(&input_type);
        if matches!(kind, AccKind::Sum | AccKind::Avg)
            && !(input_type.is_numeric() || input_type == DataType::Null)
        {
            return Err(ArrowError::InvalidArgumentError(format!(
                "SUM/AVG need a numeric argument, not {input_type}"
            )));
        }
        let state = match kind {
            AccKind::Count => State::Count(vec![]),
            AccKind::Sum | AccKind::Avg => match num {
                Num::Int => State::SumInt(vec![], vec![]),
                Num::Float => State::SumFloat(vec![], vec![]),
                Num::Decimal { .. } => State::SumDecimal(vec![], vec![]),
            },
            AccKind::Min | AccKind::Max => State::Extreme {
                converter: RowConverter::new(vec![SortField::new(input_type.clone())])?,
                values: vec![],
            },
        };
        let distinct = if distinct {
            Some(Distinct::Own(
                RowConverter::new(vec![SortField::new(input_type.clone())])?,
                vec![],
            ))
        } else {
            None
        };
        Ok(Accumulator {
            kind,
            num,
            input_type,
            output_type,
            state,
            distinct,
            append_only: false,
        })
    }

    /// Makes this DISTINCT accumulator member `member` of `family` (see [`DistinctFamily`]):
    /// the engine then updates the family once for all members and each member with
    /// [`Accumulator::update_distinct`].
    pub fn share_distinct(&mut self, family: Arc<Mutex<DistinctFamily>>, member: usize) {
        assert!(self.distinct.is_some() && member < FAMILY_MAX);
        self.distinct = Some(Distinct::Shared(family, member));
    }

    /// Declares that the input never retracts, so MIN/MAX need not keep every value.
    pub fn set_append_only(&mut self) {
        self.append_only = true;
    }

    /// Makes room for group ids below `n`.
    pub fn resize(&mut self, n: usize) {
        match &mut self.state {
            State::Count(c) => c.resize(n, 0),
            State::SumInt(s, c) => {
                s.resize(n, 0);
                c.resize(n, 0)
            }
            State::SumFloat(s, c) => {
                s.resize(n, 0.0);
                c.resize(n, 0)
            }
            State::SumDecimal(s, c) => {
                s.resize(n, 0);
                c.resize(n, 0)
            }
            State::Extreme { values, .. } => values.resize_with(n, BTreeMap::new),
        }
        match &mut self.distinct {
            Some(Distinct::Own(_, d)) => d.resize_with(n, Multiplicities::default),
            Some(Distinct::Shared(f, _)) => lock(f).resize(n),
            None => {}
        }
    }

    /// Applies rows: row `i` belongs to group `gids[i]` and counts `signs[i]` times (+1 add,
    /// -1 retract, 0 skip: filtered out). `values` is `None` for `COUNT(*)`.
    pub fn update(
        &mut self,
        gids: &[u32],
        signs: &[i64],
        values: Option<&ArrayRef>,
    ) -> Result<(), ArrowError> {
        let mut effective;
        let signs = match (&mut self.distinct, values) {
            (Some(Distinct::Shared(family, member)), Some(values)) => {
                effective = lock(family).update_member(*member, gids, signs, values)?;
                &effective[..]
            }
            (Some(Distinct::Own(converter, seen)), Some(values)) => {
                // Only a value's first arrival and last departure reach the inner state.
                let rows = converter.convert_columns(std::slice::from_ref(values))?;
                effective = vec![0i64; signs.len()];
                for i in 0..signs.len() {
                    if signs[i] == 0 || values.is_null(i) {
                        continue;
                    }
                    let m = seen[gids[i] as usize]
                        .entry_ref(rows.row(i).as_ref())
                        .or_insert(0);
                    let before = *m;
                    *m += signs[i];
                    let after = *m;
                    if after == 0 {
                        seen[gids[i] as usize].remove(rows.row(i).as_ref());
                    }
                    effective[i] = transition(before, after);
                }
                &effective[..]
            }
            _ => signs,
        };
        self.update_inner(gids, signs, values)
    }

    /// Applies the effective signs a [`DistinctFamily`] computed for this member.
    pub fn update_distinct(
        &mut self,
        gids: &[u32],
        effective: &[i64],
        values: &ArrayRef,
    ) -> Result<(), ArrowError> {
        // A COUNT needs the values only to skip NULLs, whose effective sign is already 0.
        let values = (!matches!(self.state, State::Count(_))).then_some(values);
        self.update_inner(gids, effective, values)
    }

    fn update_inner(
        &mut self,
        gids: &[u32],
        signs: &[i64],
        values: Option<&ArrayRef>,
    ) -> Result<(), ArrowError> {
        match &mut self.state {
            State::Count(counts) => match values {
                None => gids
                    .iter()
                    .zip(signs)
                    .for_each(|(&g, &s)| counts[g as usize] += s),
                Some(v) => {
                    for i in 0..gids.len() {
                        if v.is_valid(i) {
                            counts[gids[i] as usize] += signs[i];
                        }
                    }
                }
            },
            State::SumInt(sums, counts) => {
                let v = cast(values.expect("SUM has an argument"), &DataType::Int64)?;
                let v = v.as_primitive::<Int64Type>();
                for i in 0..gids.len() {
                    if signs[i] != 0 && v.is_valid(i) {
                        let g = gids[i] as usize;
                        sums[g] = sums[g].wrapping_add(v.value(i).wrapping_mul(signs[i]));
                        counts[g] += signs[i];
                    }
                }
            }
            State::SumFloat(sums, counts) => {
                let v = cast(values.expect("SUM has an argument"), &DataType::Float64)?;
                let v = v.as_primitive::<Float64Type>();
                for i in 0..gids.len() {
                    if signs[i] != 0 && v.is_valid(i) {
                        let g = gids[i] as usize;
                        sums[g] += v.value(i) * signs[i] as f64;
                        counts[g] += signs[i];
                    }
                }
            }
            State::SumDecimal(sums, counts) => {
                let Num::Decimal { scale } = self.num else {
                    unreachable!()
                };
                let v = cast(
                    values.expect("SUM has an argument"),
                    &DataType::Decimal128(38, scale),
                )?;
                let v = v.as_primitive::<Decimal128Type>();
                for i in 0..gids.len() {
                    if signs[i] != 0 && v.is_valid(i) {
                        let g = gids[i] as usize;
                        sums[g] += v.value(i) * signs[i] as i128;
                        counts[g] += signs[i];
                    }
                }
            }
            State::Extreme {
                converter,
                values: sets,
            } => {
                let values = values.expect("MIN/MAX have an argument");
                let rows = converter.convert_columns(std::slice::from_ref(values))?;
                for i in 0..gids.len() {
                    if signs[i] == 0 || values.is_null(i) {
                        continue;
                    }
                    let set = &mut sets[gids[i] as usize];
                    let key = rows.row(i);
                    if self.append_only && signs[i] > 0 {
                        // Only the extreme matters: a beaten value is dropped, and a new extreme
                        // replaces the old one (row bytes order as the values do). One look at
                        // the current extreme decides.
                        let max = self.kind == AccKind::Max;
                        let best = if max {
                            set.last_entry()
                        } else {
                            set.first_entry()
                        };
                        if let Some(mut best) = best {
                            let order = key.as_ref().cmp(best.key());
                            if order.is_eq() {
                                *best.get_mut() += signs[i];
                                continue;
                            }
                            if order.is_lt() == max {
                                continue;
                            }
                            set.clear();
                        }
                        set.insert(key.as_ref().into(), signs[i]);
                        continue;
                    }
                    match set.get_mut(key.as_ref()) {
                        Some(m) => {
                            *m += signs[i];
                            if *m == 0 {
                                set.remove(key.as_ref());
                            }
                        }
                        None => {
                            set.insert(key.as_ref().into(), signs[i]);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Folds group `src` into group `dst` (session windows merging), leaving `src` empty.
    pub fn merge(&mut self, dst: u32, src: u32) {
        self.combine(dst, src);
        self.reset(src);
    }

    /// Adds group `src`'s state into group `dst`'s; `src` keeps its own (a sliced window's
    /// pane is part of several windows).
    pub fn combine(&mut self, dst: u32, src: u32) {
        let (d, s) = (dst as usize, src as usize);
        let mut distinct_values = None;
        match &mut self.distinct {
            Some(Distinct::Own(_, seen)) => {
                let from: Vec<(ValueKey, i64)> =
                    seen[s].iter().map(|(k, m)| (k.clone(), *m)).collect();
                for (k, m) in from {
                    *seen[d].entry(k).or_insert(0) += m;
                }
                distinct_values = Some(seen[d].len() as i64);
            }
            Some(Distinct::Shared(f, member)) => {
                // A COUNT(DISTINCT)'s count is its number of values (present: multiplicity > 0).
                let before = match &self.state {
                    State::Count(c) => c[d],
                    _ => 0,
                };
                distinct_values = Some(before + lock(f).combine(*member, d, s));
            }
            None => {}
        }
        match &mut self.state {
            State::Count(c) => c[d] += c[s],
            State::SumInt(sum, c) => {
                sum[d] = sum[d].wrapping_add(sum[s]);
                c[d] += c[s];
            }
            State::SumFloat(sum, c) => {
                sum[d] += sum[s];
                c[d] += c[s];
            }
            State::SumDecimal(sum, c) => {
                sum[d] += sum[s];
                c[d] += c[s];
            }
            State::Extreme { values, .. } => {
                let from: Vec<(Box<[u8]>, i64)> =
                    values[s].iter().map(|(k, m)| (k.clone(), *m)).collect();
                for (k, m) in from {
                    *values[d].entry(k).or_insert(0) += m;
                }
            }
        }
        // DISTINCT COUNT after a merge: a value seen in both groups was counted twice.
        if let (Some(n), State::Count(c)) = (distinct_values, &mut self.state) {
            c[d] = n;
        }
    }

    /// Clears a group's state so that its id can be reused.
    pub fn reset(&mut self, gid: u32) {
        let g = gid as usize;
        match &mut self.state {
            State::Count(c) => c[g] = 0,
            State::SumInt(s, c) => {
                s[g] = 0;
                c[g] = 0
            }
            State::SumFloat(s, c) => {
                s[g] = 0.0;
                c[g] = 0
            }
            State::SumDecimal(s, c) => {
                s[g] = 0;
                c[g] = 0
            }
            State::Extreme { values, .. } => values[g].clear(),
        }
        match &mut self.distinct {
            Some(Distinct::Own(_, seen)) => seen[g].clear(),
            Some(Distinct::Shared(f, member)) => lock(f).reset(*member, g),
            None => {}
        }
    }

    /// The current result of each listed group, as the output type.
    pub fn evaluate(&self, gids: &[u32]) -> Result<ArrayRef, ArrowError> {
        let array: ArrayRef = match (&self.state, self.kind) {
            (State::Count(c), _) => Arc::new(Int64Array::from_iter_values(
                gids.iter().map(|&g| c[g as usize]),
            )),
            (State::SumInt(s, c), AccKind::Sum) => Arc::new(
                gids.iter()
                    .map(|&g| (c[g as usize] > 0).then(|| s[g as usize]))
                    .collect::<Int64Array>(),
            ),
            (State::SumInt(s, c), _) => Arc::new(
                gids.iter()
                    .map(|&g| {
                        (c[g as usize] > 0).then(|| s[g as usize] as f64 / c[g as usize] as f64)
                    })
                    .collect::<Float64Array>(),
            ),
            (State::SumFloat(s, c), AccKind::Sum) => Arc::new(
                gids.iter()
                    .map(|&g| (c[g as usize] > 0).then(|| s[g as usize]))
                    .collect::<Float64Array>(),
            ),
            (State::SumFloat(s, c), _) => Arc::new(
                gids.iter()
                    .map(|&g| (c[g as usize] > 0).then(|| s[g as usize] / c[g as usize] as f64))
                    .collect::<Float64Array>(),
            ),
            (State::SumDecimal(s, c), kind) => {
                let Num::Decimal { scale } = self.num else {
                    unreachable!()
                };
                match (kind, &self.output_type) {
                    (AccKind::Avg, DataType::Decimal128(p, out_scale)) => {
                        let shift = 10i128.pow((*out_scale - scale).max(0) as u32);
                        let a: Decimal128Array = gids
                            .iter()
                            .map(|&g| {
                                let (s, c) = (s[g as usize], c[g as usize] as i128);
                                (c > 0).then(|| {
                                    let n = s * shift;
                                    // Round half away from zero.
                                    (n + n.signum() * c / 2) / c
                                })
                            })
                            .collect();
                        Arc::new(a.with_precision_and_scale(*p, *out_scale)?)
                    }
                    (AccKind::Avg, _) => {
                        let div = 10f64.powi(scale as i32);
                        Arc::new(
                            gids.iter()
                                .map(|&g| {
                                    (c[g as usize] > 0)
                                        .then(|| s[g as usize] as f64 / div / c[g as usize] as f64)
                                })
                                .collect::<Float64Array>(),
                        )
                    }
                    _ => {
                        let a: Decimal128Array = gids
                            .iter()
                            .map(|&g| (c[g as usize] > 0).then(|| s[g as usize]))
                            .collect();
                        Arc::new(a.with_precision_and_scale(38, scale)?)
                    }
                }
            }
            (State::Extreme { converter, values }, kind) => {
                let parser = converter.parser();
                let picks: Vec<Option<&Box<[u8]>>> = gids
                    .iter()
                    .map(|&g| {
                        let set = &values[g as usize];
                        let pick = if kind == AccKind::Max {
                            set.last_key_value()
                        } else {
                            set.first_key_value()
                        };
                        pick.map(|(k, _)| k)
                    })
                    .collect();
                // Convert the non-empty picks, then scatter them with nulls for empty groups.
                let present: Vec<_> = picks
                    .iter()
                    .filter_map(|p| p.map(|b| parser.parse(b)))
                    .collect();
                let converted = converter.convert_rows(present)?.pop().expect("one column");
                if picks.iter().all(|p| p.is_some()) {
                    converted
                } else {
                    let mut next = 0u32;
                    let idx: arrow::array::UInt32Array = picks
                        .iter()
                        .map(|p| {
                            p.map(|_| {
                                next += 1;
                                next - 1
                            })
                        })
                        .collect();
                    arrow::compute::take(&converted, &idx, None)?
                }
            }
        };
        if array.data_type() == &self.output_type {
            Ok(array)
        } else {
            cast(&array, &self.output_type)
        }
    }

    /// Appends group `gid`'s state to `out` (see [`crate::snapshot`]).
    pub fn snapshot_group(&self, gid: u32, out: &mut Vec<u8>) {
        let g = gid as usize;
        let mut w = Writer(out);
        self.state.snapshot_group(g, &mut w);
        match &self.distinct {
            Some(Distinct::Own(_, seen)) => w.multiset(seen[g].iter().map(|(k, m)| (&k[..], *m))),
            Some(Distinct::Shared(f, member)) => {
                let values = lock(f).member(*member, g);
                w.multiset(values.iter().map(|(k, m)| (&k[..], *m)));
            }
            None => {}
        }
    }

    /// Copies the state of every group into `frozen`, reusing its buffers, when it is a few flat
    /// arrays (COUNT, SUM and AVG without DISTINCT); `None` otherwise (MIN/MAX and DISTINCT keep
    /// a map per group, which is no cheaper to copy than to encode).
    pub fn freeze(&self, frozen: Option<FrozenAccumulator>) -> Option<FrozenAccumulator> {
        fn copy<T: Copy>(mut into: Vec<T>, from: &[T]) -> Vec<T> {
            into.clear();
            into.extend_from_slice(from);
            into
        }
        if self.distinct.is_some() {
            return None;
        }
        let old = frozen.map(|f| f.0);
        let state = match (&self.state, old) {
            (State::Count(c), Some(State::Count(f))) => State::Count(copy(f, c)),
            (State::Count(c), _) => State::Count(c.clone()),
            (State::SumInt(s, c), Some(State::SumInt(fs, fc))) => {
                State::SumInt(copy(fs, s), copy(fc, c))
            }
            (State::SumInt(s, c), _) => State::SumInt(s.clone(), c.clone()),
            (State::SumFloat(s, c), Some(State::SumFloat(fs, fc))) => {
                State::SumFloat(copy(fs, s), copy(fc, c))
            }
            (State::SumFloat(s, c), _) => State::SumFloat(s.clone(), c.clone()),
            (State::SumDecimal(s, c), Some(State::SumDecimal(fs, fc))) => {
                State::SumDecimal(copy(fs, s), copy(fc, c))
            }
            (State::SumDecimal(s, c), _) => State::SumDecimal(s.clone(), c.clone()),
            (State::Extreme { .. }, _) => return None,
        };
        Some(FrozenAccumulator(state))
    }

    /// Restores group `gid` from bytes written by [`Accumulator::snapshot_group`].
    pub fn restore_group(&mut self, gid: u32, bytes: &[u8]) -> Result<(), CorruptSnapshot> {
        let g = gid as usize;
        if g >= self.len() {
            self.resize(g + 1);
        }
        let mut r = Reader(bytes);
        match &mut self.state {
            State::Count(c) => c[g] = r.i64()?,
            State::SumInt(s, c) => {
                s[g] = r.i64()?;
                c[g] = r.i64()?;
            }
            State::SumFloat(s, c) => {
                s[g] = r.f64()?;
                c[g] = r.i64()?;
            }
            State::SumDecimal(s, c) => {
                s[g] = r.i128()?;
                c[g] = r.i64()?;
            }
            State::Extreme { values, .. } => values[g] = r.multiset()?.into_iter().collect(),
        }
        match &mut self.distinct {
            Some(Distinct::Own(_, seen)) => {
                seen[g] = r
                    .multiset()?
                    .into_iter()
                    .map(|(k, m)| (ValueKey::from(&k[..]), m))
                    .collect();
            }
            Some(Distinct::Shared(f, member)) => {
                lock(f).restore(*member, g, r.multiset()?)?;
            }
            None => {}
        }
        if !r.is_done() {
            return Err(CorruptSnapshot("group state longer than its accumulator's"));
        }
        Ok(())
    }

    /// Number of group slots allocated.
    fn len(&self) -> usize {
        match &self.state {
            State::Count(c) => c.len(),
            State::SumInt(_, c) | State::SumFloat(_, c) | State::SumDecimal(_, c) => c.len(),
            State::Extreme { values, .. } => values.len(),
        }
    }

    /// The input type this accumulator was built for.
    pub fn input_type(&self) -> &DataType {
        &self.input_type
    }

    /// Approximate bytes held per group, for state-size metrics.
    pub fn size_bytes(&self) -> usize {
        let state = match &self.state {
            State::Count(c) => c.capacity() * 8,
            State::SumInt(s, c) => s.capacity() * 8 + c.capacity() * 8,
            State::SumFloat(s, c) => s.capacity() * 8 + c.capacity() * 8,
            State::SumDecimal(s, c) => s.capacity() * 16 + c.capacity() * 8,
            State::Extreme { values, .. } => values
                .iter()
                .map(|m| 24 + m.keys().map(|k| k.len() + 40).sum::<usize>())
                .sum(),
        };
        let distinct = match &self.distinct {
            Some(Distinct::Own(_, d)) => d.iter().map(|m| 48 + m.len() * 40).sum(),
            // The first member counts the family's table.
            Some(Distinct::Shared(f, 0)) => lock(f).size_bytes(),
            _ => 0,
        };
        state + distinct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints(v: &[Option<i64>]) -> ArrayRef {
        Arc::new(Int64Array::from(v.to_vec()))
    }

    #[test]
    fn append_only_min_max_keep_only_the_extreme() {
        for (kind, want) in [(AccKind::Max, 9), (AccKind::Min, -3)] {
            let mut acc =
                Accumulator::try_new(kind, DataType::Int64, DataType::Int64, false).unwrap();
            acc.set_append_only();
            acc.resize(1);
            let values = [Some(5), Some(9), None, Some(-3), Some(9), Some(2), Some(-3)];
            acc.update(&[0; 7], &[1; 7], Some(&ints(&values))).unwrap();
            let out = acc.evaluate(&[0]).unwrap();
            assert_eq!(out.as_primitive::<Int64Type>().value(0), want, "{kind:?}");
            let State::Extreme { values: sets, .. } = &acc.state else {
                unreachable!()
            };
            assert_eq!(sets[0].len(), 1, "{kind:?}: only the extreme is kept");
            assert_eq!(
                sets[0].values().next(),
                Some(&2),
                "{kind:?}: with its copies"
            );
        }
    }

    #[test]
    fn max_retracts_exactly() {
        let mut acc =
            Accumulator::try_new(AccKind::Max, DataType::Int64, DataType::Int64, false).unwrap();
        acc.resize(2);
        acc.update(
            &[0, 0, 0, 1],
            &[1, 1, 1, 1],
            Some(&ints(&[Some(5), Some(9), Some(9), None])),
        )
        .unwrap();
        let out = acc.evaluate(&[0, 1]).unwrap();
        assert_eq!(out.as_primitive::<Int64Type>().value(0), 9);
        assert!(out.is_null(1), "a group with only NULLs has no MAX");
        acc.update(&[0], &[-1], Some(&ints(&[Some(9)]))).unwrap();
        assert_eq!(
            acc.evaluate(&[0])
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0),
            9,
            "one 9 is left"
        );
        acc.update(&[0], &[-1], Some(&ints(&[Some(9)]))).unwrap();
        assert_eq!(
            acc.evaluate(&[0])
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0),
            5
        );
    }

    /// A family of DISTINCT aggregates (COUNT and SUM, three FILTERs) agrees with unshared
    /// accumulators fed the same filtered rows: results after random inserts and retractions,
    /// the multisets they snapshot, a restore into a new family, combining and resetting groups.
    #[test]
    fn a_distinct_family_agrees_with_unshared_accumulators() {
        // BIGINT values are kept as themselves, others row-encoded: both ways, counted or (for
        // append-only input) only marked as seen.
        for input in [DataType::Int64, DataType::Int32] {
            for append_only in [false, true] {
                distinct_family_agrees(input.clone(), append_only);
            }
        }
    }

    fn distinct_family_agrees(input: DataType, append_only: bool) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let kinds = [AccKind::Count, AccKind::Count, AccKind::Sum];
        let new =
            |k: AccKind| Accumulator::try_new(k, input.clone(), DataType::Int64, true).unwrap();
        let shared = |family: &Arc<Mutex<DistinctFamily>>| {
            kinds
                .iter()
                .enumerate()
                .map(|(m, k)| {
                    let mut a = new(*k);
                    a.share_distinct(family.clone(), m);
                    a
                })
                .collect::<Vec<_>>()
        };
        let family = DistinctFamily::try_new(&input).unwrap();
        if append_only {
            family.lock().unwrap().set_append_only();
        }
        let mut members = shared(&family);
        let mut alone: Vec<_> = kinds.iter().map(|k| new(*k)).collect();
        let groups = 4u32;
        for a in members.iter_mut().chain(alone.iter_mut()) {
            a.resize(groups as usize);
        }
        // Rows currently in (group, value), so that retractions retract something.
        let mut live: Vec<(u32, Option<i64>)> = vec![];
        let results = |accs: &[Accumulator]| -> Vec<Vec<Option<i64>>> {
            let gids: Vec<u32> = (0..groups).collect();
            accs.iter()
                .map(|a| {
                    let r = a.evaluate(&gids).unwrap();
                    r.as_primitive::<Int64Type>().iter().collect()
                })
                .collect()
        };
        let multisets = |accs: &[Accumulator], g: u32| -> Vec<Vec<u8>> {
            accs.iter()
                .map(|a| {
                    let mut out = vec![];
                    a.snapshot_group(g, &mut out);
                    // The multiset's order is the map's: compare it sorted.
                    let mut r = Reader(&out);
                    match a.kind {
                        AccKind::Count => r.i64().unwrap(),
                        _ => {
                            r.i64().unwrap();
                            r.i64().unwrap()
                        }
                    };
                    let mut m = r.multiset().unwrap();
                    m.sort();
                    if append_only {
                        // Seen or not: multiplicities read as 1.
                        m.iter_mut().for_each(|(_, c)| *c = (*c).min(1));
                    }
                    format!("{:?} {:?}", &out[..8], m).into_bytes()
                })
                .collect()
        };
        for round in 0..30 {
            let n = rng.random_range(1..50);
            let mut gids = vec![];
            let mut signs = vec![];
            let mut values = vec![];
            for _ in 0..n {
                if !append_only && !live.is_empty() && rng.random_bool(0.3) {
                    let (g, v) = live.swap_remove(rng.random_range(0..live.len()));
                    gids.push(g);
                    signs.push(-1);
                    values.push(v);
                } else {
                    let g = rng.random_range(0..groups);
                    let v = rng.random_bool(0.9).then(|| rng.random_range(0..12));
                    live.push((g, v));
                    gids.push(g);
                    signs.push(1);
                    values.push(v);
                }
            }
            // Member m sees a row when its value is below 4 * (m + 1) (member 2: all but 8..).
            let member_signs: Vec<Vec<i64>> = (0..kinds.len())
                .map(|m| {
                    (0..n)
                        .map(|i| match values[i] {
                            Some(v) if v >= 4 * (m as i64 + 1) => 0,
                            _ => signs[i],
                        })
                        .collect()
                })
                .collect();
            let values = cast(&ints(&values), &input).unwrap();
            let refs: Vec<&[i64]> = member_signs.iter().map(|s| &s[..]).collect();
            let effective = family
                .lock()
                .unwrap()
                .update(&gids, &refs, &values)
                .unwrap();
            for m in 0..kinds.len() {
                members[m]
                    .update_distinct(&gids, &effective[m], &values)
                    .unwrap();
                alone[m]
                    .update(&gids, &member_signs[m], Some(&values))
                    .unwrap();
            }
            assert_eq!(results(&members), results(&alone), "round {round}");
            for g in 0..groups {
                assert_eq!(
                    multisets(&members, g),
                    multisets(&alone, g),
                    "round {round}"
                );
            }
        }
        // A restore into a new family, group by group, reproduces every member.
        let family2 = DistinctFamily::try_new(&input).unwrap();
        if append_only {
            family2.lock().unwrap().set_append_only();
        }
        let mut restored = shared(&family2);
        for g in 0..groups {
            for (a, b) in members.iter().zip(restored.iter_mut()) {
                let mut bytes = vec![];
                a.snapshot_group(g, &mut bytes);
                b.restore_group(g, &bytes).unwrap();
            }
        }
        assert_eq!(results(&restored), results(&alone));
        // Combining group 1 into 0 and resetting 1, then 2 into 3.
        for accs in [&mut members, &mut alone] {
            for a in accs.iter_mut() {
                a.merge(0, 1);
                a.combine(3, 2);
            }
        }
        assert_eq!(results(&members), results(&alone));
        for g in 0..groups {
            assert_eq!(multisets(&members, g), multisets(&alone, g));
        }
        // Input said to be append-only that retracts is an error, not a wrong count.
        let one = cast(&ints(&[Some(1)]), &input).unwrap();
        let retracted = family.lock().unwrap().update(&[0], &[&[-1]], &one);
        assert_eq!(retracted.is_err(), append_only);
    }

    #[test]
    fn count_distinct_counts_values_once() {
        let mut acc =
            Accumulator::try_new(AccKind::Count, DataType::Int64, DataType::Int64, true).unwrap();
        acc.resize(1);
        acc.update(
            &[0, 0, 0, 0],
            &[1, 1, 1, 1],
            Some(&ints(&[Some(1), Some(1), Some(2), None])),
        )
        .unwrap();
        assert_eq!(
            acc.evaluate(&[0])
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0),
            2
        );
        acc.update(&[0], &[-1], Some(&ints(&[Some(1)]))).unwrap();
        assert_eq!(
            acc.evaluate(&[0])
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0),
            2,
            "1 is still there once"
        );
        acc.update(&[0], &[-1], Some(&ints(&[Some(1)]))).unwrap();
        assert_eq!(
            acc.evaluate(&[0])
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0),
            1
        );
    }

    #[test]
    fn count_distinct_strings_short_and_long() {
        // Values whose row encoding fits in 22 bytes are kept in place, longer ones on the
        // heap (the lengths here fall on both sides): both count once, retract, and survive a
        // snapshot.
        let values: Vec<String> = [3, 20, 21, 22, 23, 40, 3, 40]
            .iter()
            .map(|n| "v".repeat(*n))
            .collect();
        let values: ArrayRef = Arc::new(arrow::array::StringArray::from(values));
        let mut acc =
            Accumulator::try_new(AccKind::Count, DataType::Utf8, DataType::Int64, true).unwrap();
        acc.resize(1);
        let count = |acc: &Accumulator| {
            acc.evaluate(&[0])
                .unwrap()
                .as_primitive::<Int64Type>()
                .value(0)
        };
        acc.update(&[0; 8], &[1; 8], Some(&values)).unwrap();
        assert_eq!(count(&acc), 6);
        let mut bytes = vec![];
        acc.snapshot_group(0, &mut bytes);
        let mut copy =
            Accumulator::try_new(AccKind::Count, DataType::Utf8, DataType::Int64, true).unwrap();
        copy.resize(1);
        copy.restore_group(0, &bytes).unwrap();
        for a in [&mut acc, &mut copy] {
            // Each of the 40-byte value's two copies, and one of the 3-byte value's.
            a.update(&[0, 0, 0], &[-1, -1, -1], Some(&values.slice(5, 3)))
                .unwrap();
            assert_eq!(count(a), 5);
        }
    }

    #[test]
    fn snapshot_round_trips_every_state_kind() {
        let v = ints(&[Some(4), Some(9), Some(4), Some(1)]);
        let mut kinds = vec![];
        for (kind, distinct) in [
            (AccKind::Count, false),
            (AccKind::Sum, false),
            (AccKind::Max, false),
            (AccKind::Count, true),
            (AccKind::Avg, false),
        ] {
            let out = if kind == AccKind::Avg {
                DataType::Float64
            } else {
                DataType::Int64
            };
            let mut a = Accumulator::try_new(kind, DataType::Int64, out.clone(), distinct).unwrap();
            a.resize(2);
            a.update(&[0, 0, 0, 1], &[1, 1, 1, 1], Some(&v)).unwrap();
            let mut bytes = vec![];
            a.snapshot_group(0, &mut bytes);
            let mut b = Accumulator::try_new(kind, DataType::Int64, out, distinct).unwrap();
            b.restore_group(5, &bytes).unwrap();
            // Retract one 9 in both: the restored state must behave like the original.
            a.update(&[0], &[-1], Some(&ints(&[Some(9)]))).unwrap();
            b.update(&[5], &[-1], Some(&ints(&[Some(9)]))).unwrap();
            kinds.push((kind, distinct));
            assert_eq!(
                a.evaluate(&[0]).unwrap().as_ref(),
                b.evaluate(&[5]).unwrap().as_ref(),
                "{kind:?} distinct={distinct}"
            );
            assert!(
                b.restore_group(1, &bytes[..bytes.len() - 1]).is_err(),
                "a truncated state is detected"
            );
        }
        assert_eq!(kinds.len(), 5);
    }

    /// A frozen copy's columns give each group the bytes `snapshot_group` writes, for every
    /// state kind that freezes (COUNT, and SUM/AVG over integers, doubles and decimals).
    #[test]
    fn frozen_columns_carry_each_groups_snapshot_bytes() {
        let dec = DataType::Decimal128(10, 2);
        let decimals: ArrayRef = Arc::new(
            Decimal128Array::from(vec![
                Some(-5),
                Some(i128::from(i64::MAX) * 9),
                None,
                Some(7),
            ])
            .with_precision_and_scale(10, 2)
            .unwrap(),
        );
        let doubles: ArrayRef = Arc::new(Float64Array::from(vec![
            Some(1.5),
            Some(-0.25),
            None,
            Some(f64::MAX),
        ]));
        let cases = [
            (
                AccKind::Count,
                DataType::Int64,
                DataType::Int64,
                ints(&[Some(1), None, Some(3), Some(4)]),
            ),
            (
                AccKind::Sum,
                DataType::Int64,
                DataType::Int64,
                ints(&[Some(-2), Some(9), None, Some(i64::MIN)]),
            ),
            (
                AccKind::Sum,
                DataType::Float64,
                DataType::Float64,
                doubles.clone(),
            ),
            (AccKind::Avg, DataType::Float64, DataType::Float64, doubles),
            (
                AccKind::Sum,
                dec.clone(),
                DataType::Decimal128(38, 2),
                decimals.clone(),
            ),
            (AccKind::Avg, dec, DataType::Decimal128(38, 6), decimals),
        ];
        for (kind, input, output, values) in cases {
            let mut a = Accumulator::try_new(kind, input, output, false).unwrap();
            a.resize(3);
            a.update(&[2, 0, 2, 1], &[1, 1, 1, 1], Some(&values))
                .unwrap();
            let frozen = a.freeze(None).expect("a flat state freezes");
            let gids = [1, 2, 0, 2];
            let columns = frozen.columns(&gids);
            for (i, g) in gids.iter().enumerate() {
                let (mut expected, mut got) = (vec![], vec![]);
                a.snapshot_group(*g, &mut expected);
                group_bytes_from_columns(&columns, i, &mut got).unwrap();
                assert_eq!(
                    got,
                    expected,
                    "{kind:?} over {}, group {g}",
                    values.data_type()
                );
            }
        }
        let strings: ArrayRef = Arc::new(arrow::array::StringArray::from(vec!["x"]));
        let mut out = vec![];
        assert!(group_bytes_from_columns(&[strings], 0, &mut out).is_err());
    }

    #[test]
    fn decimal_avg_rounds_to_output_scale() {
        let v: ArrayRef = Arc::new(
            Decimal128Array::from(vec![100, 200, 201])
                .with_precision_and_scale(10, 2)
                .unwrap(),
        );
        let mut acc = Accumulator::try_new(
            AccKind::Avg,
            v.data_type().clone(),
            DataType::Decimal128(14, 6),
            false,
        )
        .unwrap();
        acc.resize(1);
        acc.update(&[0, 0, 0], &[1, 1, 1], Some(&v)).unwrap();
        let out = acc.evaluate(&[0]).unwrap();
        // (1.00 + 2.00 + 2.01) / 3 = 1.670000 (rounded at 6 places)
        assert_eq!(out.as_primitive::<Decimal128Type>().value(0), 1_670_000);
    }
}
