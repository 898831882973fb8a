//! The live account service: the [`Directory`] in memory, kept in step with the store, and
//! everything that changes it or asks it.
//!
//! Owns: loading the directory at start, admin commands and their audit log (`admin`),
//! device enrolment, staff sign-in with throttling and sessions, token authentication, the
//! registry of live connections (so a revocation closes them at once), and the hub's
//! [`Authorizer`] seam (access decisions, registration of new households). What happens to
//! accepted changes (provenance, the change feed, catalogs) is `changelog`'s. The admin
//! socket (`socket`) lets the CLI reach a running server. Must not: speak HTTP (that is
//! `server`), call sled directly (that is `storage`), or log a secret.

pub mod admin;
mod hasher;
pub mod postgres;
pub mod socket;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use automerge::Automerge;

use crate::auth::directory::{Device, Op, RecordKey, Session};
use crate::auth::secrets::{self, Secret, SecretHash};
use crate::auth::throttle::{Throttle, ThrottleConfig};
use crate::auth::{
    Access, AuthFailure, Authorizer, DeviceId, Directory, Principal, Record, Role, StationId,
    UserName, VillageName,
};
use crate::hub::KillSwitch;
use crate::ids::{Clock, ConnId, DocumentId, Timestamp};
use crate::protocol::CloseCode;
use crate::storage::{blocking, StorageError, Store};

pub use admin::{AdminCommand, AuditEntry};

/// Lifetimes of the things the service hands out.
#[derive(Clone, Debug)]
pub struct AccountsConfig {
    pub enrolment_code_ttl: Duration,
    pub session_ttl: Duration,
    /// `None`: device tokens last until revoked.
    pub device_token_ttl: Option<Duration>,
    /// Wrong passwords per account name. Its longest delay is short, so a guesser elsewhere
    /// cannot keep the owner out for long; the per-address throttle slows the guesser.
    pub sign_in_throttle: ThrottleConfig,
    /// Wrong passwords per client address.
    pub sign_in_address_throttle: ThrottleConfig,
    pub enrolment_throttle: ThrottleConfig,
    /// Password hashes (argon2, about 19 MiB and tens of ms each) computed at once; a
    /// sign-in beyond this is answered 503 at once instead of queueing memory.
    pub max_concurrent_password_checks: usize,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        Self {
            enrolment_code_ttl: Duration::from_secs(15 * 60),
            session_ttl: Duration::from_secs(12 * 3600),
            device_token_ttl: Some(Duration::from_secs(365 * 24 * 3600)),
            sign_in_throttle: ThrottleConfig {
                max_delay: Duration::from_secs(60),
                ..ThrottleConfig::default()
            },
            sign_in_address_throttle: ThrottleConfig {
                free_failures: 20,
                ..ThrottleConfig::default()
            },
            enrolment_throttle: ThrottleConfig {
                free_failures: 10,
                ..ThrottleConfig::default()
            },
            max_concurrent_password_checks: crate::cores(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The request is malformed or names something invalid; the text says what to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthenticated(AuthFailure),
    #[error("wrong name or password")]
    WrongPassword,
    #[error(
        "the enrolment code is not valid (wrong, used or expired); ask an admin for a new one"
    )]
    BadEnrolmentCode,
    #[error("too many failed attempts; try again in {} s", .0.as_secs().max(1))]
    Throttled(Duration),
    #[error("{0}")]
    Forbidden(String),
    /// Every password check slot is taken; the client should retry in a moment.
    #[error("the server is busy checking other sign-ins; try again in a moment")]
    Busy,
}

/// What an enrolled device receives, once.
#[derive(Debug, serde::Serialize)]
pub struct Enrolled {
    pub device_id: DeviceId,
    /// The bearer token: shown once, stored only as a hash.
    pub token: String,
    pub user: UserName,
    pub role: Role,
    pub station: StationId,
    pub villages: Vec<VillageInfo>,
    /// When the token stops working (ms since the epoch), if it expires.
    pub expires_at: Option<Timestamp>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct VillageInfo {
    pub name: VillageName,
    /// `automerge:<id>` of the village catalog.
    pub catalog_url: String,
}

/// `GET /api/v1/me`.
#[derive(Debug, serde::Serialize)]
pub struct Me {
    pub user: UserName,
    pub role: Role,
    pub station: StationId,
    pub villages: Vec<VillageInfo>,
    pub device: Option<DeviceInfo>,
    /// For staff and admins: the station's active officers and their villages (whom a
    /// follow-up can be assigned to). Empty for officers.
    pub officers: Vec<OfficerInfo>,
}

#[derive(Debug, serde::Serialize)]
pub struct OfficerInfo {
    pub name: UserName,
    pub villages: Vec<VillageName>,
}

#[derive(Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub id: DeviceId,
    pub name: String,
}

