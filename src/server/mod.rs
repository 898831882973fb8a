//! The HTTP/WebSocket front: every warp filter of the crate lives here.
//!
//! Owns the routes, the one error-to-JSON mapping (`errors`), credentials on requests
//! (`auth`), the account endpoints (`api`), the WebSocket pump that executes a protocol
//! session's effects (`ws`), the admin socket's lifetime, and orderly shutdown: close every
//! WebSocket with 1001, stop the hub, flush the store. Must not: decide protocol rules (that
//! is `protocol::Session`), decide access (that is `auth` via `accounts`), touch Automerge or
//! sled (that is `hub` and `storage`).
//!
//! `run` takes a bound listener and a shutdown future (the mini-redis shape), so tests bind
//! port 0 and run exactly the production code.

mod api;
mod auth;
pub mod backend;
mod errors;
mod follow;
mod health;
mod households;
mod listen;
mod metrics;
mod upgrade;
mod web;
mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::Filter;

use crate::accounts::{Accounts, AccountsConfig, AdminCommand};
use crate::changelog::ChangeLog;
use crate::hub::{Hub, HubConfig};
use crate::ids::{Clock, PeerId, SystemClock};
use crate::projection::Projection;
use crate::protocol::SessionConfig;
use crate::storage::documents::DocumentStore;
use crate::storage::postgres::PgStore;
use crate::storage::{Store, StoreConfig};
use backend::Backend;

/// Written into the data directory of a server on PostgreSQL, so that a command run
/// without `--database` does not open an empty embedded store there instead.
const POSTGRES_MARKER: &str = "POSTGRES";
pub use listen::ListenConfig;

/// Everything `fieldsync serve` can be told, validated once.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The embedded store (sled) lives here, and the admin socket in any case.
    pub data_dir: PathBuf,
    /// `postgres://…`: keep everything in PostgreSQL instead of the embedded store.
    pub database: Option<String>,
    pub store: StoreConfig,
    pub hub: HubConfig,
    pub accounts: AccountsConfig,
    /// Connection cap, header deadline, trusted proxies.
    pub listen: ListenConfig,
    /// Where to serve Prometheus metrics (`/metrics`), apart from the public port; `None`:
    /// not served.
    pub metrics_listen: Option<SocketAddr>,
    /// The station's offset from UTC, in minutes: monthly reports' boundaries follow it.
    pub utc_offset_minutes: i32,
    /// Largest WebSocket message accepted, in bytes.
    pub max_message_bytes: usize,
    pub ping_interval: Duration,
    /// A peer silent for this long is dropped.
    pub idle_timeout: Duration,
    /// A WebSocket that has not sent `join` this long after the upgrade is closed.
    pub join_timeout: Duration,
    /// Messages queued for one connection before it counts as too slow.
    pub outbox_len: usize,
    /// Bytes queued for one connection before it counts as too slow.
    pub outbox_bytes: usize,
    /// Bytes queued for one connection beyond which its messages are not read (they wait in
    /// TCP) until its socket catches up: what it asks for cannot pile up in memory.
    pub pause_reading_bytes: usize,
    /// Bytes queued for all connections' sockets together beyond which pushes wait and no
    /// connection's new messages are read until the sockets catch up.
    pub outbound_budget_bytes: usize,
    /// How long one write to a socket may take before the peer is dropped.
    pub write_timeout: Duration,
    /// How long shutdown waits for connections to close.
    pub shutdown_grace: Duration,
    /// Mark the session cookie `Secure` (the staff page is reached over HTTPS, through a
    /// TLS proxy).
    pub secure_cookies: bool,
}

impl ServerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            database: None,
            store: StoreConfig::default(),
            hub: HubConfig::default(),
            accounts: AccountsConfig::default(),
            listen: ListenConfig::default(),
            metrics_listen: None,
            // Taiwan's time (no daylight saving).
            utc_offset_minutes: 8 * 60,
            max_message_bytes: 16 * 1024 * 1024,
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(50),
            join_timeout: Duration::from_secs(10),
            outbox_len: 1024,
            outbox_bytes: 32 * 1024 * 1024,
            pause_reading_bytes: 1024 * 1024,
            outbound_budget_bytes: 32 * 1024 * 1024,
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            secure_cookies: false,
        }
    }
}

