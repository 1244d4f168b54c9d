//! Prints a SELECT's changelog as a table with an `op` column, as Flink's SQL client does.

use std::io::Write;
use std::sync::Mutex;

use arrow::datatypes::{DataType, SchemaRef};
use sluice_common::ChangeBatch;
use sluice_connectors::memory::row_strings;
use sluice_engine::SelectOutput;

/// Streams rows as they arrive, in columns sized from the column types.
#[derive(Default)]
pub struct TablePrinter {
    state: Mutex<PrinterState>,
}

#[derive(Default)]
struct PrinterState {
    schemas: Vec<Option<SchemaRef>>,
    current: Option<usize>,
    widths: Option<Vec<usize>>,
}

fn width(t: &DataType, name: &str) -> usize {
    let w = match t {
        DataType::Boolean => 5,
        DataType::Int8 | DataType::Int16 | DataType::Int32 => 11,
        DataType::Int64 => 20,
        DataType::Timestamp(_, _) => 23,
        DataType::Date32 => 10,
        _ => 20,
    };
    w.max(name.chars().count()).min(MAX_WIDTH)
}

/// The widest a column is printed; longer names are cut short (`…`), longer values overflow.
const MAX_WIDTH: usize = 64;

/// A column name that fits its width.
fn fit(name: &str, width: usize) -> String {
    if name.chars().count() <= width {
        return name.to_string();
    }
    let mut cut: String = name.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn rule(widths: &[usize]) -> String {
    let mut s = String::from("+");
    for w in widths {
        s.push_str(&"-".repeat(w + 2));
        s.push('+');
    }
    s
}

impl SelectOutput for TablePrinter {
    fn begin(&self, index: usize, schema: SchemaRef) {
        let mut state = self.state.lock().expect("printer");
        if state.schemas.len() <= index {
            state.schemas.resize(index + 1, None);
        }
        state.schemas[index] = Some(schema);
    }

    fn emit(&self, index: usize, batch: &ChangeBatch) {
        let rows = match row_strings(&batch.data) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cannot print rows: {e}");
                return;
            }
        };
        let mut state = self.state.lock().expect("printer");
        let mut out = std::io::stdout().lock();
        if state.current != Some(index) {
            // A header whenever the output switches to another query.
            if let Some(w) = &state.widths {
                let _ = writeln!(out, "{}", rule(w));
            }
            let schema = state.schemas[index].clone().expect("begin() was called");
            let mut widths = vec![2];
            let mut names = vec!["op".to_string()];
            for f in schema.fields() {
                widths.push(width(f.data_type(), f.name()));
                names.push(f.name().clone());
            }
            let _ = writeln!(out, "{}", rule(&widths));
            let cells: Vec<String> = names
                .iter()
                .zip(&widths)
                .map(|(n, w)| format!(" {:>w$} ", fit(n, *w)))
                .collect();
            let _ = writeln!(out, "|{}|", cells.join("|"));
            let _ = writeln!(out, "{}", rule(&widths));
            state.widths = Some(widths);
            state.current = Some(index);
        }
        let widths = state.widths.clone().expect("set above");
        for (i, row) in rows.iter().enumerate() {
            let mut cells = vec![format!(" {:>2} ", batch.op(i).short_name())];
            for (v, w) in row.iter().zip(&widths[1..]) {
                cells.push(format!(" {v:>w$} "));
            }
            let _ = writeln!(out, "|{}|", cells.join("|"));
        }
    }
}

impl TablePrinter {
    /// Closes every printed table.
    pub fn finish(&self) {
        let state = self.state.lock().expect("printer");
        let mut out = std::io::stdout().lock();
        if let Some(w) = &state.widths {
            let _ = writeln!(out, "{}", rule(w));
        }
        let _ = out.flush();
    }
}
