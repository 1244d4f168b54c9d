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
    widths: Mutex<Vec<Vec<usize>>>,
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
    w.max(name.len())
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
        let mut widths = vec![2];
        let mut names = vec!["op".to_string()];
        for f in schema.fields() {
            widths.push(width(f.data_type(), f.name()));
            names.push(f.name().clone());
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", rule(&widths));
        let cells: Vec<String> = names.iter().zip(&widths).map(|(n, w)| format!(" {n:>w$} ")).collect();
        let _ = writeln!(out, "|{}|", cells.join("|"));
        let _ = writeln!(out, "{}", rule(&widths));
        let mut all = self.widths.lock().expect("widths");
        if all.len() <= index {
            all.resize(index + 1, vec![]);
        }
        all[index] = widths;
    }

    fn emit(&self, index: usize, batch: &ChangeBatch) {
        let widths = self.widths.lock().expect("widths")[index].clone();
        let rows = match row_strings(&batch.data) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cannot print rows: {e}");
                return;
            }
        };
        let mut out = std::io::stdout().lock();
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
        let mut out = std::io::stdout().lock();
        for w in self.widths.lock().expect("widths").iter() {
            let _ = writeln!(out, "{}", rule(w));
        }
        let _ = out.flush();
    }
}
