//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::path::Path;

/// The published rows of a filesystem sink folder, as JSON text with multiplicities: JSON lines
/// count once each; Debezium changes are folded (`before` retracts, `after` adds). `normalize`
/// may adjust a row first (for example, round float sums). A hidden, unpublished file left
/// behind after a successful run is an error.
#[allow(dead_code)]
pub fn committed_rows(
    dir: &Path,
    normalize: impl Fn(&mut serde_json::Value),
) -> BTreeMap<String, i64> {
    let mut rows = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return rows;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            !name.starts_with('.'),
            "unpublished file left behind: {name}"
        );
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let mut apply = |row: &serde_json::Value, sign: i64| {
                let mut row = row.clone();
                normalize(&mut row);
                *rows.entry(row.to_string()).or_insert(0) += sign;
            };
            if v.get("op").is_some() {
                if !v["before"].is_null() {
                    apply(&v["before"], -1);
                }
                if !v["after"].is_null() {
                    apply(&v["after"], 1);
                }
            } else {
                apply(&v, 1);
            }
        }
    }
    rows.retain(|_, n| *n != 0);
    rows
}

/// A batch's rows as text, floats at 12 significant digits: float sums depend on addition order
/// (and on retractions in sliding frames), while the exact values in these tests (cents,
/// averaged over at most a few dozen rows) need no more, so rounding never meets a tie that
/// float error could tip either way.
#[allow(dead_code)]
pub fn render(batch: &arrow::record_batch::RecordBatch) -> Vec<Vec<String>> {
    let mut out = sluice_connectors::memory::row_strings(batch).unwrap();
    for (c, f) in batch.schema().fields().iter().enumerate() {
        if matches!(
            f.data_type(),
            arrow::datatypes::DataType::Float64 | arrow::datatypes::DataType::Float32
        ) {
            for row in out.iter_mut() {
                if let Ok(v) = row[c].parse::<f64>() {
                    row[c] = format!("{v:.11e}");
                }
            }
        }
    }
    out
}
