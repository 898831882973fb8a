//! The PostgreSQL backend of the storage seam, for deployments that outgrow one machine
//! (sled stays the embedded default). So far it holds the document half
//! ([`DocumentStore`]): chunks, unsettled marks, compaction and sync states, in tables with
//! a schema version that is migrated on connect; the server does not use it yet (the
//! accounts, change log and projection tables follow). Every call that writes commits its
//! own transaction, so a write is durable when it returns and [`DocumentStore::flush`] has
//! nothing left to do. Must not: be called on the async reactor (its calls block, like
//! sled's), or put anything but ids and bytes in a log line.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::documents::DocumentStore;
use super::keys::{ChunkKey, ChunkKind};
use super::{Result, StorageError, StoredDocument};
use crate::ids::{DocumentId, StorageId};

/// The schema this binary writes. A database at a newer version is refused.
pub const SCHEMA_VERSION: i32 = 8;

/// Migration `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: documents.
    "CREATE TABLE chunks (
         doc uuid NOT NULL,
         kind smallint NOT NULL,
         hash bytea NOT NULL,
         data bytea NOT NULL,
         PRIMARY KEY (doc, kind, hash)
     );
     CREATE TABLE unsettled (doc uuid PRIMARY KEY);
     CREATE TABLE sync_states (
         doc uuid NOT NULL,
         peer text NOT NULL,
         state bytea NOT NULL,
         PRIMARY KEY (doc, peer)
     );",
    // 2: the change log (`changelog::postgres`): one row per accepted change, readable per
    // document and in server order (the change feed), and actor bindings.
    "CREATE SEQUENCE change_seq;
     CREATE TABLE provenance (
         seq bigint PRIMARY KEY,
         doc uuid NOT NULL,
         hash text NOT NULL,
         actor text NOT NULL,
         device text,
         officer text NOT NULL,
         received_at_ms bigint NOT NULL,
         flagged boolean NOT NULL,
         actor_bound_to text,
         heads_after text[] NOT NULL
     );
     CREATE INDEX provenance_by_doc ON provenance (doc, seq);
     CREATE TABLE actors (actor bytea PRIMARY KEY, device text NOT NULL);",
    // 3: the account directory (`accounts::postgres`): one JSON record per key, and the
    // admin audit log.
    "CREATE TABLE directory (key text PRIMARY KEY, kind text NOT NULL, record jsonb NOT NULL);
     CREATE INDEX directory_by_kind ON directory (kind);
     CREATE SEQUENCE audit_seq;
     CREATE TABLE audit (
         seq bigint PRIMARY KEY,
         at_ms bigint NOT NULL,
         operator text NOT NULL,
         action text NOT NULL,
         detail text NOT NULL
     );",
    // 4: the staff projection (`projection::postgres`): a row per household with the
    // columns the staff queries select on, its visits, the village counters.
    "CREATE TABLE households (
         station text NOT NULL,
         id uuid NOT NULL,
         village text NOT NULL,
         updated_at_ms bigint NOT NULL,
         review_state text NOT NULL,
         row jsonb NOT NULL,
         PRIMARY KEY (station, id)
     );
     CREATE INDEX households_by_village ON households (station, village);
     CREATE INDEX households_by_change ON households (station, updated_at_ms DESC, id);
     CREATE TABLE visits (
         doc uuid NOT NULL,
         visit_id text NOT NULL,
         row jsonb NOT NULL,
         PRIMARY KEY (doc, visit_id)
     );
     CREATE TABLE village_counts (
         station text NOT NULL,
         village text NOT NULL,
         counts jsonb NOT NULL,
         PRIMARY KEY (station, village)
     );",
    // 5: named values (the server's storage id).
    "CREATE TABLE meta (name text PRIMARY KEY, value text NOT NULL);",
    // 6: the staff list's filters and the coverage figures answered from indexes
    // (`projection::postgres`): columns derived from the row, the earliest due time and
    // the number of follow-ups to do (written with the row), indexes on the row's
    // matters, follow-ups and officers for containment queries; the village counters are
    // counted from the rows from now on (a counters row every batch updates was a lock
    // every batch of a village waited on).
    "ALTER TABLE households
         ADD COLUMN quarantined boolean NOT NULL
             GENERATED ALWAYS AS (coalesce(jsonb_array_length(row->'quarantine'), 0) > 0) STORED,
         ADD COLUMN has_conflicts boolean NOT NULL
             GENERATED ALWAYS AS (coalesce((row->>'conflicts')::integer, 0) > 0) STORED,
         ADD COLUMN changed_since_approval boolean NOT NULL
             GENERATED ALWAYS AS (coalesce((row->>'changed_since_approval')::boolean, false)) STORED,
         ADD COLUMN last_visit_at_ms bigint
             GENERATED ALWAYS AS ((row->>'last_visit_at_ms')::bigint) STORED,
         ADD COLUMN visit_count integer NOT NULL
             GENERATED ALWAYS AS (coalesce((row->>'visit_count')::integer, 0)) STORED,
         ADD COLUMN open_matters jsonb NOT NULL
             GENERATED ALWAYS AS (coalesce(row->'open_matters', '{}'::jsonb)) STORED,
         ADD COLUMN first_due_ms bigint,
         ADD COLUMN follow_ups_todo integer NOT NULL DEFAULT 0;
     UPDATE households SET
         first_due_ms = (
             SELECT min((f->>'due_ms')::bigint) FROM jsonb_array_elements(row->'follow_ups') f
             WHERE f->>'status' = 'todo'),
         follow_ups_todo = (
             SELECT count(*) FROM jsonb_array_elements(row->'follow_ups') f
             WHERE f->>'status' = 'todo');
     DROP TABLE village_counts;
     CREATE INDEX households_by_due ON households (station, first_due_ms)
         WHERE first_due_ms IS NOT NULL;
     CREATE INDEX households_by_last_visit ON households (station, last_visit_at_ms);
     CREATE INDEX households_by_review ON households (station, review_state);
     CREATE INDEX households_matters ON households USING gin ((row->'matters') jsonb_path_ops);
     CREATE INDEX households_follow_ups ON households
         USING gin ((row->'follow_ups') jsonb_path_ops);
     CREATE INDEX households_officers ON households USING gin ((row->'officers') jsonb_path_ops);",
    // 7: households merged into another (`records::merge`) leave the lists and counts; the
    // survivor finds them by its id.
    "ALTER TABLE households
         ADD COLUMN merged boolean NOT NULL
             GENERATED ALWAYS AS ((row->'merged_into') IS NOT NULL) STORED,
         ADD COLUMN changed_after_merge boolean NOT NULL
             GENERATED ALWAYS AS (coalesce(jsonb_array_length(row->'after_merge'), 0) > 0) STORED;
     CREATE INDEX households_by_survivor ON households (station, (row->'merged_into'->>'into'))
         WHERE merged;",
    // 8: what the projection keeps beside each household's row (`projection::store::Kept`:
    // the authors its summary cites, digests of its visit rows), so a change re-projects it
    // without reading the household's provenance history. Rows projected before have none:
    // their next change reads it once.
    "CREATE TABLE household_kept (doc uuid PRIMARY KEY, kept jsonb NOT NULL);",
];

