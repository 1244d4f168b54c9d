//! The end-to-end tests of the `sluice` command and engine, one module per feature area, in one
//! test binary (one link instead of one per file). `common` has the shared helpers: the
//! changelog collector, the run-a-job helper with its timeout, and the batch reference answer.

mod common;

#[cfg(feature = "kafka")]
mod avro;
mod big_screen;
#[cfg(feature = "jdbc")]
mod cdc_types;
mod changelog_formats;
mod cli_errors;
mod cluster;
mod console;
mod correctness_regressions;
mod emit_policies;
mod fuzz;
mod idle_sources;
#[cfg(feature = "jdbc")]
mod jdbc;
mod join_state;
#[cfg(feature = "kafka")]
mod kafka;
#[cfg(feature = "kafka")]
mod kafka_changelog;
#[cfg(feature = "mqtt")]
mod mqtt;
#[cfg(feature = "jdbc")]
mod mysql_cdc;
#[cfg(feature = "nats")]
mod nats;
mod nexmark_correctness;
mod nexmark_queries;
mod parquet_files;
#[cfg(feature = "jdbc")]
mod postgres_cdc;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
mod randomized_queries;
mod raw_files;
mod recovery;
#[cfg(feature = "redis")]
mod redis;
mod robustness;
mod s3_files;
mod serve;
mod shuffled_input;
mod slt;
mod stream_equals_batch;
