//! The `print` and `blackhole` sinks.

use std::io::Write;

use sluice_common::{ChangeBatch, Result};

use crate::options::{ConnectorDef, Kind, OptionDef, Options, Side};
use crate::{ConnectorSpec, SinkWriter};

/// The `print` connector's options.
pub const PRINT: ConnectorDef = ConnectorDef {
    name: "print",
    reads: false,
    writes: true,
    metadata: &[],
    writable_metadata: &[],
    formats: false,
    lookup: false,
    options: &[OptionDef {
        key: "print-identifier",
        kind: Kind::Text,
        default: None,
        side: Side::Sink,
        identity: false,
        doc: "a name printed before the worker on every line",
    }],
};

/// The `blackhole` connector takes no options.
pub const BLACKHOLE: ConnectorDef = ConnectorDef {
    name: "blackhole",
    reads: false,
    writes: true,
    metadata: &[],
    writable_metadata: &[],
    formats: false,
    lookup: false,
    options: &[],
};

/// Prints each row as Flink does: `+I[1, shoes, 12.5]`, prefixed by the worker when parallel.
pub struct PrintSink {
    prefix: String,
}

impl PrintSink {
    pub fn open(_spec: &ConnectorSpec, opts: &mut Options, worker: usize) -> Result<Self> {
        let id = opts.get("print-identifier")?;
        let prefix = match id {
            Some(id) => format!("{id}:{worker}> "),
            None => format!("{worker}> "),
        };
        Ok(PrintSink { prefix })
    }
}

impl SinkWriter for PrintSink {
    fn write(&mut self, batch: &ChangeBatch) -> Result<()> {
        let formatters = crate::memory::row_strings(&batch.data)?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for (i, row) in formatters.into_iter().enumerate() {
            let _ = writeln!(
                out,
                "{}{}[{}]",
                self.prefix,
                batch.op(i).short_name(),
                row.join(", ")
            );
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let _ = std::io::stdout().flush();
        Ok(())
    }
}

/// Discards everything (for benchmarks).
pub struct Blackhole;

impl SinkWriter for Blackhole {
    fn write(&mut self, _batch: &ChangeBatch) -> Result<()> {
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}
