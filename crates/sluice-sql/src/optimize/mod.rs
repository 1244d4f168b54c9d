//! Physical decisions on a streaming plan, one rule per module. The builder in `sluice-engine`
//! follows them, and `EXPLAIN` ([`crate::plan::explain`]) shows where they apply.

pub mod fusion;
pub mod shared;
pub mod windows;
