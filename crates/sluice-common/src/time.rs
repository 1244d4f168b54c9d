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

/// Formats a second or millisecond timestamp column without a time zone with a chrono format
/// (`%Y-%m-%d`), parsed once for the whole column (arrow's formatter and DataFusion's `to_char`
/// parse it again for every value). `None` for other columns (zoned or finer timestamps: the
/// caller formats those).
pub fn format_timestamps(
    array: &ArrayRef,
    format: &str,
) -> Result<Option<arrow::array::StringArray>, ArrowError> {
    use std::fmt::Write;
    if !matches!(
        array.data_type(),
        DataType::Timestamp(TimeUnit::Millisecond | TimeUnit::Second, None)
    ) {
        return Ok(None);
    }
    let items: Vec<chrono::format::Item> = chrono::format::StrftimeItems::new(format).collect();
    if items
        .iter()
        .any(|i| matches!(i, chrono::format::Item::Error))
    {
        return Err(ArrowError::InvalidArgumentError(format!(
            "'{format}' is not a valid date/time format"
        )));
    }
    // Rows of one minute (of one millisecond, for a format with seconds) format alike: a row
    // in the same one as the row before reuses its text.
    let step = if items.iter().all(minute_or_coarser) {
        60_000
    } else {
        1
    };
    let millis = to_millis(array)?;
    let out = format_each(
        millis.as_primitive::<TimestampMillisecondType>(),
        step,
        format.len(),
        |t, text| {
            write!(text, "{}", t.format_with_items(items.iter()))
                .map_err(|e| ArrowError::ComputeError(e.to_string()))
        },
    )?;
    Ok(Some(out))
}

/// Formats a timestamp, date or timestamp-text column with a Flink `DATE_FORMAT` pattern,
/// parsed once. Second and millisecond timestamps reuse the text of the row before within a
/// minute (or millisecond); other columns are cast to nanosecond timestamps first (zoned ones
/// to their local time).
pub fn format_timestamps_java(
    array: &ArrayRef,
    format: &crate::java_format::JavaDateFormat,
) -> Result<arrow::array::StringArray, ArrowError> {
    use arrow::datatypes::TimestampNanosecondType;
    let write = |t: &chrono::NaiveDateTime, text: &mut String| -> Result<(), ArrowError> {
        format.write(t, text);
        Ok(())
    };
    if let DataType::Timestamp(TimeUnit::Millisecond | TimeUnit::Second, None) = array.data_type() {
        let step = if format.minute_or_coarser() {
            60_000
        } else {
            1
        };
        let millis = to_millis(array)?;
        return format_each(
            millis.as_primitive::<TimestampMillisecondType>(),
            step,
            24,
            write,
        );
    }
    let nanos = arrow::compute::cast(array, &DataType::Timestamp(TimeUnit::Nanosecond, None))?;
    let nanos = nanos.as_primitive::<TimestampNanosecondType>();
    let mut out = arrow::array::StringBuilder::with_capacity(nanos.len(), nanos.len() * 24);
    let mut text = String::new();
    for v in nanos.iter() {
        match v {
            Some(v) => {
                text.clear();
                write(
                    &chrono::DateTime::from_timestamp_nanos(v).naive_utc(),
                    &mut text,
                )?;
                out.append_value(&text);
            }
            None => out.append_null(),
        }
    }
    Ok(out.finish())
}

/// Formats each millisecond value, reusing the text of the row before within one `step`.
fn format_each(
    millis: &arrow::array::TimestampMillisecondArray,
    step: i64,
    width: usize,
    write: impl Fn(&chrono::NaiveDateTime, &mut String) -> Result<(), ArrowError>,
) -> Result<arrow::array::StringArray, ArrowError> {
    let mut out = arrow::array::StringBuilder::with_capacity(millis.len(), millis.len() * width);
    let mut text = String::new();
    let mut last = None;
    for i in 0..millis.len() {
        let t = millis
            .is_valid(i)
            .then(|| chrono::DateTime::from_timestamp_millis(millis.value(i)))
            .flatten();
        match t {
            Some(t) => {
                let unit = millis.value(i).div_euclid(step);
                if last != Some(unit) {
                    text.clear();
                    write(&t.naive_utc(), &mut text)?;
                    last = Some(unit);
                }
                out.append_value(&text);
            }
            None => out.append_null(),
        }
    }
    Ok(out.finish())
}

/// Whether a format item's text is the same for every instant of a minute.
fn minute_or_coarser(item: &chrono::format::Item) -> bool {
    use chrono::format::{Fixed, Item, Numeric};
    match item {
        Item::Literal(_) | Item::OwnedLiteral(_) | Item::Space(_) | Item::OwnedSpace(_) => true,
        Item::Numeric(n, _) => matches!(
            n,
            Numeric::Year
                | Numeric::YearDiv100
                | Numeric::YearMod100
                | Numeric::IsoYear
                | Numeric::IsoYearDiv100
                | Numeric::IsoYearMod100
                | Numeric::Month
                | Numeric::Day
                | Numeric::WeekFromSun
                | Numeric::WeekFromMon
                | Numeric::IsoWeek
                | Numeric::NumDaysFromSun
                | Numeric::WeekdayFromMon
                | Numeric::Ordinal
                | Numeric::Hour
                | Numeric::Hour12
                | Numeric::Minute
        ),
        Item::Fixed(f) => matches!(
            f,
            Fixed::ShortMonthName
                | Fixed::LongMonthName
                | Fixed::ShortWeekdayName
                | Fixed::LongWeekdayName
                | Fixed::LowerAmPm
                | Fixed::UpperAmPm
        ),
        _ => false,
    }
}

