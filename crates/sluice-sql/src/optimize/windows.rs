//! Decisions for window aggregations, made on the plan so that `EXPLAIN` shows them and the
//! builder follows them:
//! - **pre-partitioning**: rows are partitioned by the group keys before their windows are
//!   assigned, so that the copies a HOP or CUMULATE window makes of each row stay on one worker;
//! - **HOP slicing**: a HOP window whose size is a multiple of its slide is aggregated in panes
//!   of the slide, and each window merges its panes.

use std::sync::Arc;

use crate::plan::StreamNode;

/// For a window aggregation over assigned windows (a window TVF), when its group keys other
/// than the window bounds are columns that pass unchanged through the projections and filters
/// down to the window assignment: the nodes from the aggregation's input down to the window
/// assignment, those keys as columns of the assignment's input, and their positions among the
/// group keys. Rows can then be partitioned before the windows are assigned, as Flink does: a
/// HOP window copies each row into size/slide windows, and those copies need not cross workers.
#[allow(clippy::type_complexity)]
/// Below a window aggregation, HOP or CUMULATE windows assigned as copies of each row: the
/// windows, and the column of the rows' time in the aggregation's input when it passes through
/// the projections unchanged (HOP needs it to tell a row's last window). `None` for other
/// windows.
pub fn window_copies(node: &StreamNode) -> Option<(Option<usize>, crate::WindowKind)> {
    use datafusion_physical_expr::expressions::Column;
    let column = |e: &crate::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    match node {
        StreamNode::WindowAssign { time, kind, .. } => match kind {
            crate::WindowKind::Hop { .. } | crate::WindowKind::Cumulate { .. } => {
                Some((column(time), *kind))
            }
            _ => None,
        },
        StreamNode::Filter { input, .. } => window_copies(input),
        StreamNode::Project { input, exprs, .. } => {
            let (time, kind) = window_copies(input)?;
            let at = time.and_then(|t| exprs.iter().position(|e| column(e) == Some(t)));
            Some((at, kind))
        }
        _ => None,
    }
}

pub fn keys_below_window<'a>(
    input: &'a StreamNode,
    group: &[crate::PhysExpr],
    window: &crate::AggWindow,
) -> Option<(Vec<&'a StreamNode>, Vec<crate::PhysExpr>, Vec<usize>)> {
    use datafusion_physical_expr::expressions::Column;
    let crate::AggWindow::Assigned {
        start_key, end_key, ..
    } = window
    else {
        return None;
    };
    let positions: Vec<usize> = (0..group.len())
        .filter(|i| i != start_key && i != end_key)
        .collect();
    let column = |e: &crate::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    let mut columns: Vec<usize> = positions
        .iter()
        .map(|&i| column(&group[i]))
        .collect::<Option<_>>()?;
    if columns.is_empty() {
        return None;
    }
    let mut chain = vec![];
    let mut node = input;
    loop {
        chain.push(node);
        match node {
            StreamNode::Project { input, exprs, .. } => {
                columns = columns
                    .iter()
                    .map(|&c| exprs.get(c).and_then(column))
                    .collect::<Option<_>>()?;
                node = input;
            }
            StreamNode::Filter { input, .. } => node = input,
            StreamNode::WindowAssign { input: below, .. } => {
                // The assignment appends the window columns after its input's.
                let schema = below.schema();
                if columns.iter().any(|c| *c >= schema.fields().len()) {
                    return None;
                }
                let keys = columns
                    .iter()
                    .map(|&c| Arc::new(Column::new(schema.field(c).name(), c)) as crate::PhysExpr)
                    .collect();
                return Some((chain, keys, positions));
            }
            _ => return None,
        }
    }
}

/// The size and slide of a HOP window aggregation that can be aggregated in panes (see
/// `aggregate::Slicing`): the window assignment at the bottom of `chain` (from
/// [`keys_below_window`]) is a HOP whose size is a multiple of its slide; its bounds reach the
/// aggregation unchanged as the window keys and nothing else reads them (a pane's bounds are
/// not its windows'); results are final when the window closes (no early firing, lateness or
/// late-data sink); and every aggregate merges (no DISTINCT but COUNT's).
pub fn hop_slices(
    chain: &[&StreamNode],
    group: &[crate::PhysExpr],
    window: &crate::AggWindow,
    aggs: &[crate::AggCall],
    emit: &crate::EmitPolicy,
    late_sink: bool,
) -> Option<(i64, i64)> {
    use datafusion_physical_expr::expressions::Column;
    let crate::AggWindow::Assigned {
        start_key, end_key, ..
    } = window
    else {
        return None;
    };
    if late_sink || emit.is_updating() || emit.processing_time {
        return None;
    }
    if aggs
        .iter()
        .any(|a| a.distinct && a.func != crate::AggFunc::Count)
    {
        return None;
    }
    let (
        StreamNode::WindowAssign {
            input: below,
            kind: crate::WindowKind::Hop { size, slide },
            ..
        },
        above,
    ) = chain.split_last()?
    else {
        return None;
    };
    if *slide <= 0 || *size <= *slide || size % slide != 0 {
        return None;
    }
    // Which column holds which window column (0 start, 1 end, 2 time), going up the chain.
    let n = below.schema().fields().len();
    let mut bound: Vec<Option<usize>> = (0..n + 3).map(|c| c.checked_sub(n)).collect();
    let reads_bounds = |e: &crate::PhysExpr, bound: &[Option<usize>]| {
        datafusion_physical_expr::utils::collect_columns(e)
            .iter()
            .any(|c| bound.get(c.index()).copied().flatten().is_some())
    };
    let column = |e: &crate::PhysExpr| e.downcast_ref::<Column>().map(|c| c.index());
    for node in above.iter().rev() {
        match node {
            StreamNode::Filter { predicate, .. } if reads_bounds(predicate, &bound) => return None,
            StreamNode::Filter { .. } => {}
            StreamNode::Project { exprs, .. } => {
                let mut next = Vec::with_capacity(exprs.len());
                for e in exprs {
                    match column(e) {
                        Some(c) => next.push(bound.get(c).copied().flatten()),
                        None if reads_bounds(e, &bound) => return None,
                        None => next.push(None),
                    }
                }
                bound = next;
            }
            _ => return None,
        }
    }
    let key_is = |i: usize, which: usize| {
        column(&group[i]).is_some_and(|c| bound.get(c).copied().flatten() == Some(which))
    };
    let others_read_bounds = group
        .iter()
        .enumerate()
        .filter(|(i, _)| i != start_key && i != end_key)
        .map(|(_, g)| g)
        .chain(
            aggs.iter()
                .flat_map(|a| a.arg.iter().chain(a.filter.iter())),
        )
        .any(|e| reads_bounds(e, &bound));
    (key_is(*start_key, 0) && key_is(*end_key, 1) && !others_read_bounds).then_some((*size, *slide))
}