/// A signed-in staff session, as handed to the browser.
pub struct SignedIn {
    pub token: Secret,
    pub csrf: String,
    pub principal: Principal,
    pub expires_at: Timestamp,
}

/// How a request proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authenticated {
    Device(Principal),
    /// A browser session; state-changing requests must echo `csrf`.
    Session {
        principal: Principal,
        csrf: String,
    },
}

impl Authenticated {
    pub fn principal(&self) -> &Principal {
        match self {
            Authenticated::Device(p) => p,
            Authenticated::Session { principal, .. } => principal,
        }
    }
}

struct LiveConn {
    principal: Principal,
    kill: Arc<KillSwitch>,
}

#[derive(Clone)]
pub struct Accounts {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn store::DirectoryStore>,
    dir: RwLock<Directory>,
    /// Serialises directory writes (check, write batch, apply). Held only on blocking
    /// threads, never across an `.await`.
    write: Mutex<()>,
    clock: Arc<dyn Clock>,
    config: AccountsConfig,
    live: Mutex<HashMap<ConnId, LiveConn>>,
    sign_in_throttle: Mutex<Throttle>,
    sign_in_address_throttle: Mutex<Throttle>,
    enrolment_throttle: Mutex<Throttle>,
    password_checks: Arc<tokio::sync::Semaphore>,
    hasher: hasher::Hasher,
}

/// Why `who` may no longer hold a connection, if so: its user is gone or disabled, or its
/// device gone or revoked.
fn refusal(dir: &Directory, who: &Principal) -> Option<&'static str> {
    if dir.user(&who.user).is_none_or(|u| u.disabled) {
        return Some("this account has been disabled");
    }
    match &who.device {
        Some(d) if dir.device(d).is_none_or(|d| d.revoked_at.is_some()) => {
            Some("this device has been revoked")
        }
        _ => None,
    }
}

/// Removes a connection from the live registry when it ends.
pub struct LiveGuard {
    accounts: Accounts,
    conn: ConnId,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        lock(&self.accounts.inner.live).remove(&self.conn);
    }
}

impl Accounts {
    /// Loads the directory from the embedded sled store.
    pub async fn open(
        store: Store,
        clock: Arc<dyn Clock>,
        config: AccountsConfig,
    ) -> Result<Accounts, AccountsError> {
        Self::open_on(Arc::new(store::SledDirectory::new(store)), clock, config).await
    }

