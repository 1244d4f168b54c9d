//! Test help: snapshots altered inside their bytes, for the state decoders' tests.

use std::sync::Arc;

use arrow::array::{Array, AsArray, BinaryArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use rand::{Rng, SeedableRng};

/// Alters one value of a binary column of `snap` at a time (a bit flipped, a byte set to 0xff,
/// the value cut short), `cases` times, and restores each with `restore` (true: restored,
/// false: refused with an error). A panic fails the test, naming the column and row; a hang or
/// a huge allocation would end it too.
pub(crate) fn altered_snapshots_restore_or_fail(
    snap: &RecordBatch,
    cases: usize,
    restore: impl Fn(&RecordBatch) -> bool,
) {
    let binary: Vec<usize> = (0..snap.num_columns())
        .filter(|c| matches!(snap.column(*c).data_type(), DataType::Binary))
        .collect();
    assert!(
        !binary.is_empty() && snap.num_rows() > 0,
        "a snapshot with bytes to alter"
    );
    // Panics caught by the decoders' guard are not printed (as in a job).
    crate::runtime::panics::install_hook();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    for _ in 0..cases {
        let c = binary[rng.random_range(0..binary.len())];
        let column = snap.column(c).as_binary::<i32>();
        let row = rng.random_range(0..column.len());
        let mut values: Vec<Option<Vec<u8>>> = (0..column.len())
            .map(|i| column.is_valid(i).then(|| column.value(i).to_vec()))
            .collect();
        if let Some(v) = values[row].as_mut() {
            match rng.random_range(0..3) {
                0 if !v.is_empty() => {
                    let at = rng.random_range(0..v.len());
                    v[at] ^= 1 << rng.random_range(0..8);
                }
                1 if !v.is_empty() => {
                    let at = rng.random_range(0..v.len());
                    v[at] = 0xff;
                }
                _ => {
                    let keep = rng.random_range(0..=v.len());
                    v.truncate(keep);
                }
            }
        }
        let altered: BinaryArray = values.iter().map(|v| v.as_deref()).collect();
        let mut columns = snap.columns().to_vec();
        columns[c] = Arc::new(altered);
        let altered = RecordBatch::try_new(snap.schema(), columns).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| restore(&altered)));
        assert!(
            outcome.is_ok(),
            "restoring a snapshot with column {c} row {row} altered panicked"
        );
    }
}

/// The input of the keyed operators' decoder tests: key, event time (ms) and value.
pub(crate) fn timed_input() -> arrow::datatypes::SchemaRef {
    use arrow::datatypes::{Field, Schema, TimeUnit};
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("v", DataType::Int64, false),
    ]))
}

/// Rows `(key, time, value)` of [`timed_input`] as inserts.
pub(crate) fn timed_batch(
    rows: impl Iterator<Item = (i64, i64, i64)>,
) -> sluice_common::ChangeBatch {
    use arrow::array::{Int64Array, TimestampMillisecondArray};
    let rows: Vec<_> = rows.collect();
    sluice_common::ChangeBatch::inserts(
        RecordBatch::try_new(
            timed_input(),
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(TimestampMillisecondArray::from_iter_values(
                    rows.iter().map(|r| r.1),
                )),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap(),
    )
}
