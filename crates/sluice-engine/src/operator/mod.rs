//! The operators: sources, stateless steps, the stateful operators (each implements
//! [`driver::StatefulOperator`] and runs in the one shell of [`driver::stateful`]), and sinks.

pub mod aggregate;
pub mod driver;
pub mod join;
pub mod normalize;
pub mod over;
pub mod rank;
pub mod rows;
pub(crate) mod sink;
pub mod source;
pub mod stateless;
pub mod temporal;
