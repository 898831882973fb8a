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
    /// Largest WebSocket message accepted, in bytes.
    #[arg(long, env = "FIELDSYNC_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Budget for loaded documents, in bytes of their stored size.
    #[arg(long, env = "FIELDSYNC_CACHE_BUDGET_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub cache_budget_bytes: usize,
    /// Seconds between pings; a peer silent for 2.5 intervals is dropped.
    #[arg(long, env = "FIELDSYNC_PING_INTERVAL_SECS", default_value_t = 20)]
    pub ping_interval_secs: u64,
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
        let mut config = ServerConfig::new(self.data);
        config.max_message_bytes = self.max_message_bytes;
        config.hub.cache_budget_bytes = self.cache_budget_bytes;
        config.ping_interval = Duration::from_secs(self.ping_interval_secs);
        config.idle_timeout = Duration::from_millis(self.ping_interval_secs * 2500);
        Ok((self.listen, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_a_local_data_dir() {
        let cli = Cli::try_parse_from(["fieldsync", "serve"]).unwrap();
        let Command::Serve(args) = cli.command;
        let (addr, config) = args.into_config().unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.data_dir, PathBuf::from("./fieldsync-data"));
        assert_eq!(config.ping_interval, Duration::from_secs(20));
    }

    #[test]
    fn nonsense_limits_are_refused_with_the_flag_name() {
        let cli = Cli::try_parse_from(["fieldsync", "serve", "--max-message-bytes", "10"]).unwrap();
        let Command::Serve(args) = cli.command;
        let err = args.into_config().unwrap_err().to_string();
        assert!(err.contains("--max-message-bytes"), "{err}");
    }
}
