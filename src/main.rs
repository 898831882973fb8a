//! The `fieldsync` binary: parse the command line, start logging, then either serve until
//! SIGINT/SIGTERM or run one admin command. Everything else lives in the library.

#![forbid(unsafe_code)]

use clap::Parser;
use fieldsync::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// The allocator: jemalloc, with the settings in `.cargo/config.toml` (one arena, small
/// thread caches, idle pages returned after half a second by a background thread). Measured
/// with examples/loadgen.rs at 20 phones against glibc malloc limited to two arenas (the
/// previous choice, set by re-executing with `GLIBC_TUNABLES`): 15–20 % less server CPU for
/// the same peak memory; mimalloc had used four times the memory. `_RJEM_MALLOC_CONF`
/// overrides the settings at start.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Threads for blocking work (see where the runtime is built).
const BLOCKING_THREADS: usize = 24;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // A panic is a bug or damaged data: say so on one line (and in the log), no backtrace
    // unless asked for with RUST_BACKTRACE.
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            tracing::error!(at = %at, what = %what, "internal failure");
            eprintln!("fieldsync: internal failure at {at}: {what}");
        }));
    }
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work (Automerge, sled) is CPU-bound: more threads than this only cost
        // memory. tokio's default of 512 let a push by 20 devices start ~500 threads and
        // ~100 MB of their stacks and allocator caches (measured with examples/loadgen.rs).
        // Exports, which hold a thread while their client reads, are limited to 4 at once.
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| match cli.command {
            Command::Serve(args) => runtime.block_on(serve(args)),
            Command::Demo(args) => runtime.block_on(demo(args)),
            Command::Admin(args) => runtime.block_on(admin(args)),
            Command::Reindex(args) => runtime.block_on(reindex(args)),
            Command::Migrate(args) => runtime.block_on(migrate(args)),
            Command::Backup(args) => runtime.block_on(backup(args)),
            Command::Restore(args) => runtime.block_on(restore(args)),
        });
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line that says what went wrong and what to do, not a backtrace.
            eprintln!("fieldsync: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: fieldsync::config::ServeArgs) -> anyhow::Result<()> {
    let (addr, config) = args.into_config()?;
    let data_dir = config.data_dir.clone();
    let services = fieldsync::server::Services::open(config).await?;
    let listener = fieldsync::server::bind(addr).await?;
    // Before the announcement below: admin commands issued right after it must reach us.
    services.prepare_to_serve().await?;
    let local = listener.local_addr()?;
    // Scripts and tests read the first line to find the port when --listen ends in :0. One
    // write, and a failed write (stdout closed by whoever started us) is not fatal.
    let mut announcement = format!(
        "fieldsync listening on ws://{local}/sync (data: {})",
        data_dir.display()
    );
    if let Some(addr) = services.metrics_addr() {
        announcement.push_str(&format!("; metrics at http://{addr}/metrics"));
    }
    if !services.accounts.has_admin() {
        announcement.push_str(&format!(
            "\nno admin account yet; create one (in another terminal):\n  fieldsync admin --data {dir} station add STATION\n  fieldsync admin --data {dir} user add NAME --role admin --station STATION --password-stdin",
            dir = data_dir.display()
        ));
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{announcement}").and_then(|()| out.flush());
    }
    fieldsync::server::run(listener, services, shutdown_signal()).await?;
    Ok(())
}

