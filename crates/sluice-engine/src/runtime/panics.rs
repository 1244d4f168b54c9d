//! A worker's panic as the job's failure: its message, place and operator end the job at once,
//! instead of the other workers waiting for the dead one forever.

use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;

thread_local! {
    /// The operator this worker thread is running now.
    static OPERATOR: RefCell<Option<Rc<str>>> = const { RefCell::new(None) };
    /// What the last panic on this thread said, with its place and operator.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// This thread's worker index.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Set while [`quietly`] runs: a panic is caught there, so it is not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic in it into an error with the panic's message (not printed). Only
/// for libraries that panic on malformed input instead of returning an error.
pub(crate) fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let was = QUIET.with(|q| q.replace(true));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    outcome.map_err(|payload| {
        LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| payload_text(payload.as_ref()))
    })
}

/// Records that this thread runs worker `index`.
pub(crate) fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// Marks this thread as running operator `name` until dropped.
pub(crate) struct InOperator(Option<Rc<str>>);

pub(crate) fn in_operator(name: &Rc<str>) -> InOperator {
    InOperator(OPERATOR.with(|o| o.replace(Some(name.clone()))))
}

impl Drop for InOperator {
    fn drop(&mut self) {
        let previous = self.0.take();
        OPERATOR.with(|o| *o.borrow_mut() = previous);
    }
}

/// Records each panic's message, place and operator for [`take`]; the previous hook still
/// prints it as usual.
pub(crate) fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let mut text = payload_text(info.payload());
            if let Some(l) = info.location() {
                text.push_str(&format!(" (at {}:{})", l.file(), l.line()));
            }
            let operator = OPERATOR
                .try_with(|o| o.try_borrow().ok().and_then(|o| o.clone()))
                .ok()
                .flatten();
            if let Some(op) = operator {
                text.push_str(&format!(" in operator {op}"));
            }
            let _ = LAST_PANIC.try_with(|p| {
                if let Ok(mut p) = p.try_borrow_mut() {
                    *p = Some(text);
                }
            });
            if !QUIET.try_with(|q| q.get()).unwrap_or(false) {
                previous(info);
            }
        }));
    });
}

/// The message of the panic this thread just caught.
pub(crate) fn take(payload: &(dyn Any + Send)) -> String {
    LAST_PANIC
        .with(|p| p.borrow_mut().take())
        .unwrap_or_else(|| payload_text(payload))
}

/// Whether a panic is timely's reaction to a peer process that went away.
pub(crate) fn lost_peer(text: &str) -> bool {
    text.contains("MergeQueue poisoned") || text.contains("timely communication error")
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Test-only faults (the `fault-injection` feature): `SLUICE_FAULT=panic:W:N` makes worker W
/// panic, and `SLUICE_FAULT=hang:W:N` makes it stop responding, once a source of it has read
/// N rows; `SLUICE_FAULT=build:W:0` makes it panic while it builds the dataflow (see
/// [`inject_at_build`]). Release builds have no such code.
#[cfg(feature = "fault-injection")]
pub(crate) fn inject(rows_seen: u64) {
    let worker = WORKER.with(|w| w.get());
    let Ok(spec) = std::env::var("SLUICE_FAULT") else {
        return;
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let [kind, w, n] = parts[..] else { return };
    if w.parse() != Ok(worker) || n.parse::<u64>().map_or(true, |n| rows_seen < n) {
        return;
    }
    match kind {
        "panic" => panic!("injected fault: worker {worker} panics after {rows_seen} rows"),
        "hang" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        _ => {}
    }
}

/// `SLUICE_FAULT=build:W:0`: worker W panics while building its dataflow (at its first
/// source), as a connector that panics when it opens would.
#[cfg(feature = "fault-injection")]
pub(crate) fn inject_at_build() {
    let worker = WORKER.with(|w| w.get());
    let Ok(spec) = std::env::var("SLUICE_FAULT") else {
        return;
    };
    if spec == format!("build:{worker}:0") {
        panic!("injected fault: worker {worker} panics while building its dataflow");
    }
}
