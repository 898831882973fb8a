//! Command-line and environment configuration, parsed once (clap) and validated into the
//! typed configs the layers take. Must not read configuration anywhere else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::server::ServerConfig;

#[derive(Parser, Debug)]
#[command(
    name = "fieldsync",
    version,
    about = "Offline-first sync server for household visit records"
)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, env = "FIELDSYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the sync server (embedded sled store; no other service needed).
    Serve(ServeArgs),
    /// Make a demo station on a fresh data directory (villages, officers' phones that sync
    /// realistic households, a staff account whose password it prints), then serve it. A
    /// directory the demo made earlier is served as it is; any other data is refused.
    Demo(DemoArgs),
    /// Manage stations, villages, accounts and devices. Works while the server runs (through
    /// its admin socket, taking effect at once) and while it is stopped.
    Admin(AdminArgs),
    /// Rebuild the staff projection (lists, counters, export rows) from the stored
    /// documents. Run it with the server stopped; it shows progress.
    Reindex(ReindexArgs),
    /// Copy a station's data from one backend to another (a data directory or a
    /// postgres:// URL, either way), verify it and rebuild the target's projection. Run it
    /// with the servers on both sides stopped; safe to run again.
    Migrate(MigrateArgs),
    /// Back up everything (documents, accounts, provenance, audit) into one archive file, as
    /// one consistent point, while the server runs (through its admin socket) or not;
    /// `backup verify FILE` checks an archive whole.
    Backup(BackupArgs),
    /// Restore a backup into an empty data directory (or database). The restored server gets
    /// a new storage id: phones then send again what the backup lacks.
    Restore(RestoreArgs),
}

#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub action: Option<BackupAction>,
    /// The archive to write (a new file, readable by its owner only; written whole or not
    /// at all).
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// The server's data directory (as given to `serve`).
    #[arg(long, env = "FIELDSYNC_DATA", default_value = "./fieldsync-data")]
    pub data: PathBuf,
    /// The server's PostgreSQL database, when it keeps its data there; needed only while
    /// that server is not running.
    #[arg(long, env = "FIELDSYNC_DATABASE")]
    pub database: Option<String>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BackupAction {
    /// Check an archive whole (its checksum, every entry, every document, the counts) and
    /// print its manifest. Writes nothing.
    Verify {
        /// The archive.
        file: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The archive, as `fieldsync backup` wrote it.
    #[arg(long)]
    pub from: PathBuf,
    /// A new (or empty) data directory for the restored server.
    #[arg(long)]
    pub data: PathBuf,
    /// Restore into this PostgreSQL database (empty) instead of the data directory.
    #[arg(long)]
    pub database: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The demo's data directory (created; kept apart from a real one).
    #[arg(long, default_value = "./fieldsync-demo")]
    pub data: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Where the data is now: the server's --data directory, or its postgres:// URL.
    #[arg(long)]
    pub from: String,
    /// Where it goes: a new data directory, or a postgres:// URL of an empty database.
    #[arg(long)]
    pub to: String,
}

#[derive(Args, Debug, Clone)]
pub struct ReindexArgs {
    /// Data directory (as given to `serve`).
    #[arg(long, env = "FIELDSYNC_DATA", default_value = "./fieldsync-data")]
    pub data: PathBuf,
    /// The server's PostgreSQL database, when it keeps its data there (as given to
    /// `serve`).
    #[arg(long, env = "FIELDSYNC_DATABASE")]
    pub database: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct AdminArgs {
    /// Data directory of the server to manage (as given to `serve`).
    #[arg(
        long,
        env = "FIELDSYNC_DATA",
        default_value = "./fieldsync-data",
        global = true
    )]
    pub data: PathBuf,
    /// The server's PostgreSQL database, when it keeps its data there (as given to
    /// `serve`); needed only while that server is not running.
    #[arg(long, env = "FIELDSYNC_DATABASE", global = true)]
    pub database: Option<String>,
    #[command(subcommand)]
    pub what: AdminWhat,
}

