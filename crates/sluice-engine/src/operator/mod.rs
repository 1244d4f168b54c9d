//! The operators: sources, stateless steps, the keyed state of each stateful operator with the
//! shells that run it, and sinks.

pub mod aggregate;
pub mod join;
pub(crate) mod keyed;
pub mod over;
pub mod rank;
pub mod rows;
pub(crate) mod sink;
pub mod source;
pub mod stateless;
pub mod temporal;
pub(crate) mod two_input;
