//! The pipeline supervisor: each running pipeline is a `sluice worker` process of its own,
//! started and watched by a thread of the server. A pipeline that fails is started again from
//! its last checkpoint after a backoff (Flink's `restart-strategy` options); after too many
//! failures it stays failed with its last error. A stop asks the process to end with a final
//! checkpoint (SIGTERM). If the server dies, its pipelines die with it (the kernel sends them
//! SIGKILL) and resume from their checkpoints when it starts again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::catalog::{now_ms, Catalog, Pipeline};
use crate::error::ApiError;
use crate::views::Views;

/// Flink's `restart-strategy` options, as a pipeline sets them.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Failures tolerated before the pipeline stays failed (`None`: no limit).
    pub attempts: Option<u64>,
    /// Running this long without a failure forgets earlier failures.
    pub reset_after: Duration,
}

impl Default for RestartPolicy {
    /// Flink's `exponential-delay` defaults.
    fn default() -> Self {
        RestartPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 1.5,
            attempts: None,
            reset_after: Duration::from_secs(3600),
        }
    }
}

/// The `restart-strategy.*` keys a pipeline may set.
pub const RESTART_KEYS: [&str; 9] = [
    "restart-strategy.type",
    "restart-strategy.exponential-delay.initial-backoff",
    "restart-strategy.exponential-delay.max-backoff",
    "restart-strategy.exponential-delay.backoff-multiplier",
    "restart-strategy.exponential-delay.attempts-before-reset-backoff",
    "restart-strategy.exponential-delay.reset-backoff-threshold",
    "restart-strategy.fixed-delay.attempts",
    "restart-strategy.fixed-delay.delay",
    "restart-strategy.exponential-delay.jitter-factor",
];

impl RestartPolicy {
    /// From `SET 'restart-strategy...'` values.
    pub fn from_settings(settings: &BTreeMap<String, String>) -> Result<RestartPolicy, ApiError> {
        let duration = |key: &str| -> Result<Option<Duration>, ApiError> {
            settings
                .get(key)
                .map(|v| {
                    sluice_common::time::parse_duration_ms(v)
                        .filter(|ms| *ms >= 0)
                        .map(|ms| Duration::from_millis(ms as u64))
                        .ok_or_else(|| {
                            ApiError::invalid(format!(
                                "SET '{key}' = '{v}': give a duration such as '1 s'"
                            ))
                        })
                })
                .transpose()
        };
        let count = |key: &str| -> Result<Option<u64>, ApiError> {
            settings
                .get(key)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        ApiError::invalid(format!("SET '{key}' = '{v}': give a whole number"))
                    })
                })
                .transpose()
        };
        let kind = settings
            .get("restart-strategy.type")
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_else(|| "exponential-delay".into());
        let mut p = RestartPolicy::default();
        match kind.as_str() {
            "exponential-delay" | "exponentialdelay" => {
                if let Some(d) = duration("restart-strategy.exponential-delay.initial-backoff")? {
                    p.initial = d;
                }
                if let Some(d) = duration("restart-strategy.exponential-delay.max-backoff")? {
                    p.max = d;
                }
                if let Some(d) =
                    duration("restart-strategy.exponential-delay.reset-backoff-threshold")?
                {
                    p.reset_after = d;
                }
                if let Some(m) = settings.get("restart-strategy.exponential-delay.backoff-multiplier")
                {
                    p.multiplier = m.trim().parse::<f64>().ok().filter(|m| *m >= 1.0).ok_or_else(
                        || {
                            ApiError::invalid(format!(
                                "SET 'restart-strategy.exponential-delay.backoff-multiplier' = '{m}': give a number of at least 1"
                            ))
                        },
                    )?;
                }
                p.attempts = count("restart-strategy.exponential-delay.attempts-before-reset-backoff")?;
            }
            "fixed-delay" | "fixeddelay" => {
                let delay = duration("restart-strategy.fixed-delay.delay")?
                    .unwrap_or(Duration::from_secs(1));
                p.initial = delay;
                p.max = delay;
                p.multiplier = 1.0;
                p.attempts = Some(count("restart-strategy.fixed-delay.attempts")?.unwrap_or(1));
            }
            "none" | "off" | "disable" => p.attempts = Some(0),
            other => {
                return Err(ApiError::invalid(format!(
                    "SET 'restart-strategy.type' = '{other}': give exponential-delay, fixed-delay or none"
                )))
            }
        }
        Ok(p)
    }

    /// The wait before restart number `n` (1-based).
    pub fn backoff(&self, n: u64) -> Duration {
        let factor = self.multiplier.powi(n.saturating_sub(1).min(64) as i32);
        self.initial.mul_f64(factor).min(self.max)
    }
}