    /// Loads the directory from any backend of [`store::DirectoryStore`].
    pub async fn open_on(
        store: Arc<dyn store::DirectoryStore>,
        clock: Arc<dyn Clock>,
        config: AccountsConfig,
    ) -> Result<Accounts, AccountsError> {
        let s = store.clone();
        let records = blocking(move || s.load()).await?;
        let sign_in_throttle = Throttle::new(config.sign_in_throttle.clone());
        let enrolment_throttle = Throttle::new(config.enrolment_throttle.clone());
        let sign_in_address_throttle = Throttle::new(config.sign_in_address_throttle.clone());
        let password_checks = Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_password_checks.max(1),
        ));
        let hasher = hasher::Hasher::start(config.max_concurrent_password_checks)
            .map_err(|e| StorageError::Task(format!("cannot start the password threads: {e}")))?;
        Ok(Accounts {
            inner: Arc::new(Inner {
                store,
                dir: RwLock::new(Directory::from_records(records)),
                write: Mutex::new(()),
                clock,
                config,
                live: Mutex::new(HashMap::new()),
                sign_in_throttle: Mutex::new(sign_in_throttle),
                sign_in_address_throttle: Mutex::new(sign_in_address_throttle),
                enrolment_throttle: Mutex::new(enrolment_throttle),
                password_checks,
                hasher,
            }),
        })
    }

    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Whether an admin account exists (a fresh data directory has none).
    pub fn has_admin(&self) -> bool {
        read(&self.inner.dir).has_admin()
    }

    /// A read-only view of the directory for queries.
    pub fn with_directory<T>(&self, f: impl FnOnce(&Directory) -> T) -> T {
        f(&read(&self.inner.dir))
    }

    /// Checks, writes and applies directory ops under the write lock; `check` sees the
    /// current directory and returns the ops (or refuses). Durable when this returns.
    async fn commit<T: Send + 'static>(
        &self,
        check: impl FnOnce(&Directory, Timestamp) -> Result<(Vec<Op>, T), AccountsError>
            + Send
            + 'static,
        audit: Option<(String, String, String)>,
    ) -> Result<T, AccountsError> {
        let this = self.clone();
        let out = tokio::task::spawn_blocking(move || -> Result<T, AccountsError> {
            let _w = lock(&this.inner.write);
            let now = this.now();
            let (ops, out) = check(&read(&this.inner.dir), now)?;
            // The change and its audit entry: one unit.
            let audit = audit.map(|(operator, action, detail)| store::NewAudit {
                at: now,
                operator,
                action,
                detail,
            });
            this.inner.store.commit(&ops, audit.as_ref())?;
            write(&this.inner.dir).apply(&ops);
            Ok(out)
        })
        .await
        .map_err(|e| StorageError::Task(e.to_string()))??;
        self.inner.store.durable().await?;
        Ok(out)
    }

    /// Writes an entry in the audit log for an operation outside the directory (a backup:
    /// who took everything, when, and where to).
    pub async fn record_audit(
        &self,
        operator: &str,
        action: &str,
        detail: String,
    ) -> Result<(), AccountsError> {
        self.commit(
            |_, _| Ok((Vec::new(), ())),
            Some((operator.to_string(), action.to_string(), detail)),
        )
        .await
    }

    // ---- authentication ----

    /// Authenticates a bearer secret: a device token (`fsd_…`) or a session token (`fss_…`).
    pub fn authenticate(&self, secret: Option<&str>) -> Result<Authenticated, AuthFailure> {
        let secret = secret
            .filter(|s| !s.is_empty())
            .ok_or(AuthFailure::Missing)?;
        let hash = SecretHash::of(secret);
        let now = self.now();
        let dir = read(&self.inner.dir);
        if secret.starts_with(secrets::SESSION_TOKEN_PREFIX) {
            let (principal, _session) = dir.authenticate_session(&hash, now)?;
            Ok(Authenticated::Session {
                principal,
                csrf: secrets::csrf_token(secret),
            })
        } else if secret.starts_with(secrets::DEVICE_TOKEN_PREFIX) {
            dir.authenticate_device(&hash, now)
                .map(Authenticated::Device)
        } else {
            Err(AuthFailure::Invalid)
        }
    }

    /// Registers a live connection so that revoking its device or disabling its user closes
    /// it. Re-checks the credentials after registering (a revocation may have raced).
    pub fn register_connection(
        &self,
        conn: ConnId,
        principal: Principal,
        kill: Arc<KillSwitch>,
    ) -> Option<LiveGuard> {
        lock(&self.inner.live).insert(
            conn,
            LiveConn {
                principal: principal.clone(),
                kill,
            },
        );
        let guard = LiveGuard {
            accounts: self.clone(),
            conn,
        };
        let still_valid = refusal(&read(&self.inner.dir), &principal).is_none();
        still_valid.then_some(guard)
    }

    /// Reads the directory again from the store (another node changed it) and closes the
    /// live connections it no longer allows (a device revoked, a user disabled there).
    /// Returns how many were closed.
    pub async fn reload(&self) -> Result<usize, AccountsError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || -> Result<usize, AccountsError> {
            let _w = lock(&this.inner.write);
            let records = this.inner.store.load()?;
            // Under the write lock, so every record this node committed is in `records`.
            *write(&this.inner.dir) = Directory::from_records(records);
            let dir = read(&this.inner.dir);
            let mut closed = 0;
            for c in lock(&this.inner.live).values() {
                if let Some(reason) = refusal(&dir, &c.principal) {
                    c.kill.kill(CloseCode::PolicyViolation, reason);
                    closed += 1;
                }
            }
            Ok(closed)
        })
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
    }

    /// Closes every live connection matching `pred`; returns how many.
    fn close_connections(&self, pred: impl Fn(&Principal) -> bool, reason: &str) -> usize {
        let live = lock(&self.inner.live);
        let mut n = 0;
        for c in live.values().filter(|c| pred(&c.principal)) {
            c.kill.kill(CloseCode::PolicyViolation, reason);
            n += 1;
        }
        n
    }

    pub fn live_connections(&self) -> usize {
        lock(&self.inner.live).len()
    }

    // ---- enrolment ----

    /// Exchanges a one-time enrolment code for a device token. `client` keys the guessing
    /// throttle (the caller's address).
    pub async fn enroll(
        &self,
        code: &str,
        device_name: &str,
        client: &str,
    ) -> Result<Enrolled, AccountsError> {
        let device_name = device_name.trim().to_string();
        if device_name.is_empty() || device_name.chars().count() > 100 {
            return Err(AccountsError::Invalid(
                "device_name must be 1 to 100 characters".into(),
            ));
        }
        if device_name.chars().any(char::is_control) {
            // Device names are printed in admins' terminals: no escape sequences, no newlines.
            return Err(AccountsError::Invalid(
                "device_name must not contain control characters".into(),
            ));
        }
        let now = self.now();
        // Counted before the code is checked, so parallel guesses are counted too.
        lock(&self.inner.enrolment_throttle)
            .attempt(client, now)
            .map_err(AccountsError::Throttled)?;
        let code_hash = SecretHash::of(&secrets::normalise_code(code));
        let token = Secret::device_token(random_bytes()?);
        let device_id = DeviceId::from_random(random_bytes()?);
        let token_hash = token.hash();
        let ttl = self.inner.config.device_token_ttl;
        let result = self
            .commit(
                move |dir, now| {
                    let enrolment = dir
                        .enrolment(&code_hash)
                        .filter(|e| e.expires_at > now)
                        .ok_or(AccountsError::BadEnrolmentCode)?;
                    let user = dir
                        .user(&enrolment.user)
                        .filter(|u| !u.disabled)
                        .ok_or(AccountsError::BadEnrolmentCode)?;
                    let device = Device {
                        id: device_id,
                        user: user.name.clone(),
                        name: device_name,
                        token: token_hash,
                        enrolled_at: now,
                        expires_at: ttl.map(|t| now.saturating_add(t)),
                        revoked_at: None,
                    };
                    let ops = vec![
                        // Used once: the code goes in the same atomic batch as the device.
                        Op::Remove(crate::auth::RecordKey::Enrolment(code_hash)),
                        Op::Put(Record::Device(device.clone())),
                    ];
                    Ok((ops, device))
                },
                None,
            )
            .await;
        let device = match result {
            Ok(d) => d,
            Err(AccountsError::BadEnrolmentCode) => return Err(AccountsError::BadEnrolmentCode),
            Err(e) => {
                // Not a guess (storage, validation): it does not count against the caller.
                lock(&self.inner.enrolment_throttle).succeeded(client);
                return Err(e);
            }
        };
        lock(&self.inner.enrolment_throttle).succeeded(client);
        tracing::info!(device = %device.id, user = %device.user, "device enrolled");
        let dir = read(&self.inner.dir);
        let user = dir
            .user(&device.user)
            .ok_or_else(|| AccountsError::NotFound("the user vanished".into()))?;
        Ok(Enrolled {
            device_id: device.id.clone(),
            token: token.expose().to_string(),
            user: user.name.clone(),
            role: user.role,
            station: user.station.clone(),
            villages: villages_of(&dir, user.role, &user.station, &user.villages),
            expires_at: device.expires_at,
        })
    }

    // ---- staff sessions ----

    /// Signs a staff member or admin in with a password, from client address `client`.
    /// Failures are slowed down per account name and per client address (answered at once
    /// with "try again in N s"), and at most `max_concurrent_password_checks` passwords are
    /// checked at a time (beyond that: [`AccountsError::Busy`], at once).
    pub async fn sign_in(
        &self,
        name: &str,
        password: &str,
        client: &str,
    ) -> Result<SignedIn, AccountsError> {
        let now = self.now();
        // Throttle keys stay small whatever a client sends (names are at most 64 characters).
        let key: String = name.chars().take(65).collect();
        let name = key.as_str();
        // Checked before taking a slot, so a throttled guesser costs no hashing at all.
        lock(&self.inner.sign_in_throttle)
            .check(name, now)
            .map_err(AccountsError::Throttled)?;
        lock(&self.inner.sign_in_address_throttle)
            .check(client, now)
            .map_err(AccountsError::Throttled)?;
        let permit = self
            .inner
            .password_checks
            .clone()
            .try_acquire_owned()
            .map_err(|_| AccountsError::Busy)?;
        // Counted now, as failures, before the (slow) check: parallel guesses all count.
        lock(&self.inner.sign_in_throttle)
            .attempt(name, now)
            .map_err(AccountsError::Throttled)?;
        lock(&self.inner.sign_in_address_throttle)
            .attempt(client, now)
            .map_err(AccountsError::Throttled)?;
        let user = {
            let dir = read(&self.inner.dir);
            UserName::new(name).ok().and_then(|n| dir.user(&n).cloned())
        };
        let known = user.is_some();
        let phc = user
            .filter(|u| !u.disabled && u.role != Role::Officer)
            .and_then(|u| u.password.clone());
        let password = password.to_string();
        // argon2 is deliberately slow: off the reactor, on the password threads (see
        // `hasher`). An unknown name still costs one verification (against a fixed hash) so
        // timing does not reveal which names exist. The permit moves into the job: the slot
        // is held until the hash is done, even if the client went away.
        let ok = self
            .inner
            .hasher
            .run(move |memory| {
                let _permit = permit;
                match phc {
                    Some(phc) => secrets::verify_password_in(&password, &phc, memory),
                    None => {
                        let _ = secrets::verify_password_in(&password, dummy_phc(), memory);
                        false
                    }
                }
            })
            .await
            .ok_or_else(|| StorageError::Task("the password threads stopped".into()))?;
        if !ok {
            // A name nobody has may be a password typed in the wrong field: never logged.
            // Known names are logged escaped (`?`), so a newline cannot forge a log line.
            if known {
                tracing::info!(user = ?name, client = ?client, "sign-in refused: wrong password");
            } else {
                tracing::info!(client = ?client, "sign-in refused: unknown account name");
            }
            return Err(AccountsError::WrongPassword);
        }
        lock(&self.inner.sign_in_throttle).succeeded(name);
        let token = Secret::session_token(random_bytes()?);
        let csrf = secrets::csrf_token(token.expose());
        let ttl = self.inner.config.session_ttl;
        let user_name = UserName::new(name).map_err(|e| AccountsError::Invalid(e.to_string()))?;
        let token_hash = token.hash();
        let (principal, expires_at) = self
            .commit(
                move |dir, now| {
                    let user = dir
                        .user(&user_name)
                        .filter(|u| !u.disabled)
                        .ok_or(AccountsError::WrongPassword)?;
                    let mut ops: Vec<Op> = dir.expired(now).into_iter().map(Op::Remove).collect();
                    let expires_at = now.saturating_add(ttl);
                    ops.push(Op::Put(Record::Session(Session {
                        token: token_hash,
                        user: user.name.clone(),
                        created_at: now,
                        expires_at,
                    })));
                    let principal = Principal {
                        user: user.name.clone(),
                        role: user.role,
                        station: user.station.clone(),
                        device: None,
                    };
                    Ok((ops, (principal, expires_at)))
                },
                None,
            )
            .await?;
        tracing::info!(user = %principal.user, "signed in");
        Ok(SignedIn {
            token,
            csrf,
            principal,
            expires_at,
        })
    }

    /// Ends a session (idempotent).
    pub async fn sign_out(&self, session_token: &str) -> Result<(), AccountsError> {
        let hash = SecretHash::of(session_token);
        self.commit(
            move |_dir, _now| Ok((vec![Op::Remove(crate::auth::RecordKey::Session(hash))], ())),
            None,
        )
        .await
    }

    /// The caller's account, station, villages and catalogs.
    pub fn me(&self, who: &Principal) -> Result<Me, AccountsError> {
        let dir = read(&self.inner.dir);
        let user = dir
            .user(&who.user)
            .ok_or_else(|| AccountsError::NotFound("no such user".into()))?;
        let device = who
            .device
            .as_ref()
            .and_then(|d| dir.device(d))
            .map(|d| DeviceInfo {
                id: d.id.clone(),
                name: d.name.clone(),
            });
        let officers = if user.role == Role::Officer {
            Vec::new()
        } else {
            dir.users()
                .into_iter()
                .filter(|u| u.role == Role::Officer && !u.disabled && u.station == user.station)
                .map(|u| OfficerInfo {
                    name: u.name.clone(),
                    villages: u.villages.iter().cloned().collect(),
                })
                .collect()
        };
        Ok(Me {
            user: user.name.clone(),
            role: user.role,
            station: user.station.clone(),
            villages: villages_of(&dir, user.role, &user.station, &user.villages),
            device,
            officers,
        })
    }
}

