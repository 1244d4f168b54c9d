//! Reading and decoding on a fetcher thread, as Flink's split fetchers do: the worker takes
//! decoded batches from a short queue while the next ones are read, so that a worker's
//! operators and its source's parsing run on two cores when the machine has one to spare.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::Duration;

use sluice_common::{Error, Result};

use crate::{Poll, SourceOffsets, SourceReader};

/// Batches decoded ahead of the worker, at most.
const QUEUE: usize = 4;

/// How long a poll waits for the fetcher before it reports nothing for now.
const WAIT: Duration = Duration::from_millis(1);

/// What the fetcher hands over: a poll's result and where the reader stood after it.
struct Fetched {
    poll: Result<Poll>,
    offsets: SourceOffsets,
    open_splits: Vec<usize>,
    skipped: u64,
}

enum State {
    /// Not started: seeks go to the reader; it moves to its thread at the first poll.
    Idle(Box<dyn SourceReader>),
    Running(Receiver<Fetched>),
    /// The reader finished or failed; its thread is gone.
    Done,
}

/// A [`SourceReader`] whose reader runs on a thread of its own. Offsets, open splits and the
/// skipped count are those after the last poll handed to the worker, never ahead of it, so
/// checkpoints record exactly what the job has seen.
pub struct Prefetched {
    state: State,
    offsets: SourceOffsets,
    open_splits: Vec<usize>,
    skipped: u64,
    silent: Vec<usize>,
    name: String,
}

impl Prefetched {
    /// Wraps `reader` (of the source table `name`).
    pub fn new(reader: Box<dyn SourceReader>, name: &str) -> Self {
        Prefetched {
            offsets: reader.offsets(),
            open_splits: reader.open_splits(),
            skipped: reader.skipped(),
            silent: reader.silent_workers(),
            state: State::Idle(reader),
            name: name.to_string(),
        }
    }

    fn start(
        mut reader: Box<dyn SourceReader>,
        max_rows: usize,
        name: &str,
    ) -> Result<Receiver<Fetched>> {
        let (tx, rx): (SyncSender<Fetched>, Receiver<Fetched>) =
            std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name(format!("fetch:{name}"))
            .spawn(move || loop {
                let poll = reader.poll(max_rows);
                let last = matches!(poll, Ok(Poll::Finished) | Err(_));
                let idle = matches!(poll, Ok(Poll::Idle));
                let fetched = Fetched {
                    poll,
                    offsets: reader.offsets(),
                    open_splits: reader.open_splits(),
                    skipped: reader.skipped(),
                };
                // The worker went away (the job stopped): so does this thread.
                if tx.send(fetched).is_err() || last {
                    return;
                }
                if idle {
                    // Unbounded sources wait for new data; do not spin.
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
            .map_err(|e| {
                Error::Runtime(format!(
                    "source {name}: could not start its fetcher thread: {e}"
                ))
            })?;
        Ok(rx)
    }
}

impl SourceReader for Prefetched {
    fn open_splits(&self) -> Vec<usize> {
        self.open_splits.clone()
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        if let State::Idle(_) = self.state {
            let State::Idle(reader) = std::mem::replace(&mut self.state, State::Done) else {
                unreachable!("matched above")
            };
            self.state = State::Running(Self::start(reader, max_rows, &self.name)?);
        }
        let State::Running(rx) = &self.state else {
            return Ok(Poll::Finished);
        };
        let fetched = match rx.try_recv() {
            Ok(f) => f,
            Err(TryRecvError::Empty) => match rx.recv_timeout(WAIT) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) => return Ok(Poll::Idle),
                Err(RecvTimeoutError::Disconnected) => return Err(self.lost()),
            },
            Err(TryRecvError::Disconnected) => return Err(self.lost()),
        };
        self.offsets = fetched.offsets;
        self.open_splits = fetched.open_splits;
        self.skipped = fetched.skipped;
        if matches!(fetched.poll, Ok(Poll::Finished) | Err(_)) {
            self.state = State::Done;
        }
        fetched.poll
    }

    fn skipped(&self) -> u64 {
        self.skipped
    }

    fn silent_workers(&self) -> Vec<usize> {
        self.silent.clone()
    }

    fn offsets(&self) -> SourceOffsets {
        self.offsets.clone()
    }

    fn seek(&mut self, offsets: &SourceOffsets) -> Result<()> {
        let State::Idle(reader) = &mut self.state else {
            return Err(Error::Runtime(format!(
                "source {}: a seek after reading started",
                self.name
            )));
        };
        reader.seek(offsets)?;
        self.offsets = reader.offsets();
        self.open_splits = reader.open_splits();
        Ok(())
    }
}

impl Prefetched {
    /// The fetcher thread ended without a last word: it panicked.
    fn lost(&mut self) -> Error {
        self.state = State::Done;
        Error::Runtime(format!(
            "source {}: its fetcher thread stopped unexpectedly",
            self.name
        ))
    }
}
