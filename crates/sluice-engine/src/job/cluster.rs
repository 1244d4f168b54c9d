//! The processes of a cluster: finding each other in bounded time, and failing together.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_common::{Error, Result};

use crate::runtime::control::JobControl;

/// How long the processes of a cluster may take to find each other.
pub(crate) const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Every host of `--hosts` must resolve (an error at once, naming it), and the processes must
/// reach each other within [`CLUSTER_CONNECT_TIMEOUT`] (timely would retry forever): after that
/// the process ends with a message. `connected` is set once they have.
pub(crate) fn check_hosts(
    hosts: &[String],
    connected: Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    use std::net::ToSocketAddrs;
    for (i, host) in hosts.iter().enumerate() {
        let resolved = host.to_socket_addrs().map(|mut a| a.next().is_some());
        if !matches!(resolved, Ok(true)) {
            return Err(Error::Runtime(format!(
                "--hosts: process {i}'s address '{host}' does not resolve ({}); give host:port",
                resolved
                    .err()
                    .map_or("no address".to_string(), |e| e.to_string())
            )));
        }
    }
    let listed = hosts.join(", ");
    std::thread::Builder::new()
        .name("cluster-connect".into())
        .spawn(move || {
            let started = Instant::now();
            while started.elapsed() < CLUSTER_CONNECT_TIMEOUT {
                if connected.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            tracing::error!(
                "the processes of the cluster did not all connect within {} s ({listed}): \
                 start every process, each with its --process-id and the same --hosts",
                CLUSTER_CONNECT_TIMEOUT.as_secs()
            );
            std::process::exit(1);
        })
        .map_err(|e| Error::Runtime(format!("could not start a thread: {e}")))?;
    Ok(())
}

/// Ends a process of a cluster whose job failed, with the error: its peers lose the connection
/// and fail too. (Its sinks' in-progress files stay hidden; a rerun's recovery settles them.)
pub(crate) fn end_failed_cluster_process(control: &JobControl) -> ! {
    tracing::error!("{}", control.error_message().unwrap_or_default());
    std::process::exit(1);
}

/// A timely configuration for `workers` threads in each of `hosts.len()` processes (or one).
pub fn cluster_config(
    workers: usize,
    process: usize,
    hosts: Option<Vec<String>>,
) -> timely::Config {
    let communication = match hosts {
        Some(addresses) if addresses.len() > 1 => timely::CommunicationConfig::Cluster {
            threads: workers,
            process,
            addresses,
            report: false,
            zerocopy: false,
        },
        _ if workers > 1 => timely::CommunicationConfig::Process(workers),
        _ => timely::CommunicationConfig::Thread,
    };
    timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    }
}
