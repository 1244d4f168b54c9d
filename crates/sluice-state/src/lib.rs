//! Keyed operator state, kept in compact columnar structures.
//!
//! - [`GroupTable`] interns group keys (Arrow row-encoded) into dense group ids. Per-group state is
//!   then plain vectors indexed by group id, so 1 M groups cost a few vectors, not 1 M objects.
//! - [`Accumulator`] is one aggregate's state over all groups. Every accumulator retracts exactly:
//!   MIN/MAX keep a multiset and DISTINCT keeps value multiplicities, so a `-U`/`-D` row undoes
//!   what its `+I`/`+U` did.
//! - [`checkpoint`] stores snapshot files and manifests behind `object_store`; the manifest,
//!   written last, is the commit point, and records sizes so damage is detected on restore.
//! - [`snapshot`] encodes one group's state as bytes, for checkpoints (and rescaling, since
//!   groups are snapshotted one by one and can be restored on whichever worker owns their key).

pub mod accumulator;
pub mod byte_slots;
pub mod checkpoint;
pub mod direct_file;
pub mod group_table;
pub mod snapshot;

pub use accumulator::{AccKind, Accumulator, DistinctFamily};
pub use byte_slots::ByteSlots;
pub use group_table::GroupTable;