/// The villages a user works with: an officer's assigned ones, a station's all for staff.
fn villages_of(
    dir: &Directory,
    role: Role,
    station: &StationId,
    assigned: &std::collections::BTreeSet<VillageName>,
) -> Vec<VillageInfo> {
    dir.villages_of(station)
        .into_iter()
        .filter(|v| role != Role::Officer || assigned.contains(&v.name))
        .map(|v| VillageInfo {
            name: v.name.clone(),
            catalog_url: v.catalog.to_url(),
        })
        .collect()
}

impl Authorizer for Accounts {
    fn access(&self, who: &Principal, doc: DocumentId) -> Access {
        read(&self.inner.dir).access(who, doc)
    }

    fn may_know_more(&self, doc: DocumentId) -> bool {
        self.inner.store.shared() && read(&self.inner.dir).household(doc).is_none()
    }

    /// Several nodes: another may have registered `doc` a moment ago, before this one
    /// reloaded its directory. One indexed lookup (made-up documents are bounded per
    /// connection).
    fn look_up(&self, doc: DocumentId) {
        match self.inner.store.record(&RecordKey::Household(doc)) {
            Ok(Some(record @ Record::Household(_))) => {
                let _w = lock(&self.inner.write);
                write(&self.inner.dir).apply(&[Op::Put(record)]);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(doc = %doc, error = %e, "cannot look up a registration another node may have made")
            }
        }
    }

