//! **Filter-project fusion**: a filter and the projection above it that share function calls
//! (Nexmark q21 extracts the same regex in its WHERE and in its SELECT) run as one step. Each
//! shared call is evaluated once per batch, before the filter, and both read it as a column.
//!
//! Only calls the predicate evaluates on every row are shared: none inside a CASE, on the right
//! of AND/OR (evaluated only for the rows the left side leaves open), or in an argument of a
//! short-circuiting or volatile function. So no row is evaluated that the filter would not have
//! evaluated anyway.

use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use datafusion_common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion_expr::Operator;
use datafusion_physical_expr::expressions::{BinaryExpr, CaseExpr, Column};
use datafusion_physical_expr::ScalarFunctionExpr;
use sluice_common::{Error, Result};

use crate::plan::{PhysExpr, StreamNode};

/// A fused filter and projection.
pub struct Fusion {
    /// The calls both make, evaluated once per batch.
    pub shared: Vec<PhysExpr>,
    /// The input's columns, then one column per shared call (`__shared_<i>`).
    pub extended: SchemaRef,
    /// The predicate and the projection over `extended`.
    pub predicate: PhysExpr,
    pub exprs: Vec<PhysExpr>,
}

/// The fusion of `node` when it is a projection over a filter that share a call; `None`
/// otherwise.
pub fn fuse(node: &StreamNode) -> Result<Option<Fusion>> {
    let StreamNode::Project { input, exprs, .. } = node else {
        return Ok(None);
    };
    let StreamNode::Filter {
        input: below,
        predicate,
    } = input.as_ref()
    else {
        return Ok(None);
    };
    fuse_exprs(&below.schema(), predicate, exprs)
}

/// The fusion of a filter by `predicate` over rows of `input`, and the projection `exprs`
/// above it; `None` when they share no call.
pub fn fuse_exprs(
    input: &SchemaRef,
    predicate: &PhysExpr,
    exprs: &[PhysExpr],
) -> Result<Option<Fusion>> {
    let df = |e: datafusion_common::DataFusionError| Error::plan(e.to_string());
    let appears_in_exprs = |e: &PhysExpr| {
        exprs
            .iter()
            .any(|x| x.exists(|n| Ok(n.as_ref() == e.as_ref())).unwrap_or(false))
    };
    let mut shared: Vec<PhysExpr> = vec![];
    collect(predicate, &mut shared, &appears_in_exprs);
    if shared.is_empty() {
        return Ok(None);
    }
    let mut fields = input.fields().to_vec();
    for (i, e) in shared.iter().enumerate() {
        let field = e.return_field(input).map_err(df)?;
        fields.push(Arc::new(
            field.as_ref().clone().with_name(format!("__shared_{i}")),
        ));
    }
    let extended = Arc::new(Schema::new(fields));
    let n = input.fields().len();
    let rewrite = |e: &PhysExpr| -> Result<PhysExpr> {
        e.clone()
            .transform_down(|node| {
                Ok(
                    match shared.iter().position(|s| s.as_ref() == node.as_ref()) {
                        Some(i) => Transformed::new(
                            Arc::new(Column::new(&format!("__shared_{i}"), n + i)) as PhysExpr,
                            true,
                            TreeNodeRecursion::Jump,
                        ),
                        None => Transformed::no(node),
                    },
                )
            })
            .map(|t| t.data)
            .map_err(df)
    };
    Ok(Some(Fusion {
        predicate: rewrite(predicate)?,
        exprs: exprs.iter().map(rewrite).collect::<Result<_>>()?,
        shared,
        extended,
    }))
}

/// The calls of `e` evaluated on every row that `wanted` accepts, outermost first.
fn collect(e: &PhysExpr, found: &mut Vec<PhysExpr>, wanted: &dyn Fn(&PhysExpr) -> bool) {
    if e.downcast_ref::<CaseExpr>().is_some() {
        return;
    }
    if let Some(b) = e.downcast_ref::<BinaryExpr>() {
        if matches!(b.op(), Operator::And | Operator::Or) {
            return collect(b.left(), found, wanted);
        }
    }
    if let Some(f) = e.downcast_ref::<ScalarFunctionExpr>() {
        if f.fun().signature().volatility == datafusion_expr::Volatility::Volatile
            || f.fun().short_circuits()
        {
            return;
        }
        if wanted(e) {
            if !found.iter().any(|s| s.as_ref() == e.as_ref()) {
                found.push(e.clone());
            }
            return;
        }
    }
    for child in e.children() {
        collect(child, found, wanted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(sql: &str) -> StreamNode {
        let ddl = "CREATE TABLE bid (channel STRING, url STRING) WITH ('connector' = 'datagen');
            CREATE TABLE out1 (channel STRING, id STRING) WITH ('connector' = 'blackhole');";
        let job = crate::plan_script(&format!("{ddl}\n{sql}")).unwrap();
        job.pipelines[0].query.clone()
    }

    /// Nexmark q21's shape: the regex of the WHERE is shared with the SELECT's CASE;
    /// `lower(channel)` is on the right of the OR, so it is not.
    #[test]
    fn a_call_the_filter_makes_on_every_row_is_shared() {
        let node = plan(
            "INSERT INTO out1 SELECT channel,
               CASE WHEN lower(channel) = 'apple' THEN '0'
                    ELSE REGEXP_EXTRACT(url, '(&|^)channel_id=([^&]*)', 2) END
             FROM bid
             WHERE REGEXP_EXTRACT(url, '(&|^)channel_id=([^&]*)', 2) IS NOT NULL
                OR lower(channel) = 'apple';",
        );
        let fusion = fuse(&node).unwrap().expect("a shared call");
        assert_eq!(fusion.shared.len(), 1);
        assert!(fusion.shared[0].to_string().contains("regexp_extract"));
        assert_eq!(fusion.extended.fields().len(), 3);
        assert!(fusion.predicate.to_string().contains("__shared_0@2"));
        assert!(fusion.exprs[1].to_string().contains("__shared_0@2"));
    }

    /// Only under a CASE, or on the right of an AND, in the WHERE: not evaluated for every row
    /// there, so not shared. And with nothing in common there is nothing to fuse.
    #[test]
    fn calls_the_filter_may_skip_are_not_shared() {
        for condition in [
            "CASE WHEN channel IS NULL THEN 0 ELSE length(REGEXP_EXTRACT(url, 'id=(.*)', 1)) END > 0",
            "channel IS NOT NULL AND REGEXP_EXTRACT(url, 'id=(.*)', 1) IS NOT NULL",
            "lower(channel) = 'apple'",
        ] {
            let node = plan(&format!(
                "INSERT INTO out1 SELECT channel, REGEXP_EXTRACT(url, 'id=(.*)', 1) FROM bid
                 WHERE {condition};"
            ));
            assert!(matches!(node, StreamNode::Project { .. }), "{condition}");
            assert!(fuse(&node).unwrap().is_none(), "{condition}");
        }
    }
}