/// Where a tenant's things live under the data directory.
pub struct Layout {
    pub data: PathBuf,
}

impl Layout {
    pub fn tenant(&self, tenant: &str) -> PathBuf {
        self.data.join("tenants").join(tenant)
    }
    /// The root that a tenant's filesystem tables are confined to.
    pub fn files(&self, tenant: &str) -> PathBuf {
        self.tenant(tenant).join("files")
    }
    pub fn pipeline(&self, tenant: &str, name: &str) -> PathBuf {
        self.tenant(tenant).join("pipelines").join(name)
    }
    pub fn checkpoints(&self, tenant: &str, name: &str) -> PathBuf {
        self.pipeline(tenant, name).join("checkpoints")
    }
    pub fn view(&self, tenant: &str, name: &str) -> PathBuf {
        self.tenant(tenant).join("views").join(name)
    }
}

struct Run {
    stop: Arc<AtomicBool>,
    /// Set when another server took the pipeline over: the run ends without a word to the
    /// catalog, which is the other server's to write now.
    abandoned: Arc<AtomicBool>,
    child: Arc<Mutex<Option<u32>>>,
    started: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts, watches and stops pipeline processes.
pub struct Supervisor {
    pub layout: Arc<Layout>,
    exe: PathBuf,
    catalog: Arc<Catalog>,
    views: Arc<Views>,
    runs: Mutex<HashMap<(String, String), Run>>,
    /// This server, as the holder of pipeline leases (a shared catalog): its addresses and a
    /// random part.
    pub holder: String,
    /// How long a lease lasts unless renewed (renewed every quarter of it).
    pub lease_ttl: Duration,
    /// Each pipeline's throughput and lag over the last hour.
    pub history: crate::history::History,
}

impl Supervisor {
    pub fn new(
        layout: Arc<Layout>,
        exe: PathBuf,
        catalog: Arc<Catalog>,
        views: Arc<Views>,
    ) -> Self {
        Supervisor {
            layout,
            exe,
            catalog,
            views,
            runs: Mutex::new(HashMap::new()),
            holder: format!("{}:{}", std::process::id(), now_ms()),
            lease_ttl: Duration::from_secs(10),
            history: Default::default(),
        }
    }

    /// The `sluice` executable that runs pipelines (`sluice worker`).
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Whether pipelines are shared with other servers (and held by leases).
    pub fn shared(&self) -> bool {
        self.catalog.shared()
    }

