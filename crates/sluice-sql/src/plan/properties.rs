//! Properties of a streaming plan that planning and building ask about: where a row's window
//! bounds and event time are, whether a column is a processing-time attribute, and whether a
//! regular join is below a node.

use super::*;

/// True when a regular join (whose output rows come at any time, not in event-time order) is
/// below this node: its output has no time attribute, so it cannot be windowed.
pub fn has_regular_join(node: &StreamNode) -> bool {
    match node {
        StreamNode::Join { bound: None, .. } => true,
        StreamNode::Join { left, right, .. } => has_regular_join(left) || has_regular_join(right),
        StreamNode::Project { input, .. }
        | StreamNode::Filter { input, .. }
        | StreamNode::WindowAssign { input, .. }
        | StreamNode::Rank { input, .. }
        | StreamNode::Over { input, .. }
        | StreamNode::LookupJoin { input, .. } => has_regular_join(input),
        StreamNode::TemporalJoin { left, right, .. } => {
            has_regular_join(left) || has_regular_join(right)
        }
        StreamNode::Union { inputs, .. } => inputs.iter().any(has_regular_join),
        StreamNode::Scan { .. } | StreamNode::Values { .. } | StreamNode::Aggregate { .. } => false,
    }
}

/// The columns holding a row's final window bounds `(window_start, window_end)`, if it has them:
/// rows of a TUMBLE/HOP/CUMULATE window TVF, or results of a window aggregation.
pub fn window_columns(node: &StreamNode) -> Option<(usize, usize)> {
    match node {
        StreamNode::WindowAssign { input, kind, .. } => {
            if matches!(kind, WindowKind::Session { .. }) {
                return None;
            }
            let n = input.schema().fields().len();
            Some((n, n + 1))
        }
        StreamNode::Aggregate { window, .. } => match window {
            AggWindow::Assigned {
                start_key,
                end_key,
                as_struct: false,
            } => Some((*start_key, *end_key)),
            AggWindow::Session {
                output: SessionOutput::Columns { start, end },
                ..
            } => Some((*start, *end)),
            _ => None,
        },
        StreamNode::Filter { input, .. } => window_columns(input),
        StreamNode::Project { input, exprs, .. } => {
            let (s, e) = window_columns(input)?;
            let find = |index: usize| {
                exprs.iter().position(|x| {
                    x.downcast_ref::<datafusion_physical_expr::expressions::Column>()
                        .is_some_and(|c| c.index() == index)
                })
            };
            Some((find(s)?, find(e)?))
        }
        _ => None,
    }
}

/// The input column holding the rows' event time (the scanned table's watermarked column), if it
/// is still there.
pub fn rowtime_column(node: &StreamNode) -> Option<usize> {
    let find = |exprs: &[PhysExpr], index: usize| {
        exprs.iter().position(|x| {
            x.downcast_ref::<datafusion_physical_expr::expressions::Column>()
                .is_some_and(|c| c.index() == index)
        })
    };
    match node {
        StreamNode::Scan {
            table, projection, ..
        } => {
            let (time, _) = table.watermark.as_ref()?;
            match projection {
                None => Some(*time),
                Some(p) => p.iter().position(|i| i == time),
            }
        }
        StreamNode::Project { input, exprs, .. } => find(exprs, rowtime_column(input)?),
        StreamNode::Filter { input, .. }
        | StreamNode::WindowAssign { input, .. }
        | StreamNode::LookupJoin { input, .. }
        | StreamNode::TemporalJoin { left: input, .. } => rowtime_column(input),
        _ => None,
    }
}

/// Whether column `index` of `node` is a processing-time attribute: computed by `PROCTIME()`
/// (in a table's DDL or a projection) and passed on unchanged.
pub fn is_proctime(node: &StreamNode, index: usize) -> bool {
    let proctime = |e: &PhysExpr| {
        e.downcast_ref::<datafusion_physical_expr::ScalarFunctionExpr>()
            .is_some_and(|f| f.name() == "proctime")
    };
    let column = |e: &PhysExpr| {
        e.downcast_ref::<datafusion_physical_expr::expressions::Column>()
            .map(|c| c.index())
    };
    match node {
        StreamNode::Project { input, exprs, .. } => exprs
            .get(index)
            .is_some_and(|e| proctime(e) || column(e).is_some_and(|c| is_proctime(input, c))),
        StreamNode::Filter { input, .. } => is_proctime(input, index),
        StreamNode::WindowAssign { input, .. } | StreamNode::LookupJoin { input, .. } => {
            index < input.schema().fields().len() && is_proctime(input, index)
        }
        StreamNode::Scan {
            table, projection, ..
        } => {
            let at = projection
                .as_ref()
                .map_or(Some(index), |p| p.get(index).copied());
            let physical = table.physical_schema.fields().len();
            at.and_then(|i| i.checked_sub(physical))
                .and_then(|c| table.computed.get(c))
                .is_some_and(proctime)
        }
        _ => false,
    }
}

/// Whether the window assignment below an aggregation (through projections and filters) is over
/// a processing-time attribute.
pub fn windows_on_proctime(node: &StreamNode) -> bool {
    match node {
        StreamNode::WindowAssign { input, time, .. } => time
            .downcast_ref::<datafusion_physical_expr::expressions::Column>()
            .is_some_and(|c| is_proctime(input, c.index())),
        StreamNode::Project { input, .. } | StreamNode::Filter { input, .. } => {
            windows_on_proctime(input)
        }
        _ => false,
    }
}
