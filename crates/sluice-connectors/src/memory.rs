//! The `memory` sink: an in-process table that folds a changelog into its current rows.
//! The demo's live view reads these tables; tests read them to check results.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use sluice_common::{ChangeBatch, Result};

use crate::format::TIMESTAMP_FORMAT;
use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, SinkWriter};

/// The current rows of a folded changelog, as display strings, with multiplicities.
#[derive(Debug, Default, Clone)]
pub struct MemoryTable {
    pub columns: Vec<String>,
    pub rows: HashMap<Vec<String>, i64>,
    /// Changelog rows received.
    pub changes: u64,
}

impl MemoryTable {
    /// Current rows (each repeated by its multiplicity), in no particular order.
    pub fn current_rows(&self) -> Vec<Vec<String>> {
        let mut out = vec![];
        for (row, n) in &self.rows {
            for _ in 0..(*n).max(0) {
                out.push(row.clone());
            }
        }
        out
    }
}

type Registry = Mutex<HashMap<String, Arc<Mutex<MemoryTable>>>>;

fn registry() -> &'static Registry {
    static TABLES: OnceLock<Registry> = OnceLock::new();
    TABLES.get_or_init(Default::default)
}

/// The table registered under `name` (created empty if absent).
pub fn table(name: &str) -> Arc<Mutex<MemoryTable>> {
    registry()
        .lock()
        .expect("registry")
        .entry(name.to_string())
        .or_default()
        .clone()
}

/// Formats each row's values as strings (timestamps in Flink's format, NULL as `NULL`).
pub fn row_strings(batch: &RecordBatch) -> Result<Vec<Vec<String>>> {
    let options = FormatOptions::default()
        .with_null("NULL")
        .with_timestamp_format(Some(TIMESTAMP_FORMAT))
        .with_timestamp_tz_format(Some(TIMESTAMP_FORMAT));
    let formatters = batch
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((0..batch.num_rows())
        .map(|i| formatters.iter().map(|f| f.value(i).to_string()).collect())
        .collect())
}

/// The `memory` connector's options.
pub const CONNECTOR: ConnectorDef = ConnectorDef {
    name: "memory",
    reads: false,
    writes: true,
    metadata: &[],
    writable_metadata: &[],
    formats: false,
    lookup: false,
    options: &[OptionDef {
        key: "memory.name",
        kind: Kind::Text,
        default: None,
        side: Side::Sink,
        identity: false,
        doc: "the in-process table written (default: the table's name)",
    }],
};

/// Writes into a named [`MemoryTable`].
pub struct MemorySink {
    table: Arc<Mutex<MemoryTable>>,
}

impl MemorySink {
    pub fn open(spec: &ConnectorSpec, opts: &mut Options) -> Result<Self> {
        let name = opts
            .get("memory.name")?
            .unwrap_or_else(|| spec.table.clone());
        let table = table(&name);
        table.lock().expect("memory table").columns = spec
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        Ok(MemorySink { table })
    }
}

impl SinkWriter for MemorySink {
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        let rows = row_strings(&batch.data)?;
        let mut t = self.table.lock().expect("memory table");
        t.changes += rows.len() as u64;
        for (i, row) in rows.into_iter().enumerate() {
            let sign = batch.op(i).sign();
            let n = {
                let entry = t.rows.entry(row.clone()).or_insert(0);
                *entry += sign;
                *entry
            };
            if n == 0 {
                t.rows.remove(&row);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