    /// The other server that runs `tenant/name` now, if one does.
    pub fn remote_holder(&self, tenant: &str, name: &str) -> Result<Option<String>, ApiError> {
        if !self.shared() || self.is_active(tenant, name) {
            return Ok(None);
        }
        Ok(self
            .catalog
            .lease_holder(tenant, name)?
            .filter(|h| *h != self.holder))
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the pipeline has a process (or is waiting to restart one).
    pub fn is_active(&self, tenant: &str, name: &str) -> bool {
        self.runs()
            .get(&(tenant.to_string(), name.to_string()))
            .is_some_and(|r| r.thread.as_ref().is_some_and(|t| !t.is_finished()))
    }

    /// The process id of the pipeline's current process, if it has one.
    pub fn pid(&self, tenant: &str, name: &str) -> Option<u32> {
        let runs = self.runs();
        let run = runs.get(&(tenant.to_string(), name.to_string()))?;
        let pid = *run.child.lock().unwrap_or_else(|p| p.into_inner());
        pid
    }

    /// The counters the pipeline's process last wrote (rows, state, checkpoints, watermark).
    pub fn stats(&self, tenant: &str, name: &str) -> Option<serde_json::Value> {
        let text =
            std::fs::read_to_string(self.layout.pipeline(tenant, name).join("stats.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Asks the pipeline's process for a checkpoint now (SIGUSR1); false when it has none.
    pub fn request_checkpoint(&self, tenant: &str, name: &str) -> bool {
        match self.pid(tenant, name) {
            Some(pid) => {
                signal(pid, libc::SIGUSR1);
                true
            }
            None => false,
        }
    }

    /// How long the pipeline has been supervised in this server.
    pub fn uptime(&self, tenant: &str, name: &str) -> Option<Duration> {
        self.runs()
            .get(&(tenant.to_string(), name.to_string()))
            .filter(|r| r.thread.as_ref().is_some_and(|t| !t.is_finished()))
            .map(|r| r.started.elapsed())
    }

    /// Starts supervising `p` (`fresh`: without its checkpoints, which are deleted).
    pub fn start(self: &Arc<Self>, p: &Pipeline, fresh: bool) -> Result<(), ApiError> {
        let key = (p.tenant.clone(), p.name.clone());
        if self.is_active(&p.tenant, &p.name) {
            return Err(ApiError::invalid(format!(
                "pipeline '{}' is already running",
                p.name
            )));
        }
        if self.shared()
            && !self.catalog.lease(
                &p.tenant,
                &p.name,
                &self.holder,
                self.lease_ttl.as_millis() as i64,
            )?
        {
            let holder = self.catalog.lease_holder(&p.tenant, &p.name)?;
            return Err(ApiError::invalid(format!(
                "pipeline '{}' runs on another server ({})",
                p.name,
                holder.unwrap_or_else(|| "whose lease just ended: try again".into())
            )));
        }
        let dir = self.layout.pipeline(&p.tenant, &p.name);
        if fresh {
            let _ = std::fs::remove_dir_all(self.layout.checkpoints(&p.tenant, &p.name));
            for v in &p.views {
                self.views.reset(&p.tenant, v)?;
            }
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?;
        let script = dir.join("pipeline.sql");
        std::fs::write(&script, &p.script)
            .map_err(|e| ApiError::internal(format!("{}: {e}", script.display())))?;
        let settings = sluice_sql::plan_script(&p.script)
            .map(|plan| plan.settings)
            .unwrap_or_default();
        let mut policy_settings = settings.clone();
        policy_settings.extend(restart_settings(&p.statements));
        let policy = RestartPolicy::from_settings(&policy_settings)?;
        let quotas = self.catalog.quotas(&p.tenant)?;
        let stop = Arc::new(AtomicBool::new(false));
        let abandoned = Arc::new(AtomicBool::new(false));
        let child = Arc::new(Mutex::new(None));
        let job = Job {
            abandoned: abandoned.clone(),
            stats: dir.join("stats.json"),
            max_state_bytes: quotas.max_state_bytes,
            tenant: p.tenant.clone(),
            name: p.name.clone(),
            exe: self.exe.clone(),
            script,
            log: dir.join("log"),
            cwd: self.layout.files(&p.tenant),
            workers: p.parallelism.max(1),
            views: p
                .views
                .iter()
                .map(|v| format!("{v}={}", self.layout.view(&p.tenant, v).display()))
                .collect(),
            policy,
            catalog: self.catalog.clone(),
            stop: stop.clone(),
            child: child.clone(),
        };
        self.catalog
            .set_status(&p.tenant, &p.name, "starting", None, None)?;
        // Its share of the tenant's ingest rate is in place before its process reads it.
        if let Some(rate) = quotas.max_ingest_rows_per_second {
            let others = self.runs().keys().filter(|(t, _)| *t == p.tenant).count() as u64;
            let _ = std::fs::write(
                dir.join("ingest-rate"),
                (rate / (others + 1)).max(1).to_string(),
            );
        } else {
            let _ = std::fs::write(dir.join("ingest-rate"), "0");
        }
        let thread = std::thread::Builder::new()
            .name(format!("pipeline-{}-{}", p.tenant, p.name))
            .spawn(move || job.supervise())
            .map_err(|e| ApiError::internal(format!("could not start a thread: {e}")))?;
        self.runs().insert(
            key,
            Run {
                stop,
                abandoned,
                child,
                started: Instant::now(),
                thread: Some(thread),
            },
        );
        self.share_ingest(&p.tenant);
        Ok(())
    }

    /// Splits the tenant's `max_ingest_rows_per_second` evenly among its supervised pipelines:
    /// each one's process reads its share from its `ingest-rate` file (0: no limit).
    pub fn share_ingest(&self, tenant: &str) {
        let rate = self
            .catalog
            .quotas(tenant)
            .ok()
            .and_then(|q| q.max_ingest_rows_per_second);
        let names: Vec<String> = self
            .runs()
            .keys()
            .filter(|(t, _)| t == tenant)
            .map(|(_, n)| n.clone())
            .collect();
        let share = match rate {
            Some(r) => (r / names.len().max(1) as u64).max(1),
            None => 0,
        };
        for name in names {
            let dir = self.layout.pipeline(tenant, &name);
            let tmp = dir.join("ingest-rate.tmp");
            if std::fs::write(&tmp, share.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join("ingest-rate"));
            }
        }
    }

    /// Shares each tenant's `max_ingest_rows_per_second` among its running pipelines by
    /// demand (max-min fairness): a pipeline that reads well below an even share keeps a
    /// quarter more than it reads, and the rest is split evenly among the others. A pipeline
    /// that speeds up reads up to its share, and so gets an even share again a second later.
    fn rebalance_ingest(&self, seen: &mut HashMap<(String, String), (u64, i64)>) {
        let runs: Vec<(String, String)> = self.runs().keys().cloned().collect();
        seen.retain(|k, _| runs.contains(k));
        let mut by_tenant: BTreeMap<String, Vec<(String, Option<f64>)>> = BTreeMap::new();
        for (tenant, name) in runs {
            let rate = self.stats(&tenant, &name).and_then(|st| {
                let read: u64 = st["rows_read"]
                    .as_object()?
                    .values()
                    .filter_map(|v| v.as_u64())
                    .sum();
                let at = st["written_at_ms"].as_i64()?;
                let key = (tenant.clone(), name.clone());
                let before = seen.insert(key, (read, at));
                let (read0, at0) = before?;
                (at > at0).then(|| read.saturating_sub(read0) as f64 * 1000.0 / (at - at0) as f64)
            });
            by_tenant.entry(tenant).or_default().push((name, rate));
        }
        for (tenant, pipelines) in by_tenant {
            let Some(quota) = self
                .catalog
                .quotas(&tenant)
                .ok()
                .and_then(|q| q.max_ingest_rows_per_second)
            else {
                continue;
            };
            let rates: Vec<Option<f64>> = pipelines.iter().map(|(_, r)| *r).collect();
            for ((name, _), share) in pipelines.iter().zip(fair_shares(quota, &rates)) {
                let dir = self.layout.pipeline(&tenant, name);
                let tmp = dir.join("ingest-rate.tmp");
                if std::fs::write(&tmp, share.to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, dir.join("ingest-rate"));
                }
            }
        }
    }

    /// Stops the pipeline: SIGTERM (a final checkpoint), SIGKILL if it has not ended in `grace`;
    /// then gives up its lease (a shared catalog).
    pub fn stop(&self, tenant: &str, name: &str, grace: Duration) {
        self.stop_keeping_lease(tenant, name, grace);
        self.release(tenant, name);
    }

    /// Stops the pipeline to start it again here at once (rescaled, edited): its lease stays.
    pub fn stop_keeping_lease(&self, tenant: &str, name: &str, grace: Duration) {
        let run = self.runs().remove(&(tenant.to_string(), name.to_string()));
        let Some(mut run) = run else { return };
        run.stop.store(true, Ordering::SeqCst);
        let pid = *run.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pid) = pid {
            signal(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while run.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if run.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            if let Some(pid) = *run.child.lock().unwrap_or_else(|p| p.into_inner()) {
                signal(pid, libc::SIGKILL);
            }
        }
        if let Some(t) = run.thread.take() {
            let _ = t.join();
        }
        self.share_ingest(tenant);
    }

    fn release(&self, tenant: &str, name: &str) {
        if self.shared() {
            if let Err(e) = self.catalog.release(tenant, name, &self.holder) {
                tracing::warn!(
                    "pipeline {tenant}/{name}: could not give up its lease: {}",
                    e.message
                );
            }
        }
    }

    /// Ends the local run of a pipeline another server has taken over: its process is killed
    /// at once (two processes must never write the same checkpoints), and nothing is recorded.
    fn abandon(&self, tenant: &str, name: &str) {
        let run = self.runs().remove(&(tenant.to_string(), name.to_string()));
        if let Some(mut run) = run {
            run.abandoned.store(true, Ordering::SeqCst);
            run.stop.store(true, Ordering::SeqCst);
            if let Some(pid) = *run.child.lock().unwrap_or_else(|p| p.into_inner()) {
                signal(pid, libc::SIGKILL);
            }
            if let Some(t) = run.thread.take() {
                let _ = t.join();
            }
        }
        self.share_ingest(tenant);
    }

    /// With a shared catalog, every quarter of the lease time: renews the leases of the
    /// pipelines this server runs (a run whose lease is lost, or not renewed in time, is
    /// killed); stops runs that were stopped or dropped through another server; takes over
    /// pipelines that should run but whose server is gone (their leases expired), resuming them
    /// from their checkpoints; and serves the materialized views other servers created.
    pub fn keep_leases(self: &Arc<Self>) {
        if !self.shared() {
            return;
        }
        let sup = self.clone();
        std::thread::Builder::new()
            .name("leases".into())
            .spawn(move || {
                let ttl = sup.lease_ttl.as_millis() as i64;
                let mut renewed: HashMap<(String, String), Instant> = HashMap::new();
                loop {
                    std::thread::sleep(sup.lease_ttl / 4);
                    let local: Vec<(String, String)> = sup.runs().keys().cloned().collect();
                    renewed.retain(|k, _| local.contains(k));
                    for (tenant, name) in local {
                        let key = (tenant.clone(), name.clone());
                        let since = *renewed.entry(key.clone()).or_insert_with(Instant::now);
                        match sup.catalog.pipeline(&tenant, &name) {
                            Ok(Some(p)) if p.desired == crate::catalog::Desired::Stopped => {
                                sup.stop(&tenant, &name, Duration::from_secs(60));
                                let _ = sup.catalog.set_status(&tenant, &name, "stopped", None, None);
                                continue;
                            }
                            Ok(None) => {
                                sup.stop(&tenant, &name, Duration::from_secs(60));
                                continue;
                            }
                            _ => {}
                        }
                        match sup.catalog.lease(&tenant, &name, &sup.holder, ttl) {
                            Ok(true) => {
                                renewed.insert(key, Instant::now());
                            }
                            Ok(false) => {
                                tracing::error!("pipeline {tenant}/{name}: another server holds its lease now; its run here is killed");
                                sup.abandon(&tenant, &name);
                            }
                            Err(e) if since.elapsed() >= sup.lease_ttl * 3 / 4 => {
                                tracing::error!("pipeline {tenant}/{name}: its lease could not be renewed ({}); its run here is killed before the lease ends", e.message);
                                sup.abandon(&tenant, &name);
                            }
                            Err(e) => tracing::warn!("pipeline {tenant}/{name}: renewing its lease: {}", e.message),
                        }
                    }
                    sup.sync_views();
                    let Ok(all) = sup.catalog.pipelines(None) else { continue };
                    for p in all {
                        // "created": its server is starting it now.
                        let orphan = p.desired == crate::catalog::Desired::Running
                            && !matches!(p.status.as_str(), "failed" | "finished" | "created")
                            && !sup.is_active(&p.tenant, &p.name)
                            && sup.catalog.lease_holder(&p.tenant, &p.name).ok() == Some(None);
                        if orphan {
                            match sup.start(&p, false) {
                                Ok(()) => tracing::warn!("pipeline {}/{}: its server is gone; it resumes here from its checkpoint", p.tenant, p.name),
                                Err(e) => tracing::info!("pipeline {}/{}: not taken over: {}", p.tenant, p.name, e.message),
                            }
                        }
                    }
                }
            })
            .expect("start the lease thread");
    }

    /// Registers the materialized views of the catalog that this server does not serve yet
    /// (created through another server), and forgets those that were dropped.
    pub fn sync_views(&self) {
        let Ok(pipelines) = self.catalog.pipelines(None) else {
            return;
        };
        let mut wanted = std::collections::HashSet::new();
        for p in &pipelines {
            for v in &p.views {
                wanted.insert((p.tenant.clone(), v.clone()));
            }
            if p.views
                .iter()
                .all(|v| self.views.get(&p.tenant, v).is_some())
            {
                continue;
            }
            if let Err(e) = register_views(&self.views, &self.layout, p) {
                tracing::warn!("pipeline {}/{}: {e}", p.tenant, p.name);
            }
        }
        for (tenant, name) in self.views.names() {
            if !wanted.contains(&(tenant.clone(), name.clone())) {
                self.views.forget(&tenant, &name);
            }
        }
    }

    /// Ends a pipeline that broke a rule of the server (a quota): its process is killed at
    /// once, and it stays failed with `error` until it is started again.
    pub fn fail(&self, tenant: &str, name: &str, error: &str) {
        let run = self.runs().remove(&(tenant.to_string(), name.to_string()));
        if let Some(mut run) = run {
            run.stop.store(true, Ordering::SeqCst);
            if let Some(pid) = *run.child.lock().unwrap_or_else(|p| p.into_inner()) {
                signal(pid, libc::SIGKILL);
            }
            if let Some(t) = run.thread.take() {
                let _ = t.join();
            }
        }
        let _ = self
            .catalog
            .set_desired(tenant, name, crate::catalog::Desired::Stopped);
        let _ = self
            .catalog
            .set_status(tenant, name, "failed", None, Some(error));
        self.release(tenant, name);
        tracing::warn!("pipeline {tenant}/{name} failed: {error}");
        self.share_ingest(tenant);
    }

    /// Watches the quotas the server enforces itself, every `period`: shares each tenant's
    /// ingest rate by demand, and checks `max_checkpoint_bytes` against what each running
    /// pipeline's checkpoints take on disk.
    pub fn watch_quotas(self: &Arc<Self>, period: Duration) {
        let sup = self.clone();
        std::thread::Builder::new()
            .name("quotas".into())
            .spawn(move || {
                let mut seen = HashMap::new();
                loop {
                std::thread::sleep(period);
                sup.rebalance_ingest(&mut seen);
                let running: Vec<(String, String)> = sup.runs().keys().cloned().collect();
                // Rates only for processes that run (a finished run's stats file stays).
                let active: Vec<(String, String)> = running
                    .iter()
                    .filter(|(t, n)| sup.is_active(t, n))
                    .cloned()
                    .collect();
                for (tenant, name) in &active {
                    if let Some(st) = sup.stats(tenant, name) {
                        sup.history.observe(tenant, name, &st);
                    }
                }
                sup.history.idle_except(&active);
                for (tenant, name) in running {
                    let Some(max) = sup
                        .catalog
                        .quotas(&tenant)
                        .ok()
                        .and_then(|q| q.max_checkpoint_bytes)
                    else {
                        continue;
                    };
                    let used = dir_bytes(&sup.layout.checkpoints(&tenant, &name));
                    if used > max {
                        sup.fail(
                            &tenant,
                            &name,
                            &format!(
                                "quota max_checkpoint_bytes of tenant '{tenant}' is {max}: pipeline '{name}' holds {used} bytes of checkpoints"
                            ),
                        );
                    }
                }
                }
            })
            .expect("start the quota thread");
    }

    /// Stops every pipeline (the server is shutting down).
    pub fn stop_all(&self, grace: Duration) {
        let keys: Vec<_> = self.runs().keys().cloned().collect();
        for (t, n) in keys {
            self.stop(&t, &n, grace);
        }
    }
}

/// `sluice worker` in `cwd`, as the server starts its processes: no input, none of the
/// server's secrets in its environment, SIGKILL when the thread that started it ends (or the
/// server dies), and its memory capped at `cap` bytes (`RLIMIT_DATA`).
pub fn worker_command(exe: &Path, cwd: &Path, cap: Option<u64>) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("worker")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .env_remove("SLUICE_ADMIN_TOKEN")
        .env_remove("SLUICE_ADMIN_PASSWORD");
    // SAFETY: prctl between fork and exec, async-signal-safe. The child gets SIGKILL when
    // the thread that started it ends, which it does only when the child has ended or the
    // server died.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Asking for a checkpoint (SIGUSR1) before the process listens must not end it:
            // ignored until its handler is installed.
            libc::signal(libc::SIGUSR1, libc::SIG_IGN);
            // The server may have died between fork and prctl.
            if libc::getppid() == 1 {
                libc::_exit(1);
            }
            if let Some(cap) = cap {
                let limit = libc::rlimit {
                    rlim_cur: cap,
                    rlim_max: cap,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// The cap on a pipeline process's data segment (heap and private mappings, `RLIMIT_DATA`)
/// under a state quota: room for the state four times over (rows in flight, checkpoint
/// buffers, copies while state grows) and 1 GiB for the runtime. cgroups are not available on
/// these machines, so an rlimit is the hard cap; the state quota itself is enforced by the
/// process, which fails naming the quota before the cap is reached.
pub fn memory_cap(max_state_bytes: u64) -> u64 {
    max_state_bytes.saturating_mul(4).saturating_add(1 << 30)
}

/// The bytes of the files under `dir` (0 when it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this server started; a stale pid only fails.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The `SET 'restart-strategy...'` lines of a pipeline's statements (they are the server's, not
/// the worker's).
pub fn restart_settings(statements: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for s in crate::statements::split(statements) {
        if let Some((k, v)) = crate::statements::set_pair(&s.text) {
            if k.starts_with("restart-strategy.") {
                out.insert(k, v);
            }
        }
    }
    out
}

/// One supervised pipeline.
struct Job {
    abandoned: Arc<AtomicBool>,
    /// Where the process writes its counters.
    stats: PathBuf,
    /// The tenant's state quota: the process enforces it, and its data segment is capped at
    /// [`memory_cap`] of it.
    max_state_bytes: Option<u64>,
    tenant: String,
    name: String,
    exe: PathBuf,
    script: PathBuf,
    log: PathBuf,
    /// The tenant's storage root: relative paths of its tables start there.
    cwd: PathBuf,
    workers: u64,
    views: Vec<String>,
    policy: RestartPolicy,
    catalog: Arc<Catalog>,
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<u32>>>,
}

impl Job {
    fn status(&self, status: &str, restarts: Option<u64>, error: Option<&str>) {
        if self.abandoned.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self
            .catalog
            .set_status(&self.tenant, &self.name, status, restarts, error)
        {
            tracing::error!("pipeline {}/{}: {e}", self.tenant, self.name);
        }
    }

    fn spawn(&self) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let cap = self.max_state_bytes.map(memory_cap);
        std::fs::create_dir_all(&self.cwd)?;
        let mut cmd = worker_command(&self.exe, &self.cwd, cap);
        cmd.arg(&self.script)
            .arg("--workers")
            .arg(self.workers.to_string());
        for v in &self.views {
            cmd.arg("--view").arg(v);
        }
        cmd.arg("--pipeline")
            .arg(format!("{}/{}", self.tenant, self.name))
            .arg("--ingest-rate-file")
            .arg(self.stats.with_file_name("ingest-rate"))
            .arg("--stats")
            .arg(&self.stats);
        if let Some(max) = self.max_state_bytes {
            cmd.arg("--max-state-bytes").arg(max.to_string());
        }
        cmd.stdout(log.try_clone()?).stderr(log);
        cmd.spawn()
    }

    fn supervise(self) {
        let mut failures = 0u64;
        let mut restarts = self
            .catalog
            .pipeline(&self.tenant, &self.name)
            .ok()
            .flatten()
            .map_or(0, |p| p.restarts);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                self.status("stopped", None, None);
                return;
            }
            let log_start = std::fs::metadata(&self.log).map_or(0, |m| m.len());
            let mut child = match self.spawn() {
                Ok(c) => c,
                Err(e) => {
                    self.status(
                        "failed",
                        None,
                        Some(&format!("could not start the pipeline's process: {e}")),
                    );
                    return;
                }
            };
            *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child.id());
            self.status("running", None, None);
            let started = Instant::now();
            let exit = child.wait();
            *self.child.lock().unwrap_or_else(|p| p.into_inner()) = None;
            let stopping = self.stop.load(Ordering::SeqCst);
            match exit {
                Ok(s) if s.success() => {
                    self.status(if stopping { "stopped" } else { "finished" }, None, None);
                    return;
                }
                _ if stopping => {
                    self.status("stopped", None, None);
                    return;
                }
                Ok(s) => {
                    let error = last_error(&self.log, log_start).unwrap_or_else(|| {
                        use std::os::unix::process::ExitStatusExt;
                        match s.signal() {
                            Some(sig) => {
                                format!("the pipeline's process was killed by signal {sig}")
                            }
                            None => format!("the pipeline's process exited with {s}"),
                        }
                    });
                    if started.elapsed() >= self.policy.reset_after {
                        failures = 0;
                    }
                    failures += 1;
                    if self.policy.attempts.is_some_and(|a| failures > a) {
                        self.status(
                            "failed",
                            None,
                            Some(&format!(
                                "{error} (failed {failures} times; the restart strategy allows {})",
                                self.policy.attempts.unwrap_or(0)
                            )),
                        );
                        return;
                    }
                    restarts += 1;
                    self.status("restarting", Some(restarts), Some(&error));
                    tracing::warn!(
                        "pipeline {}/{} failed ({error}); restart {restarts} from its last checkpoint",
                        self.tenant,
                        self.name
                    );
                    let wait = self.policy.backoff(failures);
                    let until = Instant::now() + wait;
                    while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Err(e) => {
                    self.status(
                        "failed",
                        None,
                        Some(&format!("waiting for the process: {e}")),
                    );
                    return;
                }
            }
        }
    }
}

/// The error a failed run left in its log (written from `from` on): the last error line.
fn last_error(log: &Path, from: u64) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).to_string();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let pick = lines
        .iter()
        .rev()
        .find(|l| l.contains("ERROR") || l.starts_with("error") || l.contains("panicked"))?;
    let line = pick.trim();
    let line = line
        .split_once("ERROR")
        .map_or(line, |(_, rest)| rest.trim_start_matches([' ', ':']).trim());
    Some(line.chars().take(2000).collect())
}

/// Registers the materialized views pipeline `p` keeps, with the columns its script gives.
pub fn register_views(views: &Views, layout: &Layout, p: &Pipeline) -> Result<(), String> {
    if p.views.is_empty() {
        return Ok(());
    }
    let plan = sluice_sql::plan_script(&p.script).map_err(|e| e.to_string())?;
    let selects = plan
        .pipelines
        .iter()
        .filter(|pl| matches!(pl.sink, sluice_sql::SinkTarget::Select { .. }));
    for (v, pl) in p.views.iter().zip(selects) {
        if views.get(&p.tenant, v).is_none() {
            views
                .register(&p.tenant, v, pl.query.schema(), layout.view(&p.tenant, v))
                .map_err(|e| e.message)?;
        }
    }
    Ok(())
}

/// Max-min fair shares of `quota` rows/s among pipelines reading at `rates` (unknown: as much
/// as they get). Every share is at least 1, and together they are at most `quota` (or one each).
pub fn fair_shares(quota: u64, rates: &[Option<f64>]) -> Vec<u64> {
    let mut shares: Vec<Option<u64>> = vec![None; rates.len()];
    let mut remaining = quota as f64;
    loop {
        let open: Vec<usize> = (0..rates.len()).filter(|i| shares[*i].is_none()).collect();
        if open.is_empty() {
            break;
        }
        let even = remaining / open.len() as f64;
        // Those that read well below an even share keep a quarter more than they read.
        let modest: Vec<usize> = open
            .iter()
            .copied()
            .filter(|i| rates[*i].is_some_and(|r| r * 1.25 < even * 0.8))
            .collect();
        // None is modest, or all are (nothing is left to want more): split what is left.
        if modest.is_empty() || modest.len() == open.len() {
            for i in open {
                shares[i] = Some(even.floor() as u64);
            }
            break;
        }
        for i in modest {
            let share = (rates[i].unwrap_or(0.0) * 1.25).ceil().max(1.0);
            shares[i] = Some(share as u64);
            remaining -= share;
        }
    }
    shares.into_iter().map(|s| s.unwrap_or(0).max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::fair_shares;

    #[test]
    fn ingest_is_shared_by_demand() {
        // Nobody is measured yet: even shares.
        assert_eq!(fair_shares(4000, &[None, None]), vec![2000, 2000]);
        // A slow reader keeps a quarter more than it reads; the rest goes to the busy one.
        assert_eq!(
            fair_shares(4000, &[Some(400.0), Some(2000.0)]),
            vec![500, 3500]
        );
        // Two slow, two busy: the busy ones split what is left evenly.
        assert_eq!(
            fair_shares(10_000, &[Some(100.0), Some(4000.0), Some(200.0), None]),
            vec![125, 4812, 250, 4812]
        );
        // Everyone busy: even shares; never more than the quota in all.
        let s = fair_shares(1000, &[Some(900.0), Some(900.0), Some(900.0)]);
        assert_eq!(s, vec![333, 333, 333]);
        for rates in [vec![Some(1.0); 7], vec![Some(5000.0), Some(1.0), None]] {
            assert!(fair_shares(3000, &rates).iter().sum::<u64>() <= 3000);
        }
    }
}
