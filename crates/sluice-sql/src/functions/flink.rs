//! Flink functions that DataFusion has no equivalent for. Functions that are only another
//! spelling of a DataFusion function are mapped in [`crate::rewrite`] instead.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, StringArray, StringBuilder};
use arrow::datatypes::DataType;
use datafusion_common::{exec_err, Result as DFResult};
use datafusion_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// Every Flink-only scalar function.
pub fn all() -> Vec<Arc<ScalarUDF>> {
    vec![
        Arc::new(ScalarUDF::new_from_impl(RegexpExtract::new())),
        Arc::new(ScalarUDF::new_from_impl(SplitIndex::new())),
        Arc::new(ScalarUDF::new_from_impl(ProcTime::new("proctime"))),
        Arc::new(ScalarUDF::new_from_impl(ProcTime::new(WALL_CLOCK))),
        Arc::new(ScalarUDF::new_from_impl(DateFormat::new())),
    ]
}

/// `DATE_FORMAT(ts, format)` and `FROM_UNIXTIME`: Flink's patterns (`java.time`'s
/// `DateTimeFormatter`, see [`sluice_common::java_format`]), parsed once per batch (once per
/// distinct pattern for a pattern per row). Timestamps, dates and timestamp text are formatted.
#[derive(Debug, PartialEq, Eq, Hash)]
struct DateFormat {
    signature: Signature,
}

impl DateFormat {
    fn new() -> Self {
        DateFormat {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for DateFormat {
    fn name(&self) -> &str {
        "sluice_date_format"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        use sluice_common::java_format::JavaDateFormat;
        let parse = |p: &str| {
            JavaDateFormat::parse(p).map_err(|e| {
                datafusion_common::DataFusionError::Execution(format!("DATE_FORMAT: {e}"))
            })
        };
        let times = args.args[0].to_array(args.number_rows)?;
        let formatted = match Strings::new(&args.args[1])? {
            Strings::Constant(None) => {
                return Ok(ColumnarValue::Array(arrow::array::new_null_array(
                    &DataType::Utf8,
                    args.number_rows,
                )))
            }
            Strings::Constant(Some(pattern)) => {
                sluice_common::time::format_timestamps_java(&times, &parse(&pattern)?)
            }
            Strings::Column(patterns) => {
                // A pattern per row: each row formatted alone, the pattern parsed when it changes.
                let mut out = StringBuilder::with_capacity(args.number_rows, 0);
                let mut last: Option<(String, JavaDateFormat)> = None;
                for i in 0..args.number_rows {
                    if patterns.is_null(i) || times.is_null(i) {
                        out.append_null();
                        continue;
                    }
                    let p = patterns.value(i);
                    if last.as_ref().map(|(q, _)| q.as_str()) != Some(p) {
                        last = Some((p.to_string(), parse(p)?));
                    }
                    let f = &last.as_ref().expect("set above").1;
                    let one = sluice_common::time::format_timestamps_java(&times.slice(i, 1), f)?;
                    out.append_option((!one.is_null(0)).then(|| one.value(0)));
                }
                Ok(out.finish())
            }
        };
        match formatted {
            Ok(text) => Ok(ColumnarValue::Array(Arc::new(text))),
            Err(e) => exec_err!("DATE_FORMAT: {e}"),
        }
    }
}

/// The function `CURRENT_TIMESTAMP`, `NOW()` and `LOCALTIMESTAMP` become: the wall clock per
/// row, as in Flink's streaming mode, but not a processing-time attribute as `PROCTIME()` is.
pub const WALL_CLOCK: &str = "sluice_wall_clock";

/// `PROCTIME()`: the processing time (wall clock) at which a row is computed, as TIMESTAMP(3).
/// Volatile, so it is evaluated per batch and never folded into a constant at planning. Also
/// [`WALL_CLOCK`] under its own name.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ProcTime {
    signature: Signature,
    name: &'static str,
}

impl ProcTime {
    fn new(name: &'static str) -> Self {
        ProcTime {
            signature: Signature::nullary(Volatility::Volatile),
            name,
        }
    }
}

impl ScalarUDFImpl for ProcTime {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Timestamp(
            arrow::datatypes::TimeUnit::Millisecond,
            None,
        ))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        let now = sluice_common::time::now_millis();
        Ok(ColumnarValue::Array(Arc::new(
            arrow::array::TimestampMillisecondArray::from(vec![now; args.number_rows]),
        )))
    }
}