    fn admit(&self, who: &Principal, doc: DocumentId, content: &Automerge) -> Result<(), String> {
        let _w = lock(&self.inner.write);
        // Registered meanwhile (another node, seen since access was decided): the stored
        // registration decides.
        let allowed_by_existing =
            |dir: &Directory| matches!(dir.access(who, doc), Access::ReadWrite);
        if read(&self.inner.dir).household(doc).is_some() {
            return if allowed_by_existing(&read(&self.inner.dir)) {
                Ok(())
            } else {
                Err("the document is registered to a village this device may not write".into())
            };
        }
        // Only a household new to the directory is read for its claim (every change of a
        // registered one passes here).
        let claim = crate::records::household_scope(content);
        let household = read(&self.inner.dir).admit_household(
            who,
            doc,
            claim.as_ref().map(|(s, v)| (s.as_str(), v.as_str())),
            self.now(),
        )?;
        // Embedded: not flushed here, the document's actor flushes the registration with the
        // chunk. PostgreSQL: committed at once, so a reload never misses it (see
        // `PgDirectory::insert_if_absent`). Insert-if-absent: two nodes registering one
        // household at once keep the first.
        let record = Record::Household(household.clone());
        let existing = self
            .inner
            .store
            .insert_if_absent(&record)
            .map_err(|e| format!("could not store the registration: {e}"))?;
        match existing {
            None => {
                write(&self.inner.dir).apply(&[Op::Put(record)]);
                tracing::info!(doc = %doc, village = %household.village, device = %household.registered_by, "household registered");
                Ok(())
            }
            Some(first) => {
                write(&self.inner.dir).apply(&[Op::Put(first)]);
                if allowed_by_existing(&read(&self.inner.dir)) {
                    Ok(())
                } else {
                    Err("the document is registered to a village this device may not write".into())
                }
            }
        }
    }
}

