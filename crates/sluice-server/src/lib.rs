//! `sluice serve`: the multi-tenant platform server.
//!
//! - [`catalog`]: tenants, users, tokens, tables, views and pipelines in embedded SQLite, or in
//!   PostgreSQL shared by several servers ([`catalog_db`]).
//! - [`auth`]: SCRAM-SHA-256 verifiers and hashed API tokens.
//! - [`statements`]: the SQL the server runs for a session, scoped to its tenant.
//! - [`supervisor`]: one `sluice worker` process per running pipeline, restarted from its
//!   checkpoints with backoff.
//! - [`views`]: materialized views folded from their pipelines' committed epochs.
//! - [`pg`] and [`rest`]: the Postgres wire protocol and the REST API.

pub mod auth;
pub mod catalog;
pub mod catalog_db;
pub mod error;
pub mod history;
pub mod metrics;
pub mod pg;
pub mod pg_catalog;
pub mod preview;
pub mod rest;
pub mod statements;
pub mod supervisor;
pub mod views;
pub mod web;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::{Catalog, Role, User, ADMIN_TENANT};
use crate::statements::Server;
use crate::supervisor::{Layout, Supervisor};
use crate::views::Views;

/// `sluice serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Where the catalog, checkpoints, views and tenants' files live.
    #[arg(long, default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: String,
    /// The Postgres wire protocol port.
    #[arg(long, default_value_t = 5433)]
    pub pg_port: u16,
    /// The HTTP port (REST API and console).
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Worker threads all pipelines of the server may use together (default: 4 per core).
    #[arg(long)]
    pub max_parallelism: Option<u64>,
    /// TLS for REST and the Postgres wire: the certificate chain (PEM). Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Refuse Postgres-wire clients that do not ask for TLS (as `hostssl` rules do); REST is
    /// HTTPS only whenever TLS is on.
    #[arg(long, requires = "tls_cert")]
    pub require_tls: bool,
    /// Keep the catalog in this PostgreSQL database (`postgres://user:password@host:port/db`)
    /// instead of `<data-dir>/catalog.db`, so that several servers share it. Servers sharing a
    /// catalog share `--data-dir` too (the same folder, or a shared file system): each
    /// pipeline runs on one of them, which holds its lease, and another takes it over when
    /// that server is gone.
    #[arg(long, value_name = "URL")]
    pub catalog: Option<String>,
    /// With a shared catalog: how long a server's lease on a pipeline lasts unless renewed,
    /// which is how long a pipeline waits to be taken over when its server is gone.
    #[arg(long, default_value_t = 10)]
    pub lease_seconds: u64,
    /// Also run the Double-11 demo: generated orders, the big screen's materialized views
    /// (tenant `double11`) and its screen, whose address (with a token) is printed.
    #[arg(long)]
    pub demo: bool,
}

/// The TLS configuration from a PEM certificate chain and key.
fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no certificate in the file",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("TLS: the certificate and key do not fit: {e}"))?;
    Ok(Arc::new(config))
}

/// Serves REST over TLS: each connection's handshake, then hyper with the router.
async fn serve_https(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: axum::Router,
) -> Result<(), String> {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}

fn bind(addr: &str, port: u16, what: &str, flag: &str) -> Result<std::net::TcpListener, String> {
    let l = std::net::TcpListener::bind((addr, port)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("{addr}:{port} ({what}) is already in use: stop what listens there, or give {flag} another port")
        } else {
            format!("{addr}:{port} ({what}): {e}")
        }
    })?;
    l.set_nonblocking(true)
        .map_err(|e| format!("{addr}:{port}: {e}"))?;
    Ok(l)
}

