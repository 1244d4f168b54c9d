//! The Sluice execution engine: runs a [`sluice_sql::JobPlan`] as a timely dataflow.
//!
//! - [`job`] runs a plan: checkpoints to restore, the workers, the memory watch, signals, the
//!   end of the job and its summary.
//! - [`build`] makes one worker's dataflow from the plan: one operator per plan node.
//! - [`operator`] holds the operators: sources, stateless steps (projection, filter, window
//!   assignment), aggregation, joins, Top-N, OVER, temporal joins, and sinks.
//! - [`checkpoint`] aligns operators on checkpoint epochs, writes their snapshots and commits.
//! - [`runtime`] is the adapter to timely: the [`runtime::Event`] container (Arrow changelog
//!   batches and in-band watermarks), the key-group exchange, watermark tracking, metrics and
//!   panics.
//!
//! A batch flows: source reader → computed columns and watermark → projection/filter →
//! exchange by key → stateful operator → sink; watermarks travel behind the rows they cover.

pub mod build;
pub mod checkpoint;
pub mod job;
pub mod operator;
pub mod runtime;

pub use job::{run, validate, JobOptions, JobSummary, SelectOutput};
pub use runtime::control::JobControl;
pub use runtime::metrics::JobMetrics;
