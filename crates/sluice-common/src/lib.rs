//! Types every Sluice layer shares.
//!
//! - [`ChangeBatch`]: the unit of data. An Arrow `RecordBatch` plus a changelog column saying, per
//!   row, whether it is an insert, a delete, or one half of an update (`-U`/`+U`), as in Flink.
//!   Append-only streams leave the column out, so the common case costs nothing.
//! - [`time`]: event-time helpers (watermark values are milliseconds since the Unix epoch).
//! - [`Error`]: the typed error every library returns; the binary turns it into a user message.

pub mod changelog;
pub mod error;
pub mod java_format;
pub mod secrets;
pub mod text;
pub mod time;

pub use changelog::{ChangeBatch, Op};
pub use error::{Error, Result};
