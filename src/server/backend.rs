//! One storage backend opened whole: the embedded sled store in a data directory, or
//! PostgreSQL at a URL, with the store each layer keeps its rows in (documents, account
//! directory, change log, projection rows) and the server's storage id. The server builds
//! its layers on it, and `fieldsync migrate` copies one backend into another through it.
//! Must not: hold layer logic (accounts, change log, projection stay in their modules), or
//! choose a backend for the caller.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::accounts::store::{DirectoryStore, SledDirectory};
use crate::changelog::store::{ChangeLogStore, SledChangeLog};
use crate::ids::StorageId;
use crate::projection::{ProjectionStore, SledProjection};
use crate::storage::documents::DocumentStore;
use crate::storage::postgres::PgStore;
use crate::storage::{StorageError, Store, StoreConfig};

/// Where a station's data is kept: a data directory (embedded sled) or a PostgreSQL URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Directory(PathBuf),
    Database(String),
}

impl Place {
    /// `postgres://…` or `postgresql://…` is a database; anything else a directory.
    pub fn parse(s: &str) -> Place {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Place::Database(s.to_string())
        } else {
            Place::Directory(PathBuf::from(s))
        }
    }
}

/// The engine under a [`Backend`].
#[derive(Clone)]
pub enum Engine {
    Embedded(Store),
    Postgres(Arc<PgStore>),
}

/// Every layer's store on one engine.
#[derive(Clone)]
pub struct Backend {
    pub engine: Engine,
    pub documents: Arc<dyn DocumentStore>,
    pub directory: Arc<dyn DirectoryStore>,
    pub changelog: Arc<dyn ChangeLogStore>,
    pub rows: Arc<dyn ProjectionStore>,
}

impl Backend {
    /// Opens (or creates) the embedded store in `dir`.
    pub fn open_embedded(dir: &Path, config: &StoreConfig) -> Result<Backend, StorageError> {
        Ok(Backend::embedded(Store::open(dir, config)?))
    }

    pub fn embedded(store: Store) -> Backend {
        Backend {
            documents: Arc::new(store.clone()),
            directory: Arc::new(SledDirectory::new(store.clone())),
            changelog: Arc::new(SledChangeLog::new(store.clone())),
            rows: Arc::new(SledProjection::new(store.clone())),
            engine: Engine::Embedded(store),
        }
    }

    /// Connects to PostgreSQL at `url`, applying its migrations.
    pub async fn connect(url: &str) -> Result<Backend, StorageError> {
        let pg = Arc::new(PgStore::connect(url).await?);
        Ok(Backend {
            documents: pg.clone(),
            directory: Arc::new(crate::accounts::postgres::PgDirectory::new(pg.clone())),
            changelog: Arc::new(crate::changelog::postgres::PgChangeLog::new(pg.clone())),
            rows: Arc::new(crate::projection::postgres::PgProjection::new(pg.clone())),
            engine: Engine::Postgres(pg),
        })
    }

    /// The server's storage id, created on first use.
    pub async fn storage_id(&self) -> Result<StorageId, StorageError> {
        match &self.engine {
            Engine::Embedded(s) => s.storage_id().await,
            Engine::Postgres(p) => p.storage_id().await,
        }
    }

    /// Takes `id` as the server's storage id.
    pub async fn adopt_storage_id(&self, id: &StorageId) -> Result<(), StorageError> {
        match &self.engine {
            Engine::Embedded(s) => s.adopt_storage_id(id).await,
            Engine::Postgres(p) => p.adopt_storage_id(id).await,
        }
    }

    /// The embedded store, if that is the engine.
    pub fn embedded_store(&self) -> Option<Store> {
        match &self.engine {
            Engine::Embedded(s) => Some(s.clone()),
            Engine::Postgres(_) => None,
        }
    }

    /// What it is, for messages: `the data directory DIR` or `the database HOST:PORT/DB`.
    pub fn describe(&self) -> String {
        match &self.engine {
            Engine::Embedded(s) => format!("the data directory {}", s.dir().display()),
            Engine::Postgres(p) => format!("the database {}", p.location()),
        }
    }
}
