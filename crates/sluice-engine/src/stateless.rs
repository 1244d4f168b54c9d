//! Stateless operators: projection, filter and window assignment, all vectorized.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, TimestampMillisecondArray, UInt32Array,
};
use arrow::datatypes::{SchemaRef, TimestampMillisecondType};
use sluice_common::{ChangeBatch, Error, Result};
use sluice_sql::{PhysExpr, WindowKind};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::dataflow::{Event, EventBuilder, EventStream};
use crate::metrics::JobMetrics;

/// Applies `f` to each batch; watermarks pass through, re-labelled as this worker's.
pub fn map_batches<'scope, F>(
    stream: EventStream<'scope>,
    name: &str,
    metrics: Arc<JobMetrics>,
    mut f: F,
) -> EventStream<'scope>
where
    F: FnMut(&ChangeBatch) -> Result<Option<ChangeBatch>> + 'static,
{
    stream.unary::<EventBuilder, _, _, _>(Pipeline, name, move |_cap, info| {
        let _ = info;
        move |input, output| {
            input.for_each(|cap, data| match data {
                Event::Data(d) => {
                    if metrics.failed() {
                        return;
                    }
                    match f(&d.batch) {
                        Ok(Some(out)) if out.num_rows() > 0 => {
                            output.session(&cap).give_container(&mut Event::data(out))
                        }
                        Ok(_) => {}
                        Err(e) => metrics.fail(e),
                    }
                }
                Event::Watermark { .. } => output.session(&cap).give_container(data),
                Event::Empty => {}
            });
        }
    })
}

/// Evaluates an expression over a batch into an array.
pub fn evaluate(expr: &PhysExpr, batch: &ChangeBatch) -> Result<ArrayRef> {
    expr.evaluate(&batch.data)
        .and_then(|v| v.into_array(batch.num_rows()))
        .map_err(|e| Error::Runtime(format!("evaluating {expr}: {}", e.strip_backtrace())))
}

/// Projection.
pub fn project(batch: &ChangeBatch, exprs: &[PhysExpr], schema: &SchemaRef) -> Result<ChangeBatch> {
    let columns = exprs
        .iter()
        .map(|e| evaluate(e, batch))
        .collect::<Result<Vec<_>>>()?;
    Ok(batch.with_columns(schema.clone(), columns)?)
}

/// Filter: rows where the predicate is true (NULL counts as false).
pub fn filter(batch: &ChangeBatch, predicate: &PhysExpr) -> Result<ChangeBatch> {
    let mask = evaluate(predicate, batch)?;
    let mask = mask
        .as_any()
        .downcast_ref::<BooleanArray>()
        .ok_or_else(|| Error::Runtime(format!("WHERE condition {predicate} is not a BOOLEAN")))?;
    let cleaned;
    let mask = if mask.null_count() > 0 {
        cleaned = arrow::compute::prep_null_mask_filter(mask);
        &cleaned
    } else {
        mask
    };
    if mask.true_count() == batch.num_rows() {
        return Ok(batch.clone());
    }
    Ok(batch.filter(mask)?)
}

/// Appends `window_start`, `window_end`, `window_time` (end - 1 ms); HOP and CUMULATE emit one
/// copy of a row per window it falls in. Rows with a NULL time are dropped, as in Flink.
pub fn assign_windows(
    batch: &ChangeBatch,
    time: &PhysExpr,
    kind: WindowKind,
    schema: &SchemaRef,
) -> Result<ChangeBatch> {
    let t = sluice_common::time::to_millis(&evaluate(time, batch)?)?;
    let t = t.as_primitive::<TimestampMillisecondType>();
    let mut rows = Vec::with_capacity(t.len());
    let mut starts = Vec::with_capacity(t.len());
    let mut ends = Vec::with_capacity(t.len());
    for i in 0..t.len() {
        if t.is_null(i) {
            continue;
        }
        let ts = t.value(i);
        match kind {
            WindowKind::Tumble { size, offset } => {
                let start = (ts - offset).div_euclid(size) * size + offset;
                rows.push(i as u32);
                starts.push(start);
                ends.push(start + size);
            }
            WindowKind::Hop { size, slide } => {
                let last_start = ts.div_euclid(slide) * slide;
                let mut start = last_start - size + slide;
                while start <= last_start {
                    rows.push(i as u32);
                    starts.push(start);
                    ends.push(start + size);
                    start += slide;
                }
            }
            WindowKind::Session { gap } => {
                // A session of its own; the aggregation above merges overlapping ones.
                rows.push(i as u32);
                starts.push(ts);
                ends.push(ts + gap);
            }
            WindowKind::Cumulate { step, size } => {
                let start = ts.div_euclid(size) * size;
                let mut end = ts.div_euclid(step) * step + step;
                while end <= start + size {
                    rows.push(i as u32);
                    starts.push(start);
                    ends.push(end);
                    end += step;
                }
            }
        }
    }
    let times: Vec<i64> = ends.iter().map(|e| e - 1).collect();
    let base = if rows.len() == t.len() && rows.iter().enumerate().all(|(i, r)| *r as usize == i) {
        batch.clone()
    } else {
        batch.take(&UInt32Array::from(rows))?
    };
    let mut columns = base.data.columns().to_vec();
    for v in [starts, ends, times] {
        columns.push(Arc::new(TimestampMillisecondArray::from(v)) as ArrayRef);
    }
    Ok(base.with_columns(schema.clone(), columns)?)
}