async fn demo(args: fieldsync::config::DemoArgs) -> anyhow::Result<()> {
    let found = fieldsync::demo::inspect(&args.data)?;
    // Every other setting as `serve` has it (its defaults and FIELDSYNC_* variables).
    let serve_args = match Cli::try_parse_from([
        "fieldsync".as_ref(),
        "serve".as_ref(),
        "--data".as_ref(),
        args.data.as_os_str(),
        "--listen".as_ref(),
        args.listen.to_string().as_ref(),
    ] as [&std::ffi::OsStr; 6])?
    .command
    {
        Command::Serve(a) => a,
        _ => unreachable!("parsed as serve"),
    };
    let (addr, config) = serve_args.into_config()?;
    let data_dir = config.data_dir.clone();
    let services = fieldsync::server::Services::open(config).await?;
    let listener = fieldsync::server::bind(addr).await?;
    services.prepare_to_serve().await?;
    let local = listener.local_addr()?;
    let progress = |step: &str| eprintln!("demo: {step}");
    // Accounts first, so the server starts with its admin; the phones then sync through it.
    let made = match &found {
        fieldsync::demo::Found::Fresh => {
            Some(fieldsync::demo::make_accounts(&services, &data_dir, progress).await?)
        }
        fieldsync::demo::Found::Demo { .. } => None,
    };
    let serving = tokio::spawn(fieldsync::server::run(
        listener,
        services.clone(),
        shutdown_signal(),
    ));
    let password = match (made, found) {
        (Some(made), _) => {
            fieldsync::demo::fill(&services, made, &format!("ws://{local}/sync"), progress).await?
        }
        (None, fieldsync::demo::Found::Demo { password }) => {
            eprintln!(
                "demo: serving the demo made earlier in {}",
                data_dir.display()
            );
            password
        }
        (None, fieldsync::demo::Found::Fresh) => unreachable!("made above"),
    };
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "fieldsync listening on ws://{local}/sync (data: {})\n\
             staff page: http://{local}/ (sign in as {} with password {password}; {} is an admin with the same password)\n\
             demo data only: real records go in a new data directory with `fieldsync serve`",
            data_dir.display(),
            fieldsync::demo::STAFF_USER,
            fieldsync::demo::ADMIN_USER,
        )
        .and_then(|()| out.flush());
    }
    serving.await??;
    Ok(())
}

async fn admin(args: fieldsync::config::AdminArgs) -> anyhow::Result<()> {
    let database = args.database.clone();
    let (data_dir, command) = args.into_command(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        Ok(line)
    })?;
    let operator = format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    );
    let mut config = fieldsync::server::ServerConfig::new(data_dir);
    config.database = database;
    let output = fieldsync::server::admin(config, command, &operator).await?;
    println!("{output}");
    Ok(())
}

async fn reindex(args: fieldsync::config::ReindexArgs) -> anyhow::Result<()> {
    let mut config = fieldsync::server::ServerConfig::new(args.data);
    config.database = args.database;
    let started = std::time::Instant::now();
    let mut last_report = std::time::Instant::now();
    let total = fieldsync::server::reindex(config, move |done, total| {
        // Progress on stderr, at most a few lines a second, and always the last one.
        if done == total || last_report.elapsed() >= std::time::Duration::from_millis(500) {
            last_report = std::time::Instant::now();
            eprintln!("reindexed {done}/{total} households");
        }
    })
    .await?;
    println!(
        "projection rebuilt from {total} households in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn backup(args: fieldsync::config::BackupArgs) -> anyhow::Result<()> {
    use fieldsync::backup::Progress;
    if let Some(fieldsync::config::BackupAction::Verify { file }) = args.action {
        let started = std::time::Instant::now();
        let mut last = std::time::Instant::now();
        let m = tokio::task::spawn_blocking(move || {
            fieldsync::backup::verify(&file, &mut |p| {
                if let Progress::Documents(done, _) = p {
                    if last.elapsed().as_millis() >= 500 {
                        last = std::time::Instant::now();
                        eprintln!("checked {done} documents");
                    }
                }
            })
        })
        .await??;
        println!(
            "the archive is whole ({:.1} s): taken from server {} at change {}, {} documents, {} account records, {} audit entries, {} provenance rows, {} actor bindings",
            started.elapsed().as_secs_f64(),
            m.storage_id,
            m.feed_seq,
            m.documents,
            m.records,
            m.audit_entries,
            m.provenance_rows,
            m.actor_bindings
        );
        return Ok(());
    }
    let Some(to) = args.to else {
        anyhow::bail!("say where the archive goes: `fieldsync backup --to FILE` (or `fieldsync backup verify FILE`)");
    };
    if to.exists() {
        anyhow::bail!(
            "{} exists already; give a new file name (a backup never overwrites one)",
            to.display()
        );
    }
    // The server writes the file: give it a path that means the same there.
    let to = std::path::absolute(&to)?;
    let mut config = fieldsync::server::ServerConfig::new(args.data);
    config.database = args.database;
    eprintln!("backing up into {} …", to.display());
    let operator = format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    );
    let output = fieldsync::server::admin(
        config,
        fieldsync::accounts::AdminCommand::Backup {
            to: to.display().to_string(),
        },
        &operator,
    )
    .await?;
    println!("{output}");
    Ok(())
}