#[derive(Subcommand, Debug, Clone)]
pub enum AdminWhat {
    /// Stations: the boundary no record crosses.
    #[command(subcommand)]
    Station(StationCmd),
    /// Villages of a station (each gets a catalog document).
    #[command(subcommand)]
    Village(VillageCmd),
    /// Accounts: officers, staff, admins.
    #[command(subcommand)]
    User(UserCmd),
    /// Devices: enrolment codes, listing, revocation.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Print the admin audit log.
    Audit {
        /// How many of the latest entries to print.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum StationCmd {
    /// Add a station.
    Add { station: String },
}

#[derive(Subcommand, Debug, Clone)]
pub enum VillageCmd {
    /// Add a village to a station.
    Add { station: String, village: String },
}

#[derive(Subcommand, Debug, Clone)]
pub enum UserCmd {
    /// Add an account. Staff and admins need --password-stdin (no default passwords).
    Add {
        name: String,
        #[arg(long)]
        role: crate::auth::Role,
        #[arg(long)]
        station: String,
        /// Villages an officer works in, comma-separated.
        #[arg(long, value_delimiter = ',')]
        villages: Vec<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Disable an account: its devices and sessions stop working at once.
    Disable { name: String },
    /// List accounts.
    List,
}

#[derive(Subcommand, Debug, Clone)]
pub enum DeviceCmd {
    /// Make a one-time enrolment code for a user's new device (printed as the last line).
    Enroll { user: String },
    /// List devices.
    List,
    /// Revoke a device: its token stops working and its connections close at once.
    Revoke { device: String },
}

impl AdminArgs {
    /// The command to run. `password` is asked for only when --password-stdin is given; it is
    /// hashed here, so the password never leaves this process.
    pub fn into_command(
        self,
        password: impl FnOnce() -> std::io::Result<String>,
    ) -> Result<(PathBuf, crate::accounts::AdminCommand), crate::Error> {
        use crate::accounts::AdminCommand as C;
        let command = match self.what {
            AdminWhat::Station(StationCmd::Add { station }) => C::StationAdd { station },
            AdminWhat::Village(VillageCmd::Add { station, village }) => {
                C::VillageAdd { station, village }
            }
            AdminWhat::User(UserCmd::Add {
                name,
                role,
                station,
                villages,
                password_stdin,
            }) => {
                let password_hash = if password_stdin {
                    let pw = password().map_err(|e| {
                        crate::Error::Config(format!("cannot read the password from stdin: {e}"))
                    })?;
                    let pw = pw.trim_end_matches(['\r', '\n']);
                    let mut salt = [0u8; 16];
                    getrandom::fill(&mut salt).map_err(|e| {
                        crate::Error::Config(format!("the OS random generator failed: {e}"))
                    })?;
                    Some(
                        crate::auth::secrets::hash_password(pw, salt)
                            .map_err(|e| crate::Error::Config(e.to_string()))?,
                    )
                } else {
                    None
                };
                C::UserAdd {
                    name,
                    role,
                    station,
                    villages: villages
                        .into_iter()
                        .filter(|v| !v.trim().is_empty())
                        .collect(),
                    password_hash,
                }
            }
            AdminWhat::User(UserCmd::Disable { name }) => C::UserDisable { name },
            AdminWhat::User(UserCmd::List) => C::UserList,
            AdminWhat::Device(DeviceCmd::Enroll { user }) => C::DeviceEnroll { user },
            AdminWhat::Device(DeviceCmd::List) => C::DeviceList,
            AdminWhat::Device(DeviceCmd::Revoke { device }) => C::DeviceRevoke { device },
            AdminWhat::Audit { limit } => C::Audit { limit },
        };
        Ok((self.data, command))
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on. Use 0.0.0.0:8080 to accept phones on the network (behind a TLS
    /// reverse proxy).
    #[arg(long, env = "FIELDSYNC_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Data directory (created if missing). One server process per directory.
    #[arg(long, env = "FIELDSYNC_DATA", default_value = "./fieldsync-data")]
    pub data: PathBuf,
    /// Keep the data in PostgreSQL instead of the embedded store
    /// (`postgres://USER@HOST:PORT/DATABASE`); the data directory then only holds the admin
    /// socket. Early: see the README's known limitations.
    #[arg(long, env = "FIELDSYNC_DATABASE")]
    pub database: Option<String>,
    /// Largest WebSocket message accepted, in bytes.
    #[arg(long, env = "FIELDSYNC_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Memory for loaded documents, in bytes: each counts what it is estimated to take in
    /// memory (18 KiB + 9 bytes per operation + 1 KiB per syncing peer, measured by
    /// `examples/doc_memory.rs`), and the least recently used leave first.
    #[arg(long, env = "FIELDSYNC_CACHE_BUDGET_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub cache_budget_bytes: usize,
    /// sled's page cache, in bytes (its reads of chunks, projections and accounts).
    #[arg(long, env = "FIELDSYNC_STORE_CACHE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub store_cache_bytes: u64,
    /// Seconds between pings; a peer silent for 2.5 intervals is dropped.
    #[arg(long, env = "FIELDSYNC_PING_INTERVAL_SECS", default_value_t = 20)]
    pub ping_interval_secs: u64,
    /// Open TCP connections at most (HTTP and WebSocket); more are closed on accept. Lowered
    /// at start to fit the open-files limit, keeping descriptors for storage and the admin
    /// socket.
    #[arg(long, env = "FIELDSYNC_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's header (and the longest idle keep-alive).
    #[arg(long, env = "FIELDSYNC_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a WebSocket may take to send `join` after connecting.
    #[arg(long, env = "FIELDSYNC_JOIN_TIMEOUT_SECS", default_value_t = 10)]
    pub join_timeout_secs: u64,
    /// Address of a reverse proxy whose X-Forwarded-For is believed (repeat for several).
    /// Without it, the socket's peer is the client (throttles key on it).
    #[arg(
        long = "trusted-proxy",
        env = "FIELDSYNC_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Mark the staff session cookie `Secure` (set it when staff reach the page over HTTPS).
    #[arg(long, env = "FIELDSYNC_SECURE_COOKIES")]
    pub secure_cookies: bool,
    /// The station's offset from UTC (`+08:00`), which monthly reports' boundaries follow.
    #[arg(long, env = "FIELDSYNC_UTC_OFFSET", default_value = "+08:00", value_parser = parse_utc_offset)]
    pub utc_offset: i32,
    /// Serve Prometheus metrics at http://ADDR/metrics, apart from the public port (e.g.
    /// 127.0.0.1:9464). Off unless given.
    #[arg(long, env = "FIELDSYNC_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Operations one Automerge change may hold.
    #[arg(long, env = "FIELDSYNC_MAX_OPS_PER_CHANGE", default_value_t = 100_000)]
    pub max_ops_per_change: u64,
    /// Operations one document (household) may grow to.
    #[arg(
        long,
        env = "FIELDSYNC_MAX_OPS_PER_DOCUMENT",
        default_value_t = 1_000_000
    )]
    pub max_ops_per_document: u64,
    /// Stored bytes one document may grow to.
    #[arg(long, env = "FIELDSYNC_MAX_DOCUMENT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_document_bytes: usize,
    /// Password checks (argon2, ~19 MiB each) run at once; more sign-ins get 503 at once.
    /// Default: the number of cores.
    #[arg(long, env = "FIELDSYNC_MAX_CONCURRENT_PASSWORD_CHECKS")]
    pub max_concurrent_password_checks: Option<usize>,
    /// Documents loaded from storage at once (each load of a document with many
    /// uncompacted chunks briefly needs several times its size in memory, and loads are
    /// CPU-bound). Default: the number of cores.
    #[arg(long, env = "FIELDSYNC_MAX_CONCURRENT_LOADS")]
    pub max_concurrent_loads: Option<usize>,
    /// Seconds after which a loaded document that nobody used is unloaded (it reloads on
    /// the next message).
    #[arg(long, env = "FIELDSYNC_IDLE_UNLOAD_SECS", default_value_t = 15)]
    pub idle_unload_secs: u64,
    /// Milliseconds a device that has not answered the server's last message about a
    /// document waits for the next one (its answer gets everything new at once); 0 pushes
    /// every change at once.
    #[arg(long, env = "FIELDSYNC_PUSH_HOLD_MS", default_value_t = 1000)]
    pub push_hold_ms: u64,
    /// Milliseconds between two pushes of one document to one device, per device the
    /// document has (5: two devices sharing a household get pushes 10 ms apart, 200 devices
    /// a second apart, each push carrying what arrived meanwhile); bounds the CPU that a
    /// household or catalog many devices edit at once costs. 0: no spacing.
    #[arg(
        long,
        env = "FIELDSYNC_PUSH_SPACING_MS_PER_DEVICE",
        default_value_t = 5
    )]
    pub push_spacing_ms_per_device: u64,
    /// Bytes waiting to be written to a device's socket beyond which the server sends it
    /// nothing new, pushes or answers (it catches up once they are written); bounds memory
    /// when many devices watch busy households.
    #[arg(long, env = "FIELDSYNC_PUSH_BACKLOG_BYTES", default_value_t = 256 * 1024)]
    pub push_backlog_bytes: usize,
    /// Bytes waiting for all devices' sockets together beyond which pushes wait and no
    /// device's new messages are read until the sockets have taken enough: what hundreds of
    /// phones downloading at once may hold in memory.
    #[arg(long, env = "FIELDSYNC_OUTBOUND_BUDGET_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub outbound_budget_bytes: usize,
    /// Crash tests only.
    #[arg(long, env = "FIELDSYNC_FAILPOINT", hide = true)]
    pub failpoint: Option<crate::hub::Failpoint>,
}

