//! Sluice's SQL front end.
//!
//! A script flows through these modules in order:
//! 1. [`parser`] splits it into statements with the Flink-flavoured [`parser::dialect`], parsing
//!    `CREATE TABLE` (watermarks, computed columns, keys, connector options) itself.
//! 2. [`rewrite`] maps Flink spellings (`TUMBLE_START`, `DATE_FORMAT`, `IF`, ...) onto the
//!    function library in [`functions`] (Flink's own in [`functions::flink`]).
//! 3. [`planner`] lets DataFusion plan, type-check and optimize each query (window TVFs enter via
//!    the relation planner in [`tvf`]), then translates the logical plan into the streaming
//!    operators of [`plan`], rejecting what cannot run incrementally.

pub mod config;
pub mod depth;
pub mod functions;
pub mod optimize;
pub mod parser;
pub mod plan;
pub mod planner;
pub mod rewrite;
pub mod tvf;

pub use plan::*;
pub use planner::{plan_script, Catalog};
