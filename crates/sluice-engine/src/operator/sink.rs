//! Sinks: a table's connector (in the checkpoints' two-phase commit) and a SELECT's output.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_common::Error;
use sluice_connectors::{open_sink, ConnectorSpec};
use sluice_sql::TableDef;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::checkpoint::Alignment;
use crate::runtime::{Event, EventBuilder, EventStream};

use crate::build::{sink_spec, BuildContext};
use crate::job::SelectOutput;

pub(crate) fn table_sink<'scope>(
    stream: EventStream<'scope>,
    table: &TableDef,
    instance: usize,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    let (control, counter) = (ctx.control.clone(), ctx.metrics.write_counter(&table.name));
    let checkpoint = ctx.checkpoint.clone();
    let seal_at_end = checkpoint.is_some();
    let (index, peers) = (ctx.index, ctx.peers);
    let spec = ConnectorSpec {
        sink_instance: instance,
        ..sink_spec(table)
    };
    let writer = open_sink(&spec, index, peers).and_then(|mut w| {
        if let Some(c) = &checkpoint {
            // Two-phase commit: settle what earlier runs left, against the restored checkpoint.
            let committed = c.restore.as_ref().map(|m| m.epoch);
            crate::checkpoint::transactions::begin(w.as_mut(), &c.store, committed, index, peers)?;
        }
        Ok(w)
    });
    let mut writer = match writer {
        Ok(w) => Some(w),
        Err(e) => {
            control.fail(e);
            None
        }
    };
    let schema = table.sink_schema();
    let table_name = table.name.clone();
    let scope = stream.scope();
    let write = move |writer: &mut Option<Box<dyn sluice_connectors::SinkWriter>>,
                      data: &mut Event| {
        if let (Event::Data(d), Some(w)) = (data, writer.as_mut()) {
            counter.fetch_add(d.batch.num_rows() as u64, Ordering::Relaxed);
            // Columns keep the table's declared names and nullability.
            let result = d
                .batch
                .with_columns(schema.clone(), d.batch.data.columns().to_vec())
                .map_err(Error::from)
                .and_then(|b| w.write(&b));
            if let Err(e) = result {
                control.fail(e);
            }
        }
    };
    let (metrics, control) = (ctx.metrics.clone(), ctx.control.clone());
    stream.unary_frontier::<EventBuilder, _, _, _>(
        Pipeline,
        &format!("Sink({})", table.name),
        move |initial, info| {
            let activator = scope.activator_for(info.address.clone());
            let operator: std::rc::Rc<str> = format!("Sink({table_name})").into();
            let held = metrics.in_flight_meter(&format!("{operator} on worker {index}"));
            let mut align = checkpoint
                .as_ref()
                .map(|c| Alignment::new(c, initial).metered(held));
            let mut transactions = crate::checkpoint::SinkTransactions::default();
            move |(input, frontier), _output| {
                let _running = crate::runtime::panics::in_operator(&operator);
                input.for_each(|cap, data| {
                    if align
                        .as_mut()
                        .is_some_and(|al| al.hold(&cap, || std::mem::take(data)))
                    {
                        return;
                    }
                    write(&mut writer, data);
                });
                if let Some(al) = align.as_mut() {
                    while let Some(epoch) = al.due(&[frontier]) {
                        if let Some(w) = writer.as_mut() {
                            if let Err(e) = transactions.seal(w.as_mut(), epoch) {
                                control.fail(e);
                            }
                        }
                        for (_, mut event) in al.advance() {
                            write(&mut writer, &mut event);
                        }
                    }
                    for (_, mut event) in al.finish(&[frontier]) {
                        write(&mut writer, &mut event);
                    }
                }
                // Publish what checkpoints worker 0 has committed since.
                if let (Some(ck), Some(w)) = (checkpoint.as_ref(), writer.as_mut()) {
                    match transactions.publish(w.as_mut(), &ck.store) {
                        Ok(true) => activator.activate_after(Duration::from_millis(20)),
                        Ok(false) => {}
                        Err(e) => control.fail(e),
                    }
                }
                if frontier.is_empty() {
                    if let Some(mut w) = writer.take() {
                        let done = crate::checkpoint::SinkTransactions::close(
                            w.as_mut(),
                            &control,
                            seal_at_end,
                        );
                        if let Err(e) = done {
                            control.fail(e);
                        }
                    }
                }
            }
        },
    )
}

pub(crate) fn select_sink<'scope>(
    stream: EventStream<'scope>,
    query: usize,
    out: Option<Arc<dyn SelectOutput>>,
    ctx: &BuildContext,
) -> EventStream<'scope> {
    // Everything goes to worker 0 so the printed changelog is one ordered stream.
    let stream = ctx.exchange(stream, vec![], "SelectSink");
    let counter = ctx.metrics.write_counter(&format!("select #{}", query + 1));
    let out = Mutex::new(out);
    stream.unary::<EventBuilder, _, _, _>(Pipeline, "SelectOutput", move |_cap, _info| {
        move |input, _output| {
            input.for_each(|_cap, data| {
                if let Event::Data(d) = data {
                    counter.fetch_add(d.batch.num_rows() as u64, Ordering::Relaxed);
                    if let Some(o) = out.lock().expect("select output").as_ref() {
                        o.emit(query, &d.batch);
                    }
                }
            });
        }
    })
}