impl ServeArgs {
    /// Validates the arguments into a server config.
    pub fn into_config(self) -> Result<(SocketAddr, ServerConfig), crate::Error> {
        if self.max_message_bytes < 1024 {
            return Err(crate::Error::Config(
                "--max-message-bytes must be at least 1024".into(),
            ));
        }
        if self.cache_budget_bytes == 0 {
            return Err(crate::Error::Config(
                "--cache-budget-bytes must be greater than 0".into(),
            ));
        }
        if self.ping_interval_secs == 0 {
            return Err(crate::Error::Config(
                "--ping-interval-secs must be greater than 0".into(),
            ));
        }
        for (flag, value) in [
            ("--max-connections", self.max_connections as u64),
            ("--header-read-timeout-secs", self.header_read_timeout_secs),
            ("--join-timeout-secs", self.join_timeout_secs),
            ("--max-ops-per-change", self.max_ops_per_change),
            ("--max-ops-per-document", self.max_ops_per_document),
            ("--max-document-bytes", self.max_document_bytes as u64),
            ("--idle-unload-secs", self.idle_unload_secs),
            ("--push-backlog-bytes", self.push_backlog_bytes as u64),
            ("--outbound-budget-bytes", self.outbound_budget_bytes as u64),
            ("--store-cache-bytes", self.store_cache_bytes),
            (
                "--max-concurrent-password-checks",
                self.max_concurrent_password_checks.unwrap_or(1) as u64,
            ),
            (
                "--max-concurrent-loads",
                self.max_concurrent_loads.unwrap_or(1) as u64,
            ),
        ] {
            if value == 0 {
                return Err(crate::Error::Config(format!(
                    "{flag} must be greater than 0"
                )));
            }
        }
        let mut config = ServerConfig::new(self.data);
        config.database = self.database;
        config.listen.max_connections = self.max_connections;
        config.listen.header_read_timeout = Duration::from_secs(self.header_read_timeout_secs);
        config.listen.trusted_proxies = self.trusted_proxies;
        config.join_timeout = Duration::from_secs(self.join_timeout_secs);
        config.secure_cookies = self.secure_cookies;
        config.metrics_listen = self.metrics_listen;
        config.utc_offset_minutes = self.utc_offset;
        config.hub.max_ops_per_change = self.max_ops_per_change;
        config.hub.max_ops_per_document = self.max_ops_per_document;
        config.hub.max_document_bytes = self.max_document_bytes;
        if self.failpoint == Some(crate::hub::Failpoint::StallFlushes) {
            config.store.stall_flushes_while =
                Some(crate::hub::Failpoint::STALL_FLUSHES_FILE.to_string());
        }
        config.hub.failpoint = self.failpoint;
        config.hub.idle_unload_after = Duration::from_secs(self.idle_unload_secs);
        config.hub.push_hold = Duration::from_millis(self.push_hold_ms);
        config.hub.push_spacing_per_peer = Duration::from_millis(self.push_spacing_ms_per_device);
        config.hub.push_backlog_bytes = self.push_backlog_bytes;
        config.outbound_budget_bytes = self.outbound_budget_bytes;
        if let Some(n) = self.max_concurrent_loads {
            config.hub.max_concurrent_loads = Some(n);
        }
        if let Some(n) = self.max_concurrent_password_checks {
            config.accounts.max_concurrent_password_checks = n;
        }
        config.max_message_bytes = self.max_message_bytes;
        config.hub.cache_budget_bytes = self.cache_budget_bytes;
        config.store.sled_cache_bytes = self.store_cache_bytes;
        config.ping_interval = Duration::from_secs(self.ping_interval_secs);
        config.idle_timeout = Duration::from_millis(self.ping_interval_secs * 2500);
        Ok((self.listen, config))
    }
}

