//! Helpers on DataFusion logical expressions that several planners share.

use datafusion_common::{DFSchema, ScalarValue};
use datafusion_expr::Expr;

pub(crate) fn strip(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip(&c.expr),
        Expr::TryCast(c) => strip(&c.expr),
        Expr::Alias(a) => strip(&a.expr),
        other => other,
    }
}

pub(crate) fn column_index(e: &Expr, schema: &DFSchema) -> Option<usize> {
    match strip(e) {
        Expr::Column(c) => schema.index_of_column(c).ok(),
        _ => None,
    }
}

pub(crate) fn literal(e: &Expr) -> Option<i64> {
    match strip(e) {
        Expr::Literal(v, _) => v
            .cast_to(&arrow::datatypes::DataType::Int64)
            .ok()
            .and_then(|v| match v {
                ScalarValue::Int64(Some(n)) => Some(n),
                _ => None,
            }),
        _ => None,
    }
}
