//! The function registry: DataFusion's scalar and aggregate libraries, plus Sluice's own.
//!
//! The legacy group-window functions `TUMBLE`, `HOP` and `SESSION` are registered as marker
//! functions. They type-check a `GROUP BY` clause but are never evaluated: the streaming planner
//! replaces them with a window operator. Each returns a struct of the window's bounds, and the
//! `TUMBLE_START`-style helpers are rewritten to field accesses on it (see [`crate::rewrite`]).

pub mod flink;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use datafusion_common::{plan_err, Result as DFResult};
use datafusion_expr::{
    AggregateUDF, ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};

/// Fields of the struct a window marker returns, in order.
pub const WINDOW_FIELDS: [&str; 3] = ["window_start", "window_end", "window_time"];

/// The Arrow type of window bounds: Flink's `TIMESTAMP(3)`.
pub fn window_time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, None)
}

/// The struct type returned by a window marker function.
pub fn window_struct_type() -> DataType {
    DataType::Struct(Fields::from(
        WINDOW_FIELDS
            .iter()
            .map(|n| Field::new(*n, window_time_type(), false))
            .collect::<Vec<_>>(),
    ))
}

/// A legacy group-window marker: `TUMBLE(ts, size)`, `HOP(ts, slide, size)`, `SESSION(ts, gap)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct WindowMarker {
    name: &'static str,
    signature: Signature,
}

impl WindowMarker {
    fn new(name: &'static str, args: usize) -> Self {
        WindowMarker {
            name,
            signature: Signature::any(args, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for WindowMarker {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DFResult<DataType> {
        Ok(window_struct_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> DFResult<ColumnarValue> {
        plan_err!(
            "{}() is a group window: use it only in GROUP BY, with {}_START/{}_END in SELECT",
            self.name.to_uppercase(),
            self.name.to_uppercase(),
            self.name.to_uppercase()
        )
    }
}

/// Names of the legacy window markers.
pub const WINDOW_MARKERS: [&str; 3] = ["tumble", "hop", "session"];

/// All scalar functions by lower-case name (aliases included).
pub fn scalar_functions() -> HashMap<String, Arc<ScalarUDF>> {
    let mut map = HashMap::new();
    let mut add = |udf: Arc<ScalarUDF>| {
        for alias in udf.aliases() {
            map.insert(alias.to_lowercase(), udf.clone());
        }
        map.insert(udf.name().to_lowercase(), udf);
    };
    for f in datafusion_functions::all_default_functions() {
        add(f);
    }
    add(Arc::new(ScalarUDF::new_from_impl(WindowMarker::new(
        "tumble", 2,
    ))));
    add(Arc::new(ScalarUDF::new_from_impl(WindowMarker::new(
        "hop", 3,
    ))));
    add(Arc::new(ScalarUDF::new_from_impl(WindowMarker::new(
        "session", 2,
    ))));
    for f in crate::functions::flink::all() {
        add(f);
    }
    map
}

/// All aggregate functions by lower-case name (aliases included).
pub fn aggregate_functions() -> HashMap<String, Arc<AggregateUDF>> {
    let mut map = HashMap::new();
    for f in datafusion_functions_aggregate::all_default_aggregate_functions() {
        for alias in f.aliases() {
            map.insert(alias.to_lowercase(), f.clone());
        }
        map.insert(f.name().to_lowercase(), f);
    }
    map
}
