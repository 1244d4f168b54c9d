//! Flink functions that DataFusion has no equivalent for. Functions that are only another
//! spelling of a DataFusion function are mapped in [`crate::rewrite`] instead.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array, StringBuilder};
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
        Arc::new(ScalarUDF::new_from_impl(ProcTime::new())),
    ]
}

/// `PROCTIME()`: the processing time (wall clock) at which a row is computed, as TIMESTAMP(3).
/// Volatile, so it is evaluated per batch and never folded into a constant at planning.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ProcTime {
    signature: Signature,
}

impl ProcTime {
    fn new() -> Self {
        ProcTime {
            signature: Signature::nullary(Volatility::Volatile),
        }
    }
}

impl ScalarUDFImpl for ProcTime {
    fn name(&self) -> &str {
        "proctime"
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

fn to_arrays(args: &[ColumnarValue], rows: usize) -> DFResult<Vec<ArrayRef>> {
    args.iter().map(|a| a.clone().into_array(rows)).collect()
}

fn as_strings(a: &ArrayRef) -> DFResult<ArrayRef> {
    Ok(arrow::compute::cast(a, &DataType::Utf8)?)
}

fn as_ints(a: &ArrayRef) -> DFResult<Int64Array> {
    Ok(arrow::compute::cast(a, &DataType::Int64)?
        .as_primitive()
        .clone())
}

/// `REGEXP_EXTRACT(str, regex [, group])`: the given capture group (0 = whole match, the default
/// is 1 as in Flink) of the first match, or NULL.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RegexpExtract {
    signature: Signature,
}

impl RegexpExtract {
    fn new() -> Self {
        RegexpExtract {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
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
        let arrays = to_arrays(&args.args, args.number_rows)?;
        let strings = as_strings(&arrays[0])?;
        let strings = strings.as_string::<i32>();
        let patterns = as_strings(&arrays[1])?;
        let patterns = patterns.as_string::<i32>();
        let groups = if arrays.len() == 3 {
            Some(as_ints(&arrays[2])?)
        } else {
            None
        };
        let mut cache: Option<(String, regex::Regex)> = None;
        let mut out = StringBuilder::new();
        for i in 0..args.number_rows {
            if strings.is_null(i)
                || patterns.is_null(i)
                || groups.as_ref().is_some_and(|g| g.is_null(i))
            {
                out.append_null();
                continue;
            }
            let pattern = patterns.value(i);
            if cache.as_ref().map(|(p, _)| p.as_str()) != Some(pattern) {
                let re = regex::Regex::new(pattern).map_err(|e| {
                    datafusion_common::DataFusionError::Execution(format!(
                        "REGEXP_EXTRACT: bad regex '{pattern}': {e}"
                    ))
                })?;
                cache = Some((pattern.to_string(), re));
            }
            let re = &cache.as_ref().expect("set above").1;
            let group = groups.as_ref().map(|g| g.value(i)).unwrap_or(1);
            match re
                .captures(strings.value(i))
                .and_then(|c| usize::try_from(group).ok().and_then(|g| c.get(g)))
            {
                Some(m) => out.append_value(m.as_str()),
                None => out.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
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
        let arrays = to_arrays(&args.args, args.number_rows)?;
        let strings = as_strings(&arrays[0])?;
        let strings = strings.as_string::<i32>();
        let delims = as_strings(&arrays[1])?;
        let delims = delims.as_string::<i32>();
        let index = as_ints(&arrays[2])?;
        let mut out = StringBuilder::new();
        for i in 0..args.number_rows {
            if strings.is_null(i) || delims.is_null(i) || index.is_null(i) || index.value(i) < 0 {
                out.append_null();
                continue;
            }
            match strings
                .value(i)
                .split(delims.value(i))
                .nth(index.value(i) as usize)
            {
                Some(part) => out.append_value(part),
                None => out.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}