/// Connections kept open at most (each document actor holds one for a call at a time).
const DEFAULT_POOL_SIZE: usize = 16;

pub struct PgStore {
    pool: Pool,
    runtime: tokio::runtime::Handle,
    /// host:port/database, for messages (never the password).
    location: String,
    /// The connection holding this process's [`SERVING_LOCK`], shared or exclusive.
    holding: std::sync::Mutex<Option<deadpool_postgres::Object>>,
    /// How to open a connection outside the pool (the listener's).
    config: tokio_postgres::Config,
    /// This process among the nodes on the database (random per start): it names the
    /// sender of every notification, so a node skips its own.
    node: String,
    /// The connection of [`PgStore::with_own_transaction`], opened on first use and again
    /// after it breaks.
    own: std::sync::Mutex<Option<tokio_postgres::Client>>,
}

/// The channel on which a node announces, when a batch commits, the documents it stored
/// changes of: `NODE DOCUMENT` (ids only, never data).
const CHANGES_CHANNEL: &str = "fieldsync_changes";

/// The channel on which a node announces that it committed a change to the account
/// directory (an enrolment, a revocation, a registered household...): `NODE`.
const DIRECTORY_CHANNEL: &str = "fieldsync_directory";

/// What another node announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// It committed changes of this document.
    Changed(DocumentId),
    /// It committed a change to the account directory.
    Directory,
}

/// Notifications from the other nodes on the database, over a connection of its own. When
/// that connection ends, `notices` closes: listen again, and catch up on what was missed
/// meanwhile (notifications are not kept for a listener that is not there).
pub struct Listener {
    pub notices: tokio::sync::mpsc::Receiver<Notice>,
    /// Keeps the connection open.
    client: tokio_postgres::Client,
}

impl Listener {
    /// Whether the database answers on this connection within `limit` (a broken network
    /// may leave a connection open that nothing comes through).
    pub async fn probe(&self, limit: std::time::Duration) -> Result<()> {
        match tokio::time::timeout(limit, self.client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(db(e)),
            Err(_) => Err(StorageError::Io(format!(
                "the database did not answer within {} s",
                limit.as_secs()
            ))),
        }
    }
}

