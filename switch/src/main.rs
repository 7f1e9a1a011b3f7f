//! `parley`: run a Parley node.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use parley_switch::config::Config;

/// mimalloc as the allocator: glibc's keeps freed memory in per-thread arenas and returns
/// it only from the top of each heap, so after a flood's calls and transactions are gone
/// the process stayed at its peak (measured: 100 MB before, 330 MB after a 20,000-INVITE
/// flood, 332 MB once its transactions had expired). mimalloc returns freed pages to the
/// OS on its own (figures in `docs/BENCHMARKS.md`, "INVITE floods"); it is maintained by
/// Microsoft Research and widely used as a Rust global allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Parley: a presence-routed real-time media switch.
///
/// Calls from PSTN gateways (SIP over UDP, TCP or TLS) ring the IM device where the called user is
/// present (QUIC), or their PSTN line through a trunk; media is relayed; every call leaves a
/// CDR that grows the user's address book.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node. Without --config: demo mode on loopback (SIP 127.0.0.1:5060,
    /// QUIC 127.0.0.1:4433, HTTP 127.0.0.1:8080), SQLite in ./parley-data, tenant `demo` with
    /// alice/bob/carol (+15550100001..3, password `demo`) and trunk `pstn` at 127.0.0.1:5080.
    Run {
        /// TOML configuration file (every key is documented in parley.example.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (SQLite, QUIC certificate, admin token); overrides the config.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Check a configuration file and exit (non-zero with the key and line on error).
    CheckConfig {
        /// The file.
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PARLEY_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        // Colour codes only on a terminal: log files must stay grep-able.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().cmd {
        Cmd::CheckConfig { config } => {
            Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Cmd::Run { config, data_dir } => {
            let mut cfg = match config {
                Some(path) => Config::load(&path)?,
                None => Config::demo(),
            };
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            actix_rt::System::new().block_on(parley_switch::node::run(cfg))
        }
    }
}