/// A string argument: a constant (not expanded to one value per row), or a column.
enum Strings {
    Constant(Option<String>),
    Column(StringArray),
}

impl Strings {
    fn new(arg: &ColumnarValue) -> DFResult<Self> {
        Ok(match arg {
            ColumnarValue::Scalar(v) => {
                let a = arrow::compute::cast(&v.to_array_of_size(1)?, &DataType::Utf8)?;
                let a = a.as_string::<i32>();
                Strings::Constant((!a.is_null(0)).then(|| a.value(0).to_string()))
            }
            ColumnarValue::Array(a) => Strings::Column(
                arrow::compute::cast(a, &DataType::Utf8)?
                    .as_string()
                    .clone(),
            ),
        })
    }

    #[inline]
    fn get(&self, i: usize) -> Option<&str> {
        match self {
            Strings::Constant(v) => v.as_deref(),
            Strings::Column(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// An integer argument: a constant, or a column.
enum Ints {
    Constant(Option<i64>),
    Column(Int64Array),
}

impl Ints {
    fn new(arg: &ColumnarValue) -> DFResult<Self> {
        Ok(match arg {
            ColumnarValue::Scalar(v) => {
                let a = arrow::compute::cast(&v.to_array_of_size(1)?, &DataType::Int64)?;
                let a = a.as_primitive::<arrow::datatypes::Int64Type>();
                Ints::Constant((!a.is_null(0)).then(|| a.value(0)))
            }
            ColumnarValue::Array(a) => Ints::Column(
                arrow::compute::cast(a, &DataType::Int64)?
                    .as_primitive()
                    .clone(),
            ),
        })
    }

    #[inline]
    fn get(&self, i: usize) -> Option<i64> {
        match self {
            Ints::Constant(v) => *v,
            Ints::Column(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// `REGEXP_EXTRACT(str, regex [, group])`: the given capture group of the first match, or NULL.
/// Without a group it is the whole match (group 0), as Flink's `SqlFunctionUtils.regexpExtract`.
#[derive(Debug)]
struct RegexpExtract {
    signature: Signature,
    /// The regex compiled last (patterns are nearly always constants): compiling costs as much
    /// as matching a few thousand rows.
    compiled: std::sync::Mutex<Option<(String, regex::Regex)>>,
}

impl RegexpExtract {
    fn new() -> Self {
        RegexpExtract {
            signature: Signature::variadic_any(Volatility::Immutable),
            compiled: std::sync::Mutex::new(None),
        }
    }

    fn regex(&self, pattern: &str) -> DFResult<regex::Regex> {
        let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, re)) = compiled.as_ref() {
            if p == pattern {
                return Ok(re.clone());
            }
        }
        let re = regex::Regex::new(pattern).map_err(|e| {
            datafusion_common::DataFusionError::Execution(format!(
                "REGEXP_EXTRACT: bad regex '{pattern}': {e}"
            ))
        })?;
        *compiled = Some((pattern.to_string(), re.clone()));
        Ok(re)
    }
}

// The cache is not part of the function's identity.
impl PartialEq for RegexpExtract {
    fn eq(&self, other: &Self) -> bool {
        self.signature == other.signature
    }
}

impl Eq for RegexpExtract {}

impl std::hash::Hash for RegexpExtract {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.signature.hash(state);
    }
}

impl ScalarUDFImpl for RegexpExtract {
    fn name(&self) -> &str {
        "regexp_extract"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        if !(2..=3).contains(&args.args.len()) {
            return exec_err!("REGEXP_EXTRACT takes (string, regex [, group])");
        }
        let strings = Strings::new(&args.args[0])?;
        let patterns = Strings::new(&args.args[1])?;
        let groups = match args.args.get(2) {
            Some(g) => Ints::new(g)?,
            None => Ints::Constant(Some(0)),
        };
        // The regex compiled last, and its capture positions (reused: no allocation per row).
        let mut cache: Option<(String, regex::Regex, regex::CaptureLocations)> = None;
        let mut out = StringBuilder::with_capacity(args.number_rows, args.number_rows * 8);
        for i in 0..args.number_rows {
            let (Some(s), Some(pattern), Some(group)) =
                (strings.get(i), patterns.get(i), groups.get(i))
            else {
                out.append_null();
                continue;
            };
            if cache.as_ref().map(|(p, _, _)| p.as_str()) != Some(pattern) {
                let re = self.regex(pattern)?;
                let locations = re.capture_locations();
                cache = Some((pattern.to_string(), re, locations));
            }
            let (_, re, locations) = cache.as_mut().expect("set above");
            let found = re
                .captures_read(locations, s)
                .and_then(|_| usize::try_from(group).ok())
                .and_then(|g| locations.get(g));
            match found {
                Some((start, end)) => out.append_value(&s[start..end]),
                None => out.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// The `index`-th part of `s` split at the ASCII byte `d` (always a character boundary).
fn nth_part(s: &str, d: u8, index: usize) -> Option<&str> {
    let mut start = 0;
    let mut seen = 0;
    for (i, b) in s.bytes().enumerate() {
        if b == d {
            if seen == index {
                return s.get(start..i);
            }
            seen += 1;
            start = i + 1;
        }
    }
    (seen == index).then(|| &s[start..])
}

/// `SPLIT_INDEX(str, delimiter, index)`: the 0-based `index`-th part, or NULL when out of range.
#[derive(Debug, PartialEq, Eq, Hash)]
struct SplitIndex {
    signature: Signature,
}

impl SplitIndex {
    fn new() -> Self {
        SplitIndex {
            signature: Signature::any(3, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for SplitIndex {
    fn name(&self) -> &str {
        "split_index"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        if args.args.len() != 3 {
            return exec_err!("SPLIT_INDEX takes (string, delimiter, index)");
        }
        let strings = Strings::new(&args.args[0])?;
        let delims = Strings::new(&args.args[1])?;
        let index = Ints::new(&args.args[2])?;
        let mut out = StringBuilder::with_capacity(args.number_rows, args.number_rows * 8);
        for i in 0..args.number_rows {
            let (Some(s), Some(delim), Some(index)) = (strings.get(i), delims.get(i), index.get(i))
            else {
                out.append_null();
                continue;
            };
            let Ok(index) = usize::try_from(index) else {
                out.append_null();
                continue;
            };
            // One ASCII character (the usual delimiter): a scan of the bytes.
            let part = match delim.as_bytes() {
                [d] if d.is_ascii() => nth_part(s, *d, index),
                _ => s.split(delim).nth(index),
            };
            match part {
                Some(part) => out.append_value(part),
                None => out.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte scan agrees with `str::split` on every index, edge cases and non-ASCII text
    /// included.
    #[test]
    fn nth_part_agrees_with_split() {
        for s in [
            "",
            "/",
            "a",
            "a/b",
            "/a//b/",
            "https://www.nexmark.com/abc/de/f/item.htm",
            "é/ü/€x/",
        ] {
            for index in 0..8 {
                assert_eq!(
                    nth_part(s, b'/', index),
                    s.split('/').nth(index),
                    "{s:?} {index}"
                );
            }
        }
    }
}