/// `+HH:MM` or `-HH:MM` (from -12:00 to +14:00) as minutes from UTC.
fn parse_utc_offset(s: &str) -> Result<i32, String> {
    let bad = || format!("`{s}` is not an offset from UTC like +08:00 or -05:00");
    let (sign, rest) = match s.chars().next() {
        Some('+') => (1, &s[1..]),
        Some('-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    let minutes = sign * (h * 60 + m);
    if m >= 60 || !(-12 * 60..=14 * 60).contains(&minutes) {
        return Err(bad());
    }
    Ok(minutes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_a_local_data_dir() {
        let cli = Cli::try_parse_from(["fieldsync", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let (addr, config) = args.into_config().unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.data_dir, PathBuf::from("./fieldsync-data"));
        assert_eq!(config.ping_interval, Duration::from_secs(20));
    }

    #[test]
    fn nonsense_limits_are_refused_with_the_flag_name() {
        let cli = Cli::try_parse_from(["fieldsync", "serve", "--max-message-bytes", "10"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let err = args.into_config().unwrap_err().to_string();
        assert!(err.contains("--max-message-bytes"), "{err}");
    }

    #[test]
    fn concurrent_loads_default_to_the_cores_and_are_never_zero() {
        let parse = |extra: &[&str]| {
            let cli = Cli::try_parse_from(["fieldsync", "serve"].iter().chain(extra)).unwrap();
            let Command::Serve(args) = cli.command else {
                panic!("not serve")
            };
            args.into_config()
        };
        assert_eq!(
            parse(&[]).unwrap().1.hub.max_concurrent_loads,
            Some(crate::cores())
        );
        let (_, config) = parse(&["--max-concurrent-loads", "2"]).unwrap();
        assert_eq!(config.hub.max_concurrent_loads, Some(2));
        let err = parse(&["--max-concurrent-loads", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-concurrent-loads"), "{err}");
    }

    #[test]
    fn admin_user_add_hashes_the_password_from_stdin() {
        let cli = Cli::try_parse_from([
            "fieldsync",
            "admin",
            "--data",
            "d",
            "user",
            "add",
            "sue",
            "--role",
            "staff",
            "--station",
            "north",
            "--password-stdin",
        ])
        .unwrap();
        let Command::Admin(args) = cli.command else {
            panic!("not admin")
        };
        let (dir, cmd) = args
            .into_command(|| Ok("a long enough password\n".into()))
            .unwrap();
        assert_eq!(dir, PathBuf::from("d"));
        let crate::accounts::AdminCommand::UserAdd { password_hash, .. } = cmd else {
            panic!("not user add")
        };
        let phc = password_hash.unwrap();
        assert!(crate::auth::secrets::verify_password(
            "a long enough password",
            &phc
        ));
    }

    #[test]
    fn admin_villages_are_comma_separated() {
        let cli = Cli::try_parse_from([
            "fieldsync",
            "admin",
            "user",
            "add",
            "amy",
            "--role",
            "officer",
            "--station",
            "north",
            "--villages",
            "東村,West",
        ])
        .unwrap();
        let Command::Admin(args) = cli.command else {
            panic!("not admin")
        };
        let (_, cmd) = args.into_command(|| unreachable!()).unwrap();
        let crate::accounts::AdminCommand::UserAdd { villages, .. } = cmd else {
            panic!("not user add")
        };
        assert_eq!(villages, vec!["東村".to_string(), "West".to_string()]);
    }

    #[test]
    fn utc_offsets_are_read_as_minutes_and_nonsense_is_refused() {
        assert_eq!(parse_utc_offset("+08:00"), Ok(480));
        assert_eq!(parse_utc_offset("-05:30"), Ok(-330));
        assert_eq!(parse_utc_offset("+00:00"), Ok(0));
        for bad in ["08:00", "+8:00", "+08:60", "+15:00", "-13:00", "UTC+8", ""] {
            assert!(parse_utc_offset(bad).is_err(), "{bad}");
        }
    }
}
