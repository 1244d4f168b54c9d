//! The adapter to timely dataflow: what flows on the edges, how it is routed between workers,
//! how watermarks combine, and the job's counters, panics and control.

pub mod control;
pub mod event;
pub mod exchange;
pub mod metrics;
pub(crate) mod panics;
pub mod watermark;

pub use event::*;
pub use exchange::*;
