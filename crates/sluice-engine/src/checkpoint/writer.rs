//! The checkpoint writer thread, and the snapshot file format (Arrow IPC).

use std::sync::Arc;

use sluice_common::Result;
use sluice_state::checkpoint::CheckpointStore;

use crate::runtime::Epoch;

/// Writes checkpoint files on a background thread, so operators go on while their snapshots
/// are encoded and reach storage. A file appears (atomically) only once whole, and the
/// coordinator commits a checkpoint only when all of its files are there.
#[derive(Clone)]
pub struct CheckpointWriter {
    sender: std::sync::mpsc::Sender<(Epoch, String, Payload)>,
    /// Files queued or being written.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// A file to write: bytes, or a snapshot batch still to be encoded as Arrow IPC, or still to
/// be built (from a copy of an operator's state) and then encoded.
enum Payload {
    Bytes(Vec<u8>),
    Batch(arrow::record_batch::RecordBatch),
    Deferred(DeferredBatch),
}

/// Builds a snapshot batch on the writer thread.
pub type DeferredBatch = Box<dyn FnOnce() -> Result<arrow::record_batch::RecordBatch> + Send>;

impl CheckpointWriter {
    /// Starts the writer thread; it ends when every clone of the writer is dropped.
    pub fn start(
        store: Arc<CheckpointStore>,
        control: Arc<crate::runtime::control::JobControl>,
        compression: bool,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (sender, receiver) = std::sync::mpsc::channel::<(Epoch, String, Payload)>();
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let landed = in_flight.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                // Encoded straight into the file (no buffer the size of the snapshot).
                let put = |epoch: Epoch, name: &str, batch: &arrow::record_batch::RecordBatch| {
                    store.put_with(epoch, name, |out| write_ipc(out, batch, compression))
                };
                for (epoch, name, payload) in receiver {
                    let written = match payload {
                        Payload::Bytes(b) => store.put(epoch, &name, b),
                        Payload::Batch(batch) => put(epoch, &name, &batch),
                        Payload::Deferred(build) => build().and_then(|b| put(epoch, &name, &b)),
                    };
                    if let Err(e) = written {
                        control.checkpoint_failed(epoch, e);
                    }
                    landed.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
            .expect("spawn the checkpoint writer");
        (CheckpointWriter { sender, in_flight }, handle)
    }

    /// Queues a file of checkpoint `epoch`.
    pub fn write(&self, epoch: Epoch, name: String, bytes: Vec<u8>) {
        self.send(epoch, name, Payload::Bytes(bytes));
    }

    /// Queues a snapshot batch of checkpoint `epoch`, written as an Arrow IPC stream.
    pub fn write_batch(&self, epoch: Epoch, name: String, batch: arrow::record_batch::RecordBatch) {
        self.send(epoch, name, Payload::Batch(batch));
    }

    /// Queues a snapshot batch of checkpoint `epoch` that `build` makes on the writer thread.
    pub fn write_deferred(&self, epoch: Epoch, name: String, build: DeferredBatch) {
        self.send(epoch, name, Payload::Deferred(build));
    }

    fn send(&self, epoch: Epoch, name: String, payload: Payload) {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // The receiver lives until every writer is dropped, so sending cannot fail before then.
        let _ = self.sender.send((epoch, name, payload));
    }

    /// How many files this process has queued that have not reached storage (or failed) yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A batch as an Arrow IPC stream: the format of operator snapshots.
pub fn ipc_bytes(batch: &arrow::record_batch::RecordBatch) -> Result<Vec<u8>> {
    // Sized up front: growing a buffer of tens of megabytes would copy it several times.
    let mut bytes = Vec::with_capacity(batch.get_array_memory_size() + 4096);
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut bytes, &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(bytes)
}

/// Writes a snapshot batch as an Arrow IPC stream, with `compression` as LZ4 frames
/// (decompressed by any reader): snapshots are mostly small integers and repeated bytes, so
/// storage receives about a third, at a CPU cost the writer thread pays.
pub fn write_ipc(
    out: &mut dyn std::io::Write,
    batch: &arrow::record_batch::RecordBatch,
    compression: bool,
) -> Result<()> {
    let mut options = arrow::ipc::writer::IpcWriteOptions::default();
    if compression {
        options = options.try_with_compression(Some(arrow::ipc::CompressionType::LZ4_FRAME))?;
    }
    let mut w =
        arrow::ipc::writer::StreamWriter::try_new_with_options(out, &batch.schema(), options)?;
    w.write(batch)?;
    w.finish()?;
    Ok(())
}