/// An argon2id hash verified against when the user is unknown, so that both cases cost
/// the same time.
fn dummy_phc() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        secrets::hash_password("no such user, no such password", [0; 16]).unwrap_or_default()
    })
}

/// Bytes from the operating system's generator.
fn random_bytes<const N: usize>() -> Result<[u8; N], AccountsError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b)
        .map_err(|e| StorageError::Io(format!("the OS random generator failed: {e}")))?;
    Ok(b)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::changelog::ChangeLog;
    use crate::hub::{Hub, HubConfig};
    use crate::ids::{ManualClock, PeerId};

    async fn setup() -> (tempfile::TempDir, Accounts, Hub) {
        let (dir, accounts, hub, _) = setup_with_log().await;
        (dir, accounts, hub)
    }

    /// Station "north", village "east", officers "amy" and "ben", and the hub with the
    /// change log as its observer (shared with the change log's tests).
    pub(crate) async fn setup_with_log() -> (tempfile::TempDir, Accounts, Hub, ChangeLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &Default::default()).unwrap();
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_790_000_000_000)));
        let accounts = Accounts::open(store.clone(), clock.clone(), AccountsConfig::default())
            .await
            .unwrap();
        let log = ChangeLog::new(store.clone(), accounts.clone());
        let hub = Hub::new(
            Arc::new(store),
            PeerId::new("server").unwrap(),
            HubConfig::default(),
            Arc::new(accounts.clone()),
            vec![Arc::new(log.clone())],
            clock,
        );
        for cmd in [
            AdminCommand::StationAdd {
                station: "north".into(),
            },
            AdminCommand::VillageAdd {
                station: "north".into(),
                village: "east".into(),
            },
            AdminCommand::UserAdd {
                name: "amy".into(),
                role: Role::Officer,
                station: "north".into(),
                villages: vec!["east".into()],
                password_hash: None,
            },
            AdminCommand::UserAdd {
                name: "ben".into(),
                role: Role::Officer,
                station: "north".into(),
                villages: vec!["east".into()],
                password_hash: None,
            },
        ] {
            accounts.admin(&hub, cmd, "test").await.unwrap();
        }
        (dir, accounts, hub, log)
    }

    pub(crate) async fn device(accounts: &Accounts, hub: &Hub, user: &str) -> Principal {
        let out = accounts
            .admin(
                hub,
                AdminCommand::DeviceEnroll { user: user.into() },
                "test",
            )
            .await
            .unwrap();
        let code = out.lines().last().unwrap();
        let token = accounts.enroll(code, "phone", "test").await.unwrap().token;
        accounts
            .authenticate(Some(&token))
            .unwrap()
            .principal()
            .clone()
    }

    #[test]
    fn a_guesser_keeps_an_account_locked_for_a_minute_at_most() {
        use crate::auth::throttle::Throttle;
        let config = AccountsConfig::default();
        let mut per_name = Throttle::new(config.sign_in_throttle);
        let mut per_address = Throttle::new(config.sign_in_address_throttle);
        let t0 = Timestamp::from_millis(1_000_000);
        for _ in 0..40 {
            per_name.failed("sue", t0);
            per_address.failed("203.0.113.9", t0);
        }
        // The owner waits a minute at most; the guesser's address much longer.
        let name_wait = per_name.check("sue", t0).unwrap_err();
        let address_wait = per_address.check("203.0.113.9", t0).unwrap_err();
        assert!(name_wait <= Duration::from_secs(60), "{name_wait:?}");
        assert!(
            address_wait >= Duration::from_secs(15 * 60),
            "{address_wait:?}"
        );
    }

    #[tokio::test]
    async fn sign_in_is_slowed_after_repeated_wrong_passwords() {
        let (_dir, accounts, hub) = setup().await;
        let phc = secrets::hash_password("the right password", [3; 16]).unwrap();
        accounts
            .admin(
                &hub,
                AdminCommand::UserAdd {
                    name: "sue".into(),
                    role: Role::Staff,
                    station: "north".into(),
                    villages: vec![],
                    password_hash: Some(phc),
                },
                "test",
            )
            .await
            .unwrap();
        for _ in 0..6 {
            assert!(matches!(
                accounts
                    .sign_in("sue", "a wrong password", "10.0.0.1")
                    .await,
                Err(AccountsError::WrongPassword)
            ));
        }
        // Even the right password waits now.
        assert!(matches!(
            accounts
                .sign_in("sue", "the right password", "10.0.0.1")
                .await,
            Err(AccountsError::Throttled(_))
        ));
        // Officers never sign in with a password.
        assert!(matches!(
            accounts.sign_in("amy", "anything at all", "10.0.0.1").await,
            Err(AccountsError::WrongPassword)
        ));
        hub.shutdown().await;
    }
}
