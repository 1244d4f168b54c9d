//! The Sluice execution engine: runs a [`sluice_sql::JobPlan`] as a timely dataflow.
//!
//! - [`dataflow`] is the only module that knows timely: the [`dataflow::Event`] container
//!   (Arrow changelog batches and in-band watermarks), the key-group exchange and cluster config.
//! - [`stateless`] evaluates projections, filters and window assignment on whole batches.
//! - [`aggregate`] keeps grouped state (via `sluice-state`) and emits updates or fired windows.
//! - [`aggregate_snapshot`] turns aggregation state into an Arrow batch tagged by key group, and
//!   back (for checkpoints and rescaling).
//! - [`watermark`] combines watermarks from many senders (the minimum).
//! - [`source`] polls connectors (and `VALUES`), computes watermarks and paces on the probe.
//! - [`job`] wires sources, operators and sinks per worker, runs them and reports a summary; a
//!   panic in a worker fails the job with its message and operator (`panics`), and a memory
//!   watch fails it past `'sluice.memory.limit'`.
//!
//! A batch flows: source reader → computed columns and watermark → projection/filter →
//! exchange by key → aggregate → sink; watermarks travel behind the rows they cover.

pub mod aggregate;
pub mod aggregate_snapshot;
pub mod checkpointing;
pub mod dataflow;
pub mod job;
pub mod join;
mod join_operator;
mod keyed;
pub mod metrics;
pub mod over;
mod panics;
pub mod rank;
pub mod rows;
#[cfg(test)]
mod snapshot_fuzz;
pub mod source;
pub mod stateless;
pub mod temporal;
pub mod watermark;

pub use job::{run, validate, JobOptions, JobSummary, SelectOutput};
pub use metrics::JobMetrics;