/// Creates the admin tenant and user on the first start; returns lines to print once.
fn bootstrap(catalog: &Catalog) -> Result<Vec<String>, String> {
    let mut shown = vec![];
    let env_password = std::env::var("SLUICE_ADMIN_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty());
    let env_token = std::env::var("SLUICE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let first = !catalog.tenant_exists(ADMIN_TENANT).map_err(|e| e.message)?;
    if first {
        catalog.create_tenant(ADMIN_TENANT).map_err(|e| e.message)?;
    }
    match catalog.user("admin").map_err(|e| e.message)? {
        None => {
            let password = env_password.clone().unwrap_or_else(auth::new_password);
            catalog
                .create_user(&User {
                    name: "admin".into(),
                    tenant: ADMIN_TENANT.into(),
                    role: Role::Owner,
                    verifier: auth::verifier(&password),
                })
                .map_err(|e| e.message)?;
            if env_password.is_none() {
                shown.push(format!(
                    "  admin password    {password}   (shown once; SLUICE_ADMIN_PASSWORD sets it)"
                ));
            }
        }
        Some(u) => {
            if let Some(p) = &env_password {
                if !auth::check_password(&u.verifier, p) {
                    catalog
                        .set_verifier("admin", &auth::verifier(p))
                        .map_err(|e| e.message)?;
                }
            }
        }
    }
    match env_token {
        Some(t) => auth::ensure_token(catalog, "admin", &t).map_err(|e| e.message)?,
        None if first => {
            let (_, secret) = auth::create_token(catalog, "admin").map_err(|e| e.message)?;
            shown.push(format!(
                "  admin token       {secret}   (shown once; SLUICE_ADMIN_TOKEN sets it)"
            ));
        }
        None => {}
    }
    Ok(shown)
}

/// Runs the server until SIGINT or SIGTERM.
pub fn serve(args: ServeArgs) -> Result<(), String> {
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("{}: {e}", args.data_dir.display()))?;
    let data = args
        .data_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.data_dir.display()))?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls_config(c, k)?),
        _ => None,
    };
    let pg_listener = bind(&args.listen, args.pg_port, "Postgres wire", "--pg-port")?;
    let http_listener = bind(&args.listen, args.http_port, "HTTP", "--http-port")?;
    let catalog = Arc::new(match &args.catalog {
        Some(url) => Catalog::open_postgres(url)?,
        None => Catalog::open(&data.join("catalog.db"))?,
    });
    let shown = bootstrap(&catalog)?;
    let layout = Arc::new(Layout { data: data.clone() });
    let views = Arc::new(Views::default());
    let exe = std::env::current_exe().map_err(|e| format!("the server's own program: {e}"))?;
    let mut supervisor = Supervisor::new(layout.clone(), exe, catalog.clone(), views.clone());
    supervisor.holder = format!(
        "{}:{} (pid {}, started {})",
        args.listen,
        pg_listener.local_addr().map_or(0, |a| a.port()),
        std::process::id(),
        catalog::now_ms()
    );
    supervisor.lease_ttl = Duration::from_secs(args.lease_seconds.max(1));
    let supervisor = Arc::new(supervisor);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let server = Arc::new(Server {
        catalog: catalog.clone(),
        supervisor: supervisor.clone(),
        views: views.clone(),
        layout: layout.clone(),
        max_parallelism: args.max_parallelism.unwrap_or(4 * cores),
    });
    // Materialized views come back from their logs; pipelines that were running resume from
    // their checkpoints.
    for p in catalog.pipelines(None).map_err(|e| e.message)? {
        supervisor::register_views(&views, &layout, &p)
            .map_err(|e| format!("pipeline {}/{}: {e}", p.tenant, p.name))?;
        if p.desired == catalog::Desired::Running {
            match supervisor.start(&p, false) {
                Ok(()) => {}
                // Another server sharing the catalog runs it.
                Err(e) if catalog.shared() => {
                    tracing::info!("pipeline {}/{}: {}", p.tenant, p.name, e.message)
                }
                Err(e) => tracing::error!("pipeline {}/{}: {}", p.tenant, p.name, e.message),
            }
        }
    }
    supervisor.keep_leases();
    views.start_tailing(Duration::from_millis(100));
    supervisor.watch_quotas(Duration::from_secs(1));
    let pg_addr = pg_listener.local_addr().map_err(|e| e.to_string())?;
    let http_addr = http_listener.local_addr().map_err(|e| e.to_string())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("Sluice server");
    println!("  console           {scheme}://{http_addr}/console");
    println!("  REST              {scheme}://{http_addr}/v1  (OpenAPI at /v1/docs/)");
    println!(
        "  Postgres wire     {pg_addr}  (psql -h {} -p {} -U admin)",
        pg_addr.ip(),
        pg_addr.port()
    );
    println!("  data              {}", data.display());
    for line in shown {
        println!("{line}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    stop_on_signals(supervisor.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("serve")
        .build()
        .map_err(|e| format!("could not start the server's runtime: {e}"))?;
    runtime.block_on(async move {
        if args.demo {
            let token = web::start_demo(&server).await?;
            println!("  big screen        {scheme}://{http_addr}/screen/double11?token={token}");
            println!("  demo's console    {scheme}://{http_addr}/console?token={token}");
            let _ = std::io::stdout().flush();
        }
        let pg = tokio::net::TcpListener::from_std(pg_listener).map_err(|e| e.to_string())?;
        let http = tokio::net::TcpListener::from_std(http_listener).map_err(|e| e.to_string())?;
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(pg::serve(
            pg,
            server.clone(),
            acceptor.clone(),
            args.require_tls,
        ));
        match acceptor {
            Some(acceptor) => serve_https(http, acceptor, rest::router(server)).await,
            None => axum::serve(http, rest::router(server))
                .await
                .map_err(|e| format!("HTTP: {e}")),
        }
    })
}

/// SIGINT or SIGTERM stops every pipeline with a final checkpoint, then the server; a second
/// signal ends it at once.
fn stop_on_signals(supervisor: Arc<Supervisor>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("could not install the signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = false;
            for signal in signals.forever() {
                if seen {
                    std::process::exit(128 + signal);
                }
                seen = true;
                eprintln!("stopping the pipelines (each takes a final checkpoint)...");
                let supervisor = supervisor.clone();
                std::thread::spawn(move || {
                    supervisor.stop_all(Duration::from_secs(60));
                    std::process::exit(0);
                });
            }
        })
        .map_err(|e| format!("could not start the signal thread: {e}"))?;
    Ok(())
}