/// Null-aware row access to a millisecond column (row-at-a-time code paths only).
pub fn millis_at(array: &ArrayRef, row: usize) -> Option<i64> {
    let a = array.as_primitive::<TimestampMillisecondType>();
    a.is_valid(row).then(|| a.value(row))
}

/// Parses a duration as Flink writes them (`500 ms`, `1s`, `5 min`, `1 h`, `2 d`, or plain
/// milliseconds) into milliseconds; `None` when it is not one.
pub fn parse_duration_ms(text: &str) -> Option<i64> {
    let t = text.trim().to_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" | "milli" | "millis" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "secs" | "second" | "seconds" => 1000,
        "min" | "m" | "minute" | "minutes" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// The wall clock, in milliseconds since the Unix epoch (processing time).
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{format_timestamps, parse_duration_ms};
    use arrow::array::{Array, ArrayRef};

    #[test]
    fn flink_durations() {
        assert_eq!(parse_duration_ms("500 ms"), Some(500));
        assert_eq!(parse_duration_ms("1s"), Some(1000));
        assert_eq!(parse_duration_ms(" 5 min"), Some(300_000));
        assert_eq!(parse_duration_ms("2 h"), Some(7_200_000));
        assert_eq!(parse_duration_ms("250"), Some(250));
        assert_eq!(parse_duration_ms("5 fortnights"), None);
        assert_eq!(parse_duration_ms("s"), None);
    }

    /// Timestamps format as Flink's DATE_FORMAT and the sinks print them, before 1970 too;
    /// nulls stay null; zoned and finer timestamps are left to the caller; a bad format is an
    /// error.
    #[test]
    fn timestamps_format_with_the_format_parsed_once() {
        use arrow::array::{
            TimestampMicrosecondArray, TimestampMillisecondArray, TimestampSecondArray,
        };
        use std::sync::Arc;
        let millis: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![
            Some(1_794_355_200_123),
            None,
            Some(-1),
        ]));
        let text = format_timestamps(&millis, "%Y-%m-%d %H:%M:%S%.3f")
            .unwrap()
            .unwrap();
        assert_eq!(text.value(0), "2026-11-11 00:00:00.123");
        assert!(text.is_null(1));
        assert_eq!(text.value(2), "1969-12-31 23:59:59.999");
        let seconds: ArrayRef = Arc::new(TimestampSecondArray::from(vec![1_794_355_260]));
        let text = format_timestamps(&seconds, "%H:%M").unwrap().unwrap();
        assert_eq!(text.value(0), "00:01");
        let micros: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![0]));
        assert!(format_timestamps(&micros, "%Y").unwrap().is_none());
        let zoned: ArrayRef =
            Arc::new(TimestampMillisecondArray::from(vec![0]).with_timezone("UTC"));
        assert!(format_timestamps(&zoned, "%Y").unwrap().is_none());
        assert!(format_timestamps(&millis, "%Y-%Q").is_err());
    }

    /// Text reused from the row before (same minute, or same millisecond for formats with
    /// seconds) equals each value formatted on its own, across minute, day and year boundaries,
    /// negative times and nulls.
    #[test]
    fn reused_text_equals_formatting_each_value() {
        use arrow::array::TimestampMillisecondArray;
        use std::sync::Arc;
        let mut values = vec![];
        let mut t: i64 = 1_798_761_599_000 - 200_000; // shortly before 2027-01-01
        for i in 0..2_000i64 {
            t += [0, 1, 999, 7_001, 59_999][(i % 5) as usize];
            values.push(if i % 97 == 0 { None } else { Some(t) });
        }
        values.extend([
            Some(-60_001),
            Some(-60_000),
            Some(-59_999),
            Some(-1),
            Some(0),
        ]);
        let array: ArrayRef = Arc::new(TimestampMillisecondArray::from(values.clone()));
        for format in [
            "%Y-%m-%d",
            "%H:%M",
            "%Y-%m-%d %H:%M:%S",
            "%S%.3f",
            "%a %b %p %j",
        ] {
            let text = format_timestamps(&array, format).unwrap().unwrap();
            for (i, v) in values.iter().enumerate() {
                let want = v.map(|v| {
                    chrono::DateTime::from_timestamp_millis(v)
                        .unwrap()
                        .naive_utc()
                        .format(format)
                        .to_string()
                });
                let got = (!text.is_null(i)).then(|| text.value(i).to_string());
                assert_eq!(got, want, "{format}, row {i}");
            }
        }
    }
}