/// The opened store, accounts and hub, shared by every connection.
#[derive(Clone)]
pub struct Services {
    /// Where documents are kept (sled or PostgreSQL).
    pub documents: Arc<dyn DocumentStore>,
    /// The embedded store, when the data is there (benchmarks read its statistics).
    pub embedded: Option<Store>,
    /// The database, when the data is there.
    postgres: Option<Arc<PgStore>>,
    /// Every layer's store (a backup reads them).
    backend: Backend,
    /// A lock on the data directory's PostgreSQL marker, so that two processes never share
    /// one data directory (its admin socket); sled locks its own files.
    _dir_lock: Option<Arc<std::fs::File>>,
    /// Stops following the other nodes on the database (`follow`), when serving ends.
    following: CancellationToken,
    /// On PostgreSQL: whether this node follows the others now (for readiness).
    followed: Option<Arc<follow::Following>>,
    pub hub: Hub,
    pub accounts: Accounts,
    pub changelog: ChangeLog,
    pub projection: Projection,
    session: SessionConfig,
    config: Arc<ServerConfig>,
    /// The admin socket, when bound before [`run`].
    admin_listener: Arc<std::sync::Mutex<Option<tokio::net::UnixListener>>>,
    /// The metrics listener, when configured and bound before [`run`].
    metrics_listener: Arc<std::sync::Mutex<Option<TcpListener>>>,
    /// What every connection's outbox counts against together.
    outbound: Arc<crate::hub::OutboundBudget>,
}