/// Notices queued for a slow follower; past it the listener waits (the database keeps
/// queueing for it).
const NOTICE_QUEUE: usize = 4096;

/// The advisory lock key ("fieldsyn") that tells servers from maintenance commands: every
/// serving process holds it shared, `reindex` and `migrate` exclusively, so neither runs
/// beside the other on one database (whichever machine they run on).
const SERVING_LOCK: i64 = 0x6669_656c_6473_796e;

/// The advisory lock key ("fieldsmi") held while the schema is migrated.
const MIGRATION_LOCK: i64 = 0x6669_656c_6473_6d69;

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`), applies the migrations this
    /// binary knows in one transaction, and refuses a schema newer than it knows. Call it
    /// inside the tokio runtime the blocking calls will use.
    pub async fn connect(url: &str) -> Result<PgStore> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            StorageError::Io(format!(
                "the database URL is not valid ({e}); expected postgres://USER@HOST:PORT/DATABASE"
            ))
        })?;
        let where_ = describe(&config);
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(DEFAULT_POOL_SIZE)
            .build()
            .map_err(|e| StorageError::Io(format!("cannot set up the database pool: {e}")))?;
        let store = PgStore {
            pool,
            runtime: tokio::runtime::Handle::current(),
            location: where_.clone(),
            holding: std::sync::Mutex::new(None),
            config,
            node: {
                let mut bytes = [0u8; 8];
                getrandom::fill(&mut bytes)
                    .map_err(|e| StorageError::Io(format!("no randomness for the node id: {e}")))?;
                hex::encode(bytes)
            },
            own: std::sync::Mutex::new(None),
        };
        store.migrate().await.map_err(|e| match e {
            StorageError::Io(why) => StorageError::Io(format!(
                "the database at {where_} is not usable: {why}; check that PostgreSQL is running and the URL is right"
            )),
            other => other,
        })?;
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| StorageError::Io(format!("no database connection: {e}")))
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db)?;
        // Nodes starting together on a fresh database: one migrates, the others wait for it
        // (two concurrent `CREATE TABLE IF NOT EXISTS` can both try to create the table).
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(db)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS fieldsync_schema (version integer NOT NULL);
             LOCK TABLE fieldsync_schema IN EXCLUSIVE MODE;",
        )
        .await
        .map_err(db)?;
        let current: i32 = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM fieldsync_schema",
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        if current > SCHEMA_VERSION {
            return Err(StorageError::Io(format!(
                "its schema is at version {current}, newer than this fieldsync knows ({SCHEMA_VERSION}); upgrade fieldsync"
            )));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(migration).await.map_err(db)?;
            tx.execute(
                "INSERT INTO fieldsync_schema (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )
            .await
            .map_err(db)?;
            tracing::info!(version = i + 1, "database schema migrated");
        }
        tx.commit().await.map_err(db)
    }

    /// The server's storage id (what devices remember their sync states against), created
    /// on first use. Several nodes on one database share it.
    pub async fn storage_id(&self) -> Result<StorageId> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO meta (name, value) VALUES ('storage_id', $1) ON CONFLICT DO NOTHING",
                &[&StorageId::random().as_str()],
            )
            .await
            .map_err(db)?;
        let text: String = client
            .query_one("SELECT value FROM meta WHERE name = 'storage_id'", &[])
            .await
            .map_err(db)?
            .get(0);
        StorageId::new(text)
            .ok_or_else(|| StorageError::Corrupt("the stored storage id is not valid".into()))
    }

    /// Takes `id` as the server's storage id (`fieldsync migrate` keeps the source's, so
    /// devices' sync states stay true).
    pub async fn adopt_storage_id(&self, id: &StorageId) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO meta (name, value) VALUES ('storage_id', $1)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[&id.as_str()],
            )
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Tells the other nodes, when the transaction `c` is in commits, that the account
    /// directory changed (for `accounts::postgres`).
    pub async fn notify_directory_changed(&self, c: &Client) -> Result<()> {
        c.execute(
            "SELECT pg_notify($1, $2)",
            &[&DIRECTORY_CHANNEL, &self.node],
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Listens for the other nodes' notifications (see [`Listener`]).
    pub async fn listen(&self) -> Result<Listener> {
        use futures_util::StreamExt;
        let (client, mut connection) = self.config.connect(NoTls).await.map_err(|e| {
            StorageError::Io(format!(
                "cannot open the listener's connection to {}: {e}",
                self.location
            ))
        })?;
        let (tx, notices) = tokio::sync::mpsc::channel(NOTICE_QUEUE);
        let own = format!("{} ", self.node);
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                        if n.payload().starts_with(&own) || n.payload() == own.trim_end() {
                            continue;
                        }
                        if n.channel() == DIRECTORY_CHANNEL {
                            if tx.send(Notice::Directory).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let doc = n
                            .payload()
                            .split_once(' ')
                            .and_then(|(_, d)| d.parse::<DocumentId>().ok());
                        match doc {
                            Some(doc) => {
                                if tx.send(Notice::Changed(doc)).await.is_err() {
                                    return;
                                }
                            }
                            None => {
                                tracing::warn!(payload = %n.payload(), "an unreadable notification; ignored")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the database listener's connection failed");
                        return;
                    }
                }
            }
        });
        client
            .batch_execute(&format!(
                "LISTEN {CHANGES_CHANNEL}; LISTEN {DIRECTORY_CHANNEL}"
            ))
            .await
            .map_err(db)?;
        Ok(Listener { notices, client })
    }

    /// Holds the serving lock (shared with the other servers on this database) for as long
    /// as this store lives. Refused while a maintenance command runs.
    pub async fn hold_serving_lock(&self) -> Result<()> {
        self.hold(
            "SELECT pg_try_advisory_lock_shared($1)",
            format!(
                "a maintenance command (reindex or migrate) is running on the database at {}; start the server once it has finished",
                self.location
            ),
        )
        .await
    }

    /// Holds the serving lock alone for as long as this store lives: refused while any
    /// server uses the database.
    pub async fn lock_for_maintenance(&self, command: &str) -> Result<()> {
        self.hold(
            "SELECT pg_try_advisory_lock($1)",
            format!(
                "a fieldsync server is using the database at {}; stop it (every server on that database), run {command}, then start it again",
                self.location
            ),
        )
        .await
    }

    async fn hold(&self, query: &str, refused: String) -> Result<()> {
        let client = self.client().await?;
        let granted: bool = client
            .query_one(query, &[&SERVING_LOCK])
            .await
            .map_err(db)?
            .get(0);
        if !granted {
            return Err(StorageError::Io(refused));
        }
        *self.holding.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
        Ok(())
    }

    /// The document ids a query's first column holds.
    fn doc_ids(&self, query: &'static str) -> Result<Vec<DocumentId>> {
        self.with_client(move |c| {
            Box::pin(async move {
                let rows = c.query(query, &[]).await.map_err(db)?;
                Ok(rows
                    .iter()
                    .map(|r| DocumentId::from_bytes(*r.get::<_, uuid::Uuid>(0).as_bytes()))
                    .collect())
            })
        })
    }

    /// Where the database is, as host:port/database (no credentials), for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The schema version the database is at.
    pub async fn schema_version(&self) -> Result<i32> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM fieldsync_schema",
                &[],
            )
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.runtime.block_on(f)
    }

    /// Runs `f` with a connection, blocking this (blocking) thread until it is done: the
    /// connection of the batch open on this thread (see [`DocumentStore::begin_batch`]), or
    /// a pooled one. For every layer's PostgreSQL backend (their tables are created by this
    /// store's migrations).
    pub fn with_client<T>(&self, f: impl for<'c> FnOnce(&'c Client) -> Query<'c, T>) -> Result<T> {
        match BATCH.with(|b| b.borrow_mut().take()) {
            Some(open) => {
                let out = self.block_on(f(&open));
                BATCH.with(|b| *b.borrow_mut() = Some(open));
                out
            }
            None => self.block_on(async {
                let client = self.client().await?;
                f(&client).await
            }),
        }
    }

    /// Like [`PgStore::with_client`], all or nothing: inside the batch open on this thread
    /// (it commits with it), else in a transaction of its own that commits when `f`
    /// succeeds and rolls back when it fails.
    pub fn with_transaction<T>(
        &self,
        f: impl for<'c> FnOnce(&'c Client) -> Query<'c, T>,
    ) -> Result<T> {
        if BATCH.with(|b| b.borrow().is_some()) {
            return self.with_client(f);
        }
        self.block_on(async {
            let client = self.client().await?;
            client.batch_execute("BEGIN").await.map_err(db)?;
            match f(&client).await {
                Ok(out) => {
                    client.batch_execute("COMMIT").await.map_err(db)?;
                    Ok(out)
                }
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    Err(e)
                }
            }
        })
    }
}

impl PgStore {
    /// Runs `f` in a transaction of its own on a connection outside the pool, whatever batch
    /// is open on this thread: it commits when `f` succeeds. For work done while holding a
    /// lock that a batch's holder may wait for (the account directory's write lock, which
    /// a registration takes inside its document's batch): taking a pooled connection there
    /// would wait for one held by such a batch once the pool is exhausted, a deadlock. One
    /// connection, so callers take turns (they hold that lock anyway).
    pub fn with_own_transaction<T>(
        &self,
        f: impl for<'c> FnOnce(&'c Client) -> Query<'c, T>,
    ) -> Result<T> {
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        self.block_on(async {
            if own.as_ref().is_none_or(|c| c.is_closed()) {
                let (client, connection) =
                    self.config.connect(NoTls).await.map_err(|e| {
                        StorageError::Io(format!(
                            "cannot connect to the database at {}: {e}",
                            self.location
                        ))
                    })?;
                self.runtime.spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::warn!(error = %e, "the account directory's database connection ended");
                    }
                });
                *own = Some(client);
            }
            let client = own.as_ref().expect("connected above");
            client.batch_execute("BEGIN").await.map_err(db)?;
            match f(client).await {
                Ok(out) => {
                    client.batch_execute("COMMIT").await.map_err(db)?;
                    Ok(out)
                }
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    Err(e)
                }
            }
        })
    }
}

/// The connection type the backends' queries get.
pub type Client = tokio_postgres::Client;

/// What a backend's query closure returns.
pub type Query<'c, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + 'c>>;

thread_local! {
    /// The connection of the accepted batch open on this (blocking) thread, in a transaction
    /// (see [`DocumentStore::begin_batch`]).
    static BATCH: std::cell::RefCell<Option<deadpool_postgres::Object>> =
        const { std::cell::RefCell::new(None) };
}

/// A database error as a storage error (for the other layers' PostgreSQL backends).
pub fn database_error(e: tokio_postgres::Error) -> StorageError {
    db(e)
}

impl DocumentStore for PgStore {
    fn load(&self, doc: DocumentId) -> Result<StoredDocument> {
        self.with_client(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT kind, hash, data FROM chunks WHERE doc = $1 ORDER BY kind, hash",
                        &[&uuid(doc)],
                    )
                    .await
                    .map_err(db)?;
                let mut chunks = Vec::with_capacity(rows.len());
                for row in rows {
                    let kind = match row.get::<_, i16>(0) {
                        1 => ChunkKind::Snapshot,
                        2 => ChunkKind::Incremental,
                        other => {
                            return Err(StorageError::Corrupt(format!(
                                "document {doc}: a chunk of unknown kind {other}"
                            )))
                        }
                    };
                    let hash: [u8; 32] = row.get::<_, Vec<u8>>(1).try_into().map_err(|_| {
                        StorageError::Corrupt(format!(
                            "document {doc}: a chunk hash is not 32 bytes"
                        ))
                    })?;
                    chunks.push((ChunkKey::new(doc, kind, hash), row.get::<_, Vec<u8>>(2)));
                }
                Ok(StoredDocument { chunks })
            })
        })
    }

    fn exists(&self, doc: DocumentId) -> Result<bool> {
        self.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt("SELECT 1 FROM chunks WHERE doc = $1 LIMIT 1", &[&uuid(doc)])
                    .await
                    .map_err(db)?;
                Ok(row.is_some())
            })
        })
    }

    fn list(&self) -> Result<Vec<DocumentId>> {
        self.doc_ids("SELECT DISTINCT doc FROM chunks ORDER BY doc")
    }

    fn put_change(&self, doc: DocumentId, bytes: &[u8]) -> Result<ChunkKey> {
        use sha2::{Digest, Sha256};
        let key = ChunkKey::new(doc, ChunkKind::Incremental, Sha256::digest(bytes).into());
        let bytes = bytes.to_vec();
        let node = self.node.clone();
        self.with_transaction(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO unsettled (doc) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&uuid(doc)],
                )
                .await
                .map_err(db)?;
                insert_chunk(c, &key, &bytes).await?;
                // Delivered to the other nodes when the batch commits (never if it does not).
                c.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&CHANGES_CHANNEL, &format!("{node} {doc}")],
                )
                .await
                .map_err(db)?;
                Ok(key)
            })
        })
    }

    fn settle(&self, doc: DocumentId) -> Result<()> {
        self.with_client(move |c| {
            Box::pin(async move {
                c.execute("DELETE FROM unsettled WHERE doc = $1", &[&uuid(doc)])
                    .await
                    .map_err(db)?;
                Ok(())
            })
        })
    }

    fn unsettled(&self) -> Result<Vec<DocumentId>> {
        self.doc_ids("SELECT doc FROM unsettled ORDER BY doc")
    }

    fn compact(
        &self,
        doc: DocumentId,
        heads_hash: [u8; 32],
        snapshot: &[u8],
        replaced: &[ChunkKey],
    ) -> Result<ChunkKey> {
        let key = ChunkKey::new(doc, ChunkKind::Snapshot, heads_hash);
        let snapshot = snapshot.to_vec();
        let replaced: Vec<ChunkKey> = replaced.iter().filter(|k| **k != key).copied().collect();
        self.with_transaction(move |c| {
            Box::pin(async move {
                for old in &replaced {
                    c.execute(
                        "DELETE FROM chunks WHERE doc = $1 AND kind = $2 AND hash = $3",
                        &[&uuid(old.doc), &(old.kind as i16), &&old.hash[..]],
                    )
                    .await
                    .map_err(db)?;
                }
                insert_chunk(c, &key, &snapshot).await?;
                Ok(key)
            })
        })
    }

    fn sync_state(&self, doc: DocumentId, peer: &StorageId) -> Result<Option<Vec<u8>>> {
        let peer = peer.to_string();
        self.with_client(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT state FROM sync_states WHERE doc = $1 AND peer = $2",
                        &[&uuid(doc), &peer],
                    )
                    .await
                    .map_err(db)?;
                Ok(row.map(|r| r.get(0)))
            })
        })
    }

    fn put_sync_state(&self, doc: DocumentId, peer: &StorageId, state: &[u8]) -> Result<()> {
        let (peer, state) = (peer.to_string(), state.to_vec());
        self.with_client(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO sync_states (doc, peer, state) VALUES ($1, $2, $3)
                     ON CONFLICT (doc, peer) DO UPDATE SET state = excluded.state",
                    &[&uuid(doc), &peer, &state],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
    }

    fn begin_batch(&self) -> Result<()> {
        let open = self.block_on(async {
            let client = self.client().await?;
            client.batch_execute("BEGIN").await.map_err(db)?;
            Ok(client)
        })?;
        if let Some(stale) = BATCH.with(|b| b.borrow_mut().replace(open)) {
            // A batch left open by a panic: never commit what it held.
            let _ = self.block_on(async { stale.batch_execute("ROLLBACK").await.map_err(db) });
        }
        Ok(())
    }

    fn end_batch(&self, commit: bool) -> Result<()> {
        let Some(open) = BATCH.with(|b| b.borrow_mut().take()) else {
            return Ok(());
        };
        self.block_on(async {
            if commit {
                open.batch_execute("COMMIT").await.map_err(db)
            } else {
                open.batch_execute("ROLLBACK").await.map_err(db)
            }
        })
    }

    fn flush(&self) -> Result<()> {
        Ok(()) // what was written is committed: by its own transaction or its batch's
    }

    fn durable(&self) -> super::documents::Durable {
        Box::pin(std::future::ready(Ok(())))
    }

    fn durable_here(&self) -> Option<Result<()>> {
        Some(Ok(()))
    }
}

async fn insert_chunk(c: &Client, key: &ChunkKey, data: &[u8]) -> Result<()> {
    // Content-addressed: the same key always holds the same bytes, so a second insert of
    // it (a re-sent change, a repeated compaction) changes nothing.
    c.execute(
        "INSERT INTO chunks (doc, kind, hash, data) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
        &[&uuid(key.doc), &(key.kind as i16), &&key.hash[..], &data],
    )
    .await
    .map_err(db)?;
    Ok(())
}

fn uuid(doc: DocumentId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*doc.as_bytes())
}

fn db(e: tokio_postgres::Error) -> StorageError {
    // The server's own message ("relation … does not exist", "permission denied …") says
    // more than tokio-postgres's summary ("db error").
    match e.as_db_error() {
        Some(d) => StorageError::Io(format!("database: {} ({})", d.message(), d.code().code())),
        None => StorageError::Io(format!("database: {e}")),
    }
}

/// Host and port of a configuration, for messages (never the password).
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_dbname() {
        Some(db) => format!("{host}:{port}/{db}"),
        None => format!("{host}:{port}"),
    }
}

/// A throwaway PostgreSQL cluster for tests (the unit tests here and the integration
/// suite): Debian's `postgresql` binaries (`initdb`, `pg_ctl`), a directory the caller
/// owns, a free loopback port, stopped (immediately) on drop. As root the cluster runs as
/// the `postgres` user, as PostgreSQL requires. Not for production use.
#[doc(hidden)]
pub mod testing {
    use std::path::PathBuf;
    use std::process::Command;

    pub struct Cluster {
        data: PathBuf,
        pub url: String,
        /// The server's options (its port), to start it again the same way.
        options: String,
        running: bool,
    }

    fn bin(name: &str) -> PathBuf {
        let on_path = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(name))
            .find(|p| p.is_file());
        if let Some(p) = on_path {
            return p;
        }
        // Debian keeps the server binaries out of PATH, one folder per major version.
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().join("bin").join(name))
                    .collect()
            })
            .unwrap_or_default();
        versions.retain(|p| p.is_file());
        versions.sort();
        versions.pop().unwrap_or_else(|| {
            panic!("PostgreSQL's {name} is missing: run tests/run-all.sh (it installs Debian's postgresql)")
        })
    }

    fn as_root() -> bool {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }

    fn run(program: PathBuf, args: &[&str]) {
        let mut cmd = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd.args(args).output().expect("PostgreSQL's tools run");
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    impl Cluster {
        /// [`Cluster::start_in`] off the async reactor (it runs `initdb` and `pg_ctl`).
        pub async fn start(dir: PathBuf) -> Cluster {
            tokio::task::spawn_blocking(move || Cluster::start_in(dir))
                .await
                .expect("the cluster starts")
        }

        /// Starts a cluster in `dir` (created; it must not exist yet).
        pub fn start_in(dir: PathBuf) -> Cluster {
            std::fs::create_dir_all(&dir).unwrap();
            let data = dir.join("pg");
            if as_root() {
                let status = Command::new("chown")
                    .args(["postgres", &dir.display().to_string()])
                    .status()
                    .unwrap();
                assert!(status.success());
            }
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let data_s = data.display().to_string();
            run(
                bin("initdb"),
                &[
                    "-D",
                    &data_s,
                    "-U",
                    "fieldsync",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
            );
            let mut cluster = Cluster {
                data,
                url: format!("postgres://fieldsync@127.0.0.1:{port}/postgres"),
                options: format!("-p {port} -k {data_s} -c listen_addresses=127.0.0.1 -c fsync=on"),
                running: false,
            };
            cluster.start_again();
            cluster
        }

        /// Stops the server at once, as a crash or a lost machine would (`-m immediate`).
        pub fn stop(&mut self) {
            let data_s = self.data.display().to_string();
            run(bin("pg_ctl"), &["-D", &data_s, "-m", "immediate", "stop"]);
            self.running = false;
        }

        /// Starts the server again, on the same port, and waits until it takes connections.
        pub fn start_again(&mut self) {
            let data_s = self.data.display().to_string();
            run(
                bin("pg_ctl"),
                &[
                    "-D",
                    &data_s,
                    "-o",
                    &self.options,
                    "-w",
                    "-l",
                    &format!("{data_s}/log"),
                    "start",
                ],
            );
            self.running = true;
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            if self.running {
                self.stop();
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::testing::Cluster;
    use super::*;

    /// Runs `f` on a blocking thread with a store connected to a fresh throwaway cluster
    /// (migrated), which stops when `f` returns: what each layer's conformance run needs.
    pub(crate) async fn on_fresh_database<T: Send + 'static>(
        f: impl FnOnce(std::sync::Arc<PgStore>) -> T + Send + 'static,
    ) -> T {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path().join("cluster")).await;
        let store = std::sync::Arc::new(PgStore::connect(&cluster.url).await.unwrap());
        let out = tokio::task::spawn_blocking(move || f(store)).await.unwrap();
        drop(cluster);
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_postgres_store_conforms_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path().join("cluster")).await;
        let store = PgStore::connect(&cluster.url).await.unwrap();
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
        let store = tokio::task::spawn_blocking(move || {
            crate::storage::documents::tests::run_all(&store);
            store
        })
        .await
        .unwrap();
        drop(store);
        // Connecting again applies nothing and keeps the data.
        let again = PgStore::connect(&cluster.url).await.unwrap();
        assert_eq!(again.schema_version().await.unwrap(), SCHEMA_VERSION);
        let unsettled = tokio::task::spawn_blocking(move || again.unsettled())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !unsettled.is_empty(),
            "the suite's last documents are still marked: reconnecting reset nothing"
        );
        drop(cluster);
    }

    /// A database the previous schema (5) holds households in is migrated with them: the
    /// new columns are filled from each row, and the counters counted from them agree
    /// with the row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn households_stored_at_schema_5_are_migrated_with_their_figures() {
        use crate::projection::{ProjectionStore, VillageCounts};
        use crate::records::{FollowUpBrief, MatterBrief};
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path().join("cluster")).await;
        let (client, connection) = tokio_postgres::connect(&cluster.url, NoTls).await.unwrap();
        let connection = tokio::spawn(connection);
        client
            .batch_execute("CREATE TABLE fieldsync_schema (version integer NOT NULL)")
            .await
            .unwrap();
        for (i, migration) in MIGRATIONS[..5].iter().enumerate() {
            client.batch_execute(migration).await.unwrap();
            client
                .execute(
                    "INSERT INTO fieldsync_schema (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await
                .unwrap();
        }
        let doc = crate::projection::store::tests::household_doc("7", 2);
        let mut row = crate::projection::store::tests::household_row("north", "east", 10, &doc);
        row.summary.visits.clear();
        let follow_up = |status: &str, due_ms: i64| FollowUpBrief {
            id: format!("{status}{due_ms}"),
            task: "call back".into(),
            owner: "amy".into(),
            status: status.into(),
            due_ms: Some(due_ms),
        };
        row.summary.follow_ups = vec![
            follow_up("todo", 5),
            follow_up("todo", 3),
            follow_up("done", 1),
        ];
        row.summary.matters = vec![MatterBrief {
            id: "m".into(),
            kind: "complaint".into(),
            status: "open".into(),
            risk: "low".into(),
            open: true,
            description: String::new(),
            confidential: false,
            raised_at_ms: None,
            status_set_at_ms: None,
        }];
        row.summary.open_matters = [("complaint".to_string(), 1)].into();
        row.summary.conflicts = 1;
        client
            .execute(
                "INSERT INTO households (station, id, village, updated_at_ms, review_state, row)
                 VALUES ('north', $1, 'east', 10, 'received', $2)",
                &[
                    &uuid::Uuid::from_bytes(*row.id.as_bytes()),
                    &serde_json::to_value(&row).unwrap(),
                ],
            )
            .await
            .unwrap();
        drop(client);
        let _ = connection.await;

        let store = std::sync::Arc::new(PgStore::connect(&cluster.url).await.unwrap());
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
        let rows = crate::projection::postgres::PgProjection::new(store);
        let (counts, overdue_at) = tokio::task::spawn_blocking(move || {
            // The earliest due follow-up to do (3) was filled in: overdue from 4 on.
            let overdue_at = |now_ms| {
                let filter = crate::projection::Filter {
                    overdue: Some(true),
                    ..Default::default()
                };
                rows.list(&crate::projection::ListQuery {
                    station: "north",
                    villages: None,
                    filter: &filter,
                    now_ms,
                    after: None,
                    limit: 10,
                })
                .unwrap()
                .total
            };
            (
                rows.counts("north", "east").unwrap(),
                (overdue_at(3), overdue_at(4)),
            )
        })
        .await
        .unwrap();
        assert_eq!(overdue_at, (0, 1));
        let mut expected = VillageCounts::default();
        expected.add(&row, 1);
        assert_eq!(counts, expected);
        assert_eq!(
            (
                counts.visits,
                counts.follow_ups_todo,
                counts.households_with_conflicts
            ),
            (2, 2, 1)
        );
        drop(cluster);
    }

    /// What the hub writes for one accepted batch (chunk with its mark, a provenance row)
    /// commits or rolls back as one: a failure after the chunk and before the rows leaves
    /// neither.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_accepted_batch_commits_or_rolls_back_as_one() {
        use crate::changelog::postgres::PgChangeLog;
        use crate::changelog::{ChangeLogStore, ProvenanceRow};
        on_fresh_database(|store| {
            let log = PgChangeLog::new(store.clone());
            let row = |doc: DocumentId, seq: u64| ProvenanceRow {
                seq,
                doc,
                hash: hex::encode([1; 32]),
                actor: hex::encode([2; 16]),
                device: None,
                user: crate::auth::UserName::new("amy").unwrap(),
                received_at: crate::ids::Timestamp::from_millis(1),
                flagged: false,
                actor_bound_to: None,
                heads_after: Vec::new(),
            };
            let doc = DocumentId::random();
            store.begin_batch().unwrap();
            store.put_change(doc, b"chunk").unwrap();
            assert!(store.exists(doc).unwrap(), "the batch reads its own writes");
            log.append(&row(doc, log.next_seq().unwrap())).unwrap();
            store.end_batch(false).unwrap(); // what a failure after the chunk does
            assert!(!store.exists(doc).unwrap());
            assert!(log.history(doc).unwrap().is_empty());
            assert!(store.unsettled().unwrap().is_empty());

            store.begin_batch().unwrap();
            store.put_change(doc, b"chunk").unwrap();
            log.append(&row(doc, log.next_seq().unwrap())).unwrap();
            store.end_batch(true).unwrap();
            assert!(store.exists(doc).unwrap());
            assert_eq!(log.history(doc).unwrap().len(), 1);
            assert_eq!(store.unsettled().unwrap(), vec![doc]);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_newer_schema_or_no_database_is_refused_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start(dir.path().join("cluster")).await;
        let store = PgStore::connect(&cluster.url).await.unwrap();
        store
            .client()
            .await
            .unwrap()
            .execute(
                "INSERT INTO fieldsync_schema (version) VALUES ($1)",
                &[&(SCHEMA_VERSION + 1)],
            )
            .await
            .unwrap();
        let err = PgStore::connect(&cluster.url)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("newer than this fieldsync knows"), "{err}");
        assert!(err.contains("upgrade fieldsync"), "{err}");
        assert!(!err.contains('\n'), "{err}");

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = PgStore::connect(&format!("postgres://fieldsync@127.0.0.1:{port}/x"))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
        assert!(err.contains("check that PostgreSQL is running"), "{err}");
        drop(cluster);
    }
}
