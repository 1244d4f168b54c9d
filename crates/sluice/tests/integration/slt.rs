//! Runs the streaming-semantics `.slt` files in `tests/slt/` through Sluice.
//!
//! Each file is one session: `statement ok` lines (SET, CREATE TABLE/VIEW) build up a script;
//! `INSERT INTO ... VALUES` runs a job that writes test data; a `query` runs the script plus the
//! query as a bounded job with one worker and returns its changelog in emission order, the first
//! column being the change kind (`+I`, `-U`, `+U`, `-D`). `${DIR}` is a fresh temporary folder.
//! The sources of a query run one after another in the order the plan reads them (the left
//! input of a join first), so that a join's changelog is deterministic.

use std::sync::Arc;
use std::time::Duration;

use sluice_engine::JobOptions;
use sqllogictest::{DBOutput, DefaultColumnType};

use crate::common::{run_job, Changelog};

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

struct SluiceDb {
    dir: tempfile::TempDir,
    script: String,
}

impl SluiceDb {
    fn run_job(&self, sql: &str) -> Result<(Vec<Vec<String>>, u64), SltError> {
        let script = format!("{}{sql};\n", self.script);
        let plan = sluice_sql::plan_script(&script).map_err(|e| SltError(e.to_string()))?;
        let log = Arc::new(Changelog::default());
        let options = JobOptions {
            workers: 1,
            // Sources run one after another, so a join sees its inputs in a known order.
            sequential_sources: true,
            ..Default::default()
        };
        let summary =
            run_job(plan, options, log.clone(), Duration::from_secs(60)).map_err(SltError)?;
        let written = summary.rows_written.values().sum();
        let rows = log
            .changes(0)
            .into_iter()
            .map(|c| {
                let mut line = vec![c.op.short_name().to_string()];
                line.extend(c.row);
                line
            })
            .collect();
        Ok((rows, written))
    }
}

impl sqllogictest::DB for SluiceDb {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let sql = sql.replace("${DIR}", &self.dir.path().display().to_string());
        let head = sql.trim_start().to_uppercase();
        if head.starts_with("SELECT") || head.starts_with("WITH") {
            let (rows, _) = self.run_job(&sql)?;
            let width = rows.first().map_or(1, |r| r.len());
            return Ok(DBOutput::Rows {
                types: vec![DefaultColumnType::Any; width],
                rows,
            });
        }
        if head.starts_with("INSERT") {
            let (_, written) = self.run_job(&sql)?;
            return Ok(DBOutput::StatementComplete(written));
        }
        let candidate = format!("{}{sql};\n", self.script);
        sluice_sql::plan_script(&candidate).map_err(|e| SltError(e.to_string()))?;
        self.script = candidate;
        Ok(DBOutput::StatementComplete(0))
    }
}

#[test]
fn streaming_semantics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/slt");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "slt"));
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    let mut failures = vec![];
    for file in &files {
        let mut runner = sqllogictest::Runner::new(|| async {
            Ok(SluiceDb {
                dir: tempfile::tempdir().unwrap(),
                script: String::new(),
            })
        });
        if let Err(e) = runner.run_file(file) {
            failures.push(format!("{}:\n{}", file.display(), e.display(false)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