impl Services {
    /// Opens the store in `config.data_dir`, loads the accounts and starts the hub.
    pub async fn open(config: ServerConfig) -> Result<Services, crate::Error> {
        Self::open_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Like [`Services::open`] with another clock (tests expire codes and sessions).
    pub async fn open_with_clock(
        config: ServerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Services, crate::Error> {
        crate::storage::prepare_data_dir(&config.data_dir)?;
        crate::storage::check_private(&config.data_dir)?;
        let Layers {
            backend,
            documents,
            embedded,
            postgres,
            dir_lock,
            accounts,
            changelog,
            projection,
            storage_id,
        } = match &config.database {
            None => Layers::embedded(&config, clock.clone()).await?,
            Some(url) => Layers::postgres(&config, url, clock.clone()).await?,
        };
        // Changes that reached the disk just before a crash, but whose projection rows did
        // not, are projected now, before anyone reads a list.
        let catching_up = projection.clone();
        let replayed = crate::storage::blocking(move || catching_up.catch_up_blocking()).await?;
        if replayed > 0 {
            tracing::warn!(
                documents = replayed,
                "the last stop was not clean: brought the staff projection up to date for the documents that changed just before it"
            );
        }
        let server_peer_id = PeerId::random("fieldsync");
        let hub = Hub::new(
            documents.clone(),
            server_peer_id.clone(),
            config.hub.clone(),
            Arc::new(accounts.clone()),
            // The change log first (provenance, catalogs), then the projection, which
            // attributes values from the rows the change log has just written.
            vec![Arc::new(changelog.clone()), Arc::new(projection.clone())],
            clock,
        );
        let session = SessionConfig {
            server_peer_id,
            server_storage_id: storage_id,
            max_message_bytes: config.max_message_bytes,
            ping_interval: config.ping_interval,
            idle_timeout: config.idle_timeout,
            join_timeout: config.join_timeout,
        };
        Ok(Services {
            backend,
            documents,
            embedded,
            followed: postgres.as_ref().map(|_| Arc::default()),
            postgres,
            _dir_lock: dir_lock,
            following: CancellationToken::new(),
            hub,
            accounts,
            changelog,
            projection,
            session,
            outbound: crate::hub::OutboundBudget::new(config.outbound_budget_bytes),
            config: Arc::new(config),
            admin_listener: Arc::default(),
            metrics_listener: Arc::default(),
        })
    }

    /// Whether anything is stored for `doc`.
    pub async fn document_exists(&self, doc: crate::ids::DocumentId) -> Result<bool, crate::Error> {
        let documents = self.documents.clone();
        Ok(crate::storage::blocking(move || documents.exists(doc)).await?)
    }

    /// Runs one admin command: a backup here, account commands in the directory.
    pub async fn run_admin(
        &self,
        command: AdminCommand,
        operator: &str,
    ) -> Result<String, crate::Error> {
        match command {
            AdminCommand::Backup { to } => {
                let to = PathBuf::from(to);
                let started = std::time::Instant::now();
                tracing::info!(operator, to = %to.display(), "backup started");
                let m = crate::backup::take(self, &to, |_| {}).await?;
                self.accounts
                    .record_audit(
                        operator,
                        "backup",
                        format!(
                            "to={} documents={} feed_seq={}",
                            to.display(),
                            m.documents,
                            m.feed_seq
                        ),
                    )
                    .await?;
                tracing::info!(
                    operator,
                    documents = m.documents,
                    feed_seq = m.feed_seq,
                    "backup written"
                );
                Ok(format!(
                    "backup written to {} in {:.1} s: {} documents, {} account records, {} audit entries, {} provenance rows (up to change {}), {} actor bindings",
                    to.display(),
                    started.elapsed().as_secs_f64(),
                    m.documents,
                    m.records,
                    m.audit_entries,
                    m.provenance_rows,
                    m.feed_seq,
                    m.actor_bindings
                ))
            }
            other => Ok(self.accounts.admin(&self.hub, other, operator).await?),
        }
    }

    /// Every layer's store.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn server_storage_id(&self) -> &crate::ids::StorageId {
        &self.session.server_storage_id
    }

    /// Takes what only a serving process holds (on PostgreSQL, the database's serving
    /// lock, shared with the other servers) and binds the admin socket, now (else [`run`]
    /// does): call it before announcing that the server is up, so an admin command run
    /// right after the announcement reaches it.
    pub async fn prepare_to_serve(&self) -> Result<(), crate::Error> {
        if let Some(pg) = &self.postgres {
            pg.hold_serving_lock().await?;
            // Other nodes on the database: their changes reach this node's devices too.
            tokio::spawn(follow::follow(
                pg.clone(),
                self.hub.clone(),
                self.accounts.clone(),
                self.followed.clone().unwrap_or_default(),
                self.following.clone(),
            ));
        }
        let listener = bind_admin(&self.config.data_dir)?;
        *lock(&self.admin_listener) = Some(listener);
        if let Some(addr) = self.config.metrics_listen {
            let listener = TcpListener::bind(addr).await.map_err(|e| {
                crate::Error::Config(format!(
                    "cannot listen for metrics on {addr}: {e}; choose another --metrics-listen address"
                ))
            })?;
            *lock(&self.metrics_listener) = Some(listener);
        }
        Ok(())
    }

    /// Where `/metrics` is served, once [`Services::prepare_to_serve`] bound it.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        lock(&self.metrics_listener)
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// On PostgreSQL, takes the database from every server (refused while one runs) for a
    /// maintenance command; the embedded store is taken whole when it opens.
    pub async fn lock_for_maintenance(&self, command: &str) -> Result<(), crate::Error> {
        if let Some(pg) = &self.postgres {
            pg.lock_for_maintenance(command).await?;
        }
        Ok(())
    }

    /// Stops the hub and flushes the store, for in-process tools that never called [`run`].
    pub async fn close(self) -> Result<(), crate::Error> {
        self.hub.shutdown().await;
        self.documents.durable().await?;
        Ok(())
    }
}

/// The storage-backed layers, on one backend.
struct Layers {
    backend: Backend,
    documents: Arc<dyn DocumentStore>,
    embedded: Option<Store>,
    postgres: Option<Arc<PgStore>>,
    dir_lock: Option<Arc<std::fs::File>>,
    accounts: Accounts,
    changelog: ChangeLog,
    projection: Projection,
    storage_id: crate::ids::StorageId,
}

impl Layers {
    /// On sled in the data directory (refused if it belongs to a server on PostgreSQL).
    async fn embedded(
        config: &ServerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Layers, crate::Error> {
        refuse_postgres_marker(&config.data_dir)?;
        let backend = Backend::open_embedded(&config.data_dir, &config.store)?;
        Self::on(backend, None, config, clock).await
    }

    /// On PostgreSQL at `url` (migrated on connect); marks the data directory as such.
    async fn postgres(
        config: &ServerConfig,
        url: &str,
        clock: Arc<dyn Clock>,
    ) -> Result<Layers, crate::Error> {
        if holds_embedded_data(&config.data_dir) {
            return Err(crate::Error::Config(format!(
                "{} holds data of the embedded store; a server on PostgreSQL would not see it: give it another --data directory, or copy the data first with `fieldsync migrate --from {} --to DATABASE_URL`",
                config.data_dir.display(),
                config.data_dir.display()
            )));
        }
        let dir_lock = lock_data_dir(&config.data_dir)?;
        let backend = Backend::connect(url).await?;
        Self::on(backend, Some(dir_lock), config, clock).await
    }

    async fn on(
        backend: Backend,
        dir_lock: Option<Arc<std::fs::File>>,
        config: &ServerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Layers, crate::Error> {
        let storage_id = backend.storage_id().await?;
        let accounts =
            Accounts::open_on(backend.directory.clone(), clock, config.accounts.clone()).await?;
        let changelog = ChangeLog::with_store(backend.changelog.clone(), accounts.clone());
        let projection = Projection::on(
            backend.documents.clone(),
            backend.rows.clone(),
            accounts.clone(),
            changelog.clone(),
        );
        Ok(Layers {
            backend: backend.clone(),
            documents: backend.documents.clone(),
            embedded: backend.embedded_store(),
            postgres: match &backend.engine {
                backend::Engine::Postgres(pg) => Some(pg.clone()),
                backend::Engine::Embedded(_) => None,
            },
            dir_lock,
            accounts,
            changelog,
            projection,
            storage_id,
        })
    }
}

/// Refuses a data directory whose data is in PostgreSQL (a command run there without
/// `--database` would otherwise open an empty embedded store beside it).
pub(crate) fn refuse_postgres_marker(dir: &std::path::Path) -> Result<(), crate::Error> {
    if dir.join(POSTGRES_MARKER).exists() {
        return Err(crate::Error::Config(format!(
            "{} belongs to a server that keeps its data in PostgreSQL: pass its --database (or run the command while that server runs)",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes the PostgreSQL marker into the data directory of a server on PostgreSQL and
/// locks it (released when the process ends, however it ends): one process per directory,
/// as sled ensures for its own.
fn lock_data_dir(dir: &std::path::Path) -> Result<Arc<std::fs::File>, crate::Error> {
    use std::io::Write;
    let marker = dir.join(POSTGRES_MARKER);
    let cannot =
        |e: std::io::Error| crate::Error::Config(format!("cannot write {}: {e}", marker.display()));
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&marker)
        .map_err(cannot)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(crate::storage::StorageError::Io(format!(
                "the data directory {} is in use by another fieldsync process; stop it or choose another --data directory",
                dir.display()
            ))
            .into())
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(cannot(e)),
    }
    file.set_len(0).map_err(cannot)?;
    file.write_all(
        b"this data directory holds the admin socket of a fieldsync server whose data is in PostgreSQL\n",
    )
    .map_err(cannot)?;
    Ok(Arc::new(file))
}

/// Whether `dir` holds sled's files (embedded data).
pub(crate) fn holds_embedded_data(dir: &std::path::Path) -> bool {
    dir.join("conf").exists()
}

/// Runs one admin command on the data directory: through the running server's admin socket
/// if there is one (the change applies at once), else on the store directly.
pub async fn admin(
    config: ServerConfig,
    command: AdminCommand,
    operator: &str,
) -> Result<String, crate::Error> {
    use crate::accounts::socket::{call, Reached};
    let reached = call(&config.data_dir, operator, command.clone())
        .await
        .map_err(|e| {
            crate::Error::Config(format!(
                "cannot reach the server's admin socket in {}: {e}",
                config.data_dir.display()
            ))
        })?;
    match reached {
        Reached::Answer(answer) => Ok(answer?),
        Reached::NoServer => {
            let dir = config.data_dir.clone();
            let services = Services::open(config).await.map_err(|e| match e {
                crate::Error::Storage(crate::storage::StorageError::Io(m)) if m.contains("in use") => {
                    crate::Error::Config(format!(
                        "a fieldsync server holds {} but its admin socket does not answer; if it is starting, retry in a moment",
                        dir.display()
                    ))
                }
                other => other,
            })?;
            let answer = services.run_admin(command, operator).await;
            services.close().await?;
            answer
        }
    }
}

/// Rebuilds the projection from the stored documents (`fieldsync reindex`). The store must
/// not be in use by a running server.
pub async fn reindex(
    config: ServerConfig,
    progress: impl FnMut(usize, usize) + Send + 'static,
) -> Result<usize, crate::Error> {
    let dir = config.data_dir.clone();
    if !dir.exists() {
        return Err(crate::Error::Config(format!(
            "no data directory {}; pass the one the server uses with --data",
            dir.display()
        )));
    }
    let services = Services::open(config).await.map_err(|e| match e {
        crate::Error::Storage(crate::storage::StorageError::Io(m)) if m.contains("in use") => {
            crate::Error::Config(format!(
                "a fieldsync server is using {}; stop it, run reindex, then start it again",
                dir.display()
            ))
        }
        other => other,
    })?;
    services.lock_for_maintenance("reindex").await?;
    let projection = services.projection.clone();
    let total = crate::storage::blocking(move || projection.reindex_blocking(progress)).await?;
    services.close().await?;
    Ok(total)
}

/// Serves until `shutdown` completes, then closes every WebSocket with 1001, stops the hub
/// and flushes the store.
pub async fn run(
    listener: TcpListener,
    services: Services,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), crate::Error> {
    let addr = listener.local_addr().ok();
    let sockets = TaskTracker::new();
    let closing = CancellationToken::new();
    let data_dir = services.config.data_dir.clone();
    if lock(&services.admin_listener).is_none() {
        services.prepare_to_serve().await?;
    }
    let admin_listener = lock(&services.admin_listener)
        .take()
        .expect("bound by prepare_to_serve");
    let runner: crate::accounts::socket::Runner = {
        let services = services.clone();
        Arc::new(move |command, operator| {
            let services = services.clone();
            Box::pin(async move { services.run_admin(command, &operator).await })
        })
    };
    let admin_task = tokio::spawn(crate::accounts::socket::serve(
        admin_listener,
        data_dir,
        runner,
        closing.clone(),
    ));
    if !services.accounts.has_admin() {
        tracing::warn!(
            "no admin account yet: create a station and the first admin with `fieldsync admin station add STATION` and `fieldsync admin user add NAME --role admin --station STATION --password-stdin` (add --data DIR as for serve)"
        );
    }
    if let Some(listener) = lock(&services.metrics_listener).take() {
        tracing::info!(addr = ?listener.local_addr().ok(), "serving metrics at /metrics");
        tokio::spawn(listen::serve(
            listener,
            metrics::routes(services.clone()),
            ListenConfig {
                max_connections: 16,
                ..ListenConfig::default()
            },
            closing.clone(),
            services.config.shutdown_grace,
        ));
    }
    let routes = routes(services.clone(), sockets.clone(), closing.clone());
    let listen = effective_listen_config(&services.config.listen);
    tracing::info!(addr = ?addr, max_connections = listen.max_connections, "serving");
    let closing_signal = closing.clone();
    tokio::spawn(async move {
        shutdown.await;
        closing_signal.cancel();
    });
    // Spawned rather than awaited inline: rustc cannot prove the hyper connection futures
    // Send inside another async fn (rust-lang/rust#64552), and callers (tests) spawn `run`.
    let server = listen::serve(
        listener,
        routes,
        listen,
        closing.clone(),
        services.config.shutdown_grace,
    );
    if let Err(e) = tokio::spawn(server).await {
        tracing::error!(error = %e, "the HTTP server task failed");
    }
    // The accept loop does not wait for upgraded WebSockets: close and drain them here.
    closing.cancel();
    sockets.close();
    // Waiting in a spawned task keeps this future `Send` for callers that spawn `run` (the
    // tracker's wait future borrows it, which rustc cannot yet prove Send in this position).
    let drained = tokio::spawn(async move { sockets.wait().await });
    if tokio::time::timeout(services.config.shutdown_grace, drained)
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close in time");
    }
    let _ = admin_task.await;
    services.following.cancel();
    services.hub.shutdown().await;
    services.documents.durable().await?;
    tracing::info!("stopped; store flushed");
    Ok(())
}

fn routes(
    services: Services,
    sockets: TaskTracker,
    closing: CancellationToken,
) -> warp::filters::BoxedFilter<(Box<dyn warp::Reply>,)> {
    let health = health::routes(health::Readiness::new(
        services.documents.clone(),
        services.followed.clone(),
        closing.clone(),
    ));
    let api = api::routes(&services)
        .or(households::routes(&services))
        .unify()
        .or(web::routes())
        .unify()
        .boxed();
    let sync = ws::route(services, sockets, closing);
    // A path none of the routes serve is 404 at once, whatever the method.
    let known = warp::path::full()
        .and_then(|full: warp::path::FullPath| async move {
            if crate::metrics::route_of(full.as_str()) == "other" {
                Err(warp::reject::custom(errors::NoSuchEndpoint))
            } else {
                Ok(())
            }
        })
        .untuple_one();
    known
        .and(health.or(api).unify().or(sync).unify())
        .recover(errors::recover)
        .map(|r| Box::new(r) as Box<dyn warp::Reply>)
        .with(warp::log::custom(|info| {
            crate::metrics::http_request(
                info.path(),
                info.status().as_u16(),
                info.elapsed().as_secs_f64(),
            )
        }))
        .map(|r| Box::new(r) as Box<dyn warp::Reply>)
        .boxed()
}

/// Descriptors kept free beyond the connection cap: the store's files, the admin socket and
/// its clients, logs.
const RESERVED_DESCRIPTORS: u64 = 256;

/// The listen config with the connection cap lowered, if needed, under the process's limit on
/// open files, so administration and storage always have descriptors left.
fn effective_listen_config(config: &ListenConfig) -> ListenConfig {
    let mut config = config.clone();
    if let Some(limit) = open_files_limit() {
        let room = limit.saturating_sub(RESERVED_DESCRIPTORS).max(16) as usize;
        if config.max_connections > room {
            tracing::warn!(
                configured = config.max_connections,
                open_files_limit = limit,
                using = room,
                "--max-connections is above what the open-files limit allows; lowered (raise the limit with `ulimit -n` or LimitNOFILE= to allow more)"
            );
            config.max_connections = room;
        }
    }
    config
}

/// A `Vm*` figure (e.g. `VmRSS:`, `VmHWM:`) of a process from /proc, in KiB: this process
/// when `pid` is `None`. For benchmarks and diagnostics (Linux).
pub fn process_memory_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The soft limit on open files of this process (Linux), if it can be read.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn bind_admin(data_dir: &std::path::Path) -> Result<tokio::net::UnixListener, crate::Error> {
    crate::accounts::socket::bind(data_dir).map_err(|e| {
        crate::Error::Config(format!(
            "cannot create the admin socket in {}: {e}; use a shorter --data path or check its permissions",
            data_dir.display()
        ))
    })
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds `addr`, with a message that says what to do when the port is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        crate::Error::Config(format!(
            "cannot listen on {addr}: {e}; is another server running? choose another address with --listen"
        ))
    })
}
