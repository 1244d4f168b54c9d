//! Event-time helpers. Watermarks and window bounds are `i64` milliseconds since the Unix epoch.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
use arrow::error::ArrowError;

/// The watermark before any event has been seen.
pub const MIN_WATERMARK: i64 = i64::MIN;
/// The watermark at the end of a bounded input: every window fires.
pub const MAX_WATERMARK: i64 = i64::MAX;

/// Converts a timestamp (or date) column to milliseconds since the epoch, nulls included.
pub fn to_millis(array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    match array.data_type() {
        DataType::Timestamp(TimeUnit::Millisecond, None) => Ok(array.clone()),
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => {
            arrow::compute::cast(array, &DataType::Timestamp(TimeUnit::Millisecond, None))
        }
        other => Err(ArrowError::InvalidArgumentError(format!(
            "expected a TIMESTAMP column for event time, found {other}"
        ))),
    }
}

/// The largest non-null value of a millisecond timestamp column.
pub fn max_millis(array: &ArrayRef) -> Result<Option<i64>, ArrowError> {
    let millis = to_millis(array)?;
    Ok(arrow::compute::max(
        millis.as_primitive::<TimestampMillisecondType>(),
    ))
}

/// Formats milliseconds as Flink's SQL timestamp text, `2026-11-11 00:05:00.000`.
pub fn format_millis(ms: i64) -> String {
    match ms {
        MIN_WATERMARK => "-inf".to_string(),
        MAX_WATERMARK => "+inf".to_string(),
        _ => chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.naive_utc().format("%Y-%m-%d %H:%M:%S%.3f").to_string())
            .unwrap_or_else(|| ms.to_string()),
    }
}

/// Null-aware row access to a millisecond column (row-at-a-time code paths only).
pub fn millis_at(array: &ArrayRef, row: usize) -> Option<i64> {
    let a = array.as_primitive::<TimestampMillisecondType>();
    a.is_valid(row).then(|| a.value(row))
}