async fn restore(args: fieldsync::config::RestoreArgs) -> anyhow::Result<()> {
    use fieldsync::backup::Progress;
    use fieldsync::server::backend::Place;
    let started = std::time::Instant::now();
    let place = match args.database {
        Some(url) => Place::Database(url),
        None => Place::Directory(args.data.clone()),
    };
    // The first progress line after half a second: a small restore prints none.
    let mut last = Some(std::time::Instant::now());
    let restored = fieldsync::backup::restore(&args.from, &place, move |p| {
        let (what, done, total) = match p {
            Progress::Documents(done, 0) => ("checked", done, 0),
            Progress::Documents(done, total) => ("restored", done, total),
            Progress::Reindex(done, total) => ("projected", done, total),
        };
        if done != total && last.is_some_and(|t| t.elapsed().as_millis() < 500) {
            return;
        }
        last = Some(std::time::Instant::now());
        if total == 0 {
            eprintln!("{what} {done} documents");
        } else {
            eprintln!("{what} {done}/{total}");
        }
    })
    .await?;
    let m = &restored.manifest;
    println!(
        "restored in {:.1} s: {} documents, {} account records, {} audit entries, {} provenance rows (up to change {}), {} actor bindings; {} households projected. New storage id {} (it was {}): phones that synced after the backup send those changes again. Start it with `fieldsync serve --data {}`{}",
        started.elapsed().as_secs_f64(),
        m.documents,
        m.records,
        m.audit_entries,
        m.provenance_rows,
        m.feed_seq,
        m.actor_bindings,
        restored.households_projected,
        restored.storage_id,
        m.storage_id,
        args.data.display(),
        match &place {
            Place::Database(url) => format!(" --database {url}"),
            Place::Directory(_) => String::new(),
        }
    );
    Ok(())
}

async fn migrate(args: fieldsync::config::MigrateArgs) -> anyhow::Result<()> {
    use fieldsync::migrate::Progress;
    use fieldsync::server::backend::Place;
    let started = std::time::Instant::now();
    let mut last_report: Option<std::time::Instant> = None;
    let report = fieldsync::migrate::migrate(
        &Place::parse(&args.from),
        &Place::parse(&args.to),
        move |p| {
            // Progress on stderr, at most a few lines a second, and always each step's last.
            let last = match p {
                Progress::Documents(done, total) | Progress::Reindex(done, total) => done == total,
                Progress::Provenance(_) => false,
            };
            if !last && last_report.is_some_and(|t| t.elapsed().as_millis() < 500) {
                return;
            }
            last_report = Some(std::time::Instant::now());
            match p {
                Progress::Documents(done, total) => {
                    eprintln!("copied and verified {done}/{total} documents")
                }
                Progress::Provenance(n) => eprintln!("copied {n} provenance rows"),
                Progress::Reindex(done, total) => {
                    eprintln!("projected {done}/{total} households on the target")
                }
            }
        },
    )
    .await?;
    println!(
        "migrated in {:.1} s: {} documents ({} already there, same heads), {} account records ({} stale ones removed), {} audit entries, {} provenance rows, {} actor bindings; {} households projected",
        started.elapsed().as_secs_f64(),
        report.documents,
        report.documents_already_there,
        report.records,
        report.records_removed,
        report.audit_entries,
        report.provenance_rows,
        report.actor_bindings,
        report.households_projected,
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM; use Ctrl-C to stop");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

/// The log filter when `FIELDSYNC_LOG` is unset. Automerge opens an info-level span with
/// its arguments formatted for every sync message it loads, which the text and JSON formats
/// would record for nothing (1–2 % of the server's CPU under load): its own logs are warnings
/// and errors only unless `FIELDSYNC_LOG` asks for more.
const DEFAULT_LOG_FILTER: &str = "info,automerge=warn";

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("FIELDSYNC_LOG")
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
