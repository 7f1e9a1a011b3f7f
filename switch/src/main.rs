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
    /// Manage tenants of a running node through its admin API: create one, issue
    /// enrolment tokens for its auth agents, list and revoke agents, set federation rules.
    Tenant {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// Work with a running node's CDRs: import a carrier's CDR file into its users'
    /// address books.
    Cdr {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        cmd: CdrCmd,
    },
    /// Run an auth agent: the process inside an enterprise network that checks its users'
    /// passwords against the enterprise's LDAP / Active Directory for the node
    /// (docs/auth.md). `enroll` once with a token from `parley tenant token`, then `run`.
    AuthAgent {
        #[command(subcommand)]
        cmd: AgentCmd,
    },
}

/// Where the node's admin API is.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// The node's HTTP address (default: from <data-dir>/node.json).
    #[arg(long, global = true)]
    node: Option<String>,
    /// Admin token (default: <data-dir>/admin-token).
    #[arg(
        long,
        env = "PARLEY_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// The running node's data directory.
    #[arg(long, default_value = "parley-data", global = true)]
    data_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum TenantCmd {
    /// Create a tenant (or change its region / directory flag).
    Create {
        /// Tenant name (a-z, 0-9, '.', '_', '-').
        name: String,
        /// ISO 3166 region for its users' directory numbers (e.g. FR, US).
        #[arg(long)]
        region: String,
        /// Its users log in through auth agents against its directory.
        #[arg(long)]
        directory: bool,
    },
    /// List tenants.
    List,
    /// Issue a one-time enrolment token for an auth agent of a tenant.
    Token {
        /// Tenant name.
        name: String,
        /// Seconds the token stays usable (default: the node's federation.enrolment_token_secs).
        #[arg(long)]
        ttl_secs: Option<u64>,
    },
    /// List a tenant's agents.
    Agents {
        /// Tenant name.
        name: String,
    },
    /// Revoke an agent: its connection is closed and refused from then on.
    Revoke {
        /// Agent id (from `agents`).
        agent: String,
    },
    /// Set which tenants a tenant's users may reach (both sides must allow each other).
    Federate {
        /// Tenant name.
        name: String,
        /// Tenants allowed (none: no federation).
        allow: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CdrCmd {
    /// Send a carrier CDR file to the node (streamed, with progress), which adds each call
    /// to the address books of the tenant's users whose numbers it names; prints the
    /// report (imported, duplicates, unmatched, rejected rows with line and reason).
    /// Importing a file again adds nothing.
    Import {
        /// asterisk (Master.csv of cdr_csv), freeswitch (the default cdr_csv template), or
        /// generic (a header row; name the columns with --column).
        #[arg(long)]
        format: String,
        /// The tenant whose users the file's numbers are matched against.
        #[arg(long, default_value = "demo")]
        tenant: String,
        /// For generic files: FIELD=HEADER, FIELD one of src, dst, start (required), name,
        /// answer, end, duration, billsec, disposition, id. Repeat for each column.
        #[arg(long = "column", value_name = "FIELD=HEADER")]
        columns: Vec<String>,
        /// The CSV file.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCmd {
    /// Enrol with the node: present the token once, generate a key pair, keep the
    /// certificate the node signs.
    Enroll {
        /// The node's agent endpoint, host:port.
        #[arg(long)]
        node: String,
        /// The enrolment token (`parley tenant token`).
        #[arg(long, env = "PARLEY_ENROLMENT_TOKEN", hide_env_values = true)]
        token: String,
        /// Where to keep the key, certificate and node pin.
        #[arg(long)]
        state_dir: PathBuf,
        /// A name for this agent, shown to operators (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Serve the node's login requests (see auth-agent.example.toml).
    Run {
        /// The agent's TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// The admin API's base URL and token.
fn admin_target(args: &AdminArgs) -> anyhow::Result<(String, String)> {
    let base = match &args.node {
        Some(n) if n.starts_with("http") => n.trim_end_matches('/').to_owned(),
        Some(n) => format!("http://{n}"),
        None => {
            let p = args.data_dir.join("node.json");
            let info: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&p).map_err(|e| {
                    anyhow::anyhow!("{}: {e} (is the node running? or give --node)", p.display())
                })?)?;
            format!("http://{}", info["http"].as_str().unwrap_or_default())
        }
    };
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let p = args.data_dir.join("admin-token");
            std::fs::read_to_string(&p)
                .map_err(|e| anyhow::anyhow!("{}: {e} (or give --token)", p.display()))?
                .trim()
                .to_owned()
        }
    };
    Ok((base, token))
}

fn http_client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// Reads an admin API answer: JSON (or the text), an error above 299.
fn admin_answer(
    what: &str,
    mut resp: ureq::http::Response<ureq::Body>,
) -> anyhow::Result<serde_json::Value> {
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string()?;
    let value: serde_json::Value =
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    if status >= 300 {
        anyhow::bail!("{what}: HTTP {status}: {value}");
    }
    Ok(value)
}

/// Calls the admin API.
fn admin(
    args: &AdminArgs,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let (base, token) = admin_target(args)?;
    let agent = http_client();
    let url = format!("{base}{path}");
    let auth = format!("Bearer {token}");
    let resp = match (method, body) {
        ("GET", _) => agent.get(&url).header("Authorization", &auth).call()?,
        ("POST", Some(b)) => agent
            .post(&url)
            .header("Authorization", &auth)
            .send_json(b)?,
        ("POST", None) => agent
            .post(&url)
            .header("Authorization", &auth)
            .send_empty()?,
        (_, b) => agent
            .put(&url)
            .header("Authorization", &auth)
            .send_json(b.unwrap_or_default())?,
    };
    admin_answer(&format!("{method} {path}"), resp)
}

const IMPORT_FIELDS: &[&str] = &[
    "src",
    "dst",
    "start",
    "name",
    "answer",
    "end",
    "duration",
    "billsec",
    "disposition",
    "id",
];

fn cdr(admin_args: &AdminArgs, cmd: CdrCmd) -> anyhow::Result<()> {
    let CdrCmd::Import {
        format,
        tenant,
        columns,
        file,
    } = cmd;
    let (base, token) = admin_target(admin_args)?;
    let mut query = vec![("format", format.as_str()), ("tenant", tenant.as_str())];
    for c in &columns {
        let Some((field, header)) = c.split_once('=') else {
            anyhow::bail!("--column {c:?}: expected FIELD=HEADER (e.g. src=caller)");
        };
        let Some(field) = IMPORT_FIELDS.iter().find(|f| **f == field) else {
            anyhow::bail!(
                "--column {c:?}: unknown field {field:?} (one of {})",
                IMPORT_FIELDS.join(", ")
            );
        };
        query.push((field, header));
    }
    let f = std::fs::File::open(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let len = f.metadata()?.len();
    // Progress on stderr (a bar on a terminal, lines otherwise); the report goes to stdout.
    let bar = indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, {eta} left)",
        )?
        .progress_chars("=> "),
    );
    bar.set_message(format!("importing {}", file.display()));
    let on_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let reader = std::io::BufReader::with_capacity(256 * 1024, f);
    let mut body = bar.wrap_read(ProgressLines::new(
        reader,
        (!on_terminal).then(|| (file.display().to_string(), len)),
    ));
    let resp = http_client()
        .post(format!("{base}/api/v1/cdrs/import"))
        .query_pairs(query)
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "text/csv")
        .send(ureq::SendBody::from_reader(&mut body))?;
    bar.finish_and_clear();
    let report = admin_answer(&format!("import of {}", file.display()), resp)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    // A file read only in part fails the command (after its report), for scripts.
    if let Some(why) = report.get("stopped").and_then(|v| v.as_str()) {
        anyhow::bail!("{}: import stopped at {why}", file.display());
    }
    Ok(())
}

/// Progress of an upload as lines on stderr, for a run whose stderr is a log rather than
/// a terminal (a cron job, a pipe): one line at each tenth of the file, and one when it
/// is all sent. On a terminal the bar draws instead and this stays quiet.
struct ProgressLines<R> {
    inner: R,
    /// The file's name and size; `None`: quiet.
    file: Option<(String, u64)>,
    sent: u64,
    /// Tenths reported so far.
    tenths: u64,
}

impl<R> ProgressLines<R> {
    fn new(inner: R, file: Option<(String, u64)>) -> Self {
        Self {
            inner,
            file,
            sent: 0,
            tenths: 0,
        }
    }
}

impl<R: std::io::Read> std::io::Read for ProgressLines<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sent += n as u64;
        if let Some((name, len)) = &self.file {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let tenths = (self.sent * 10).checked_div(*len).unwrap_or(10).min(10);
            if n == 0 && self.tenths <= 10 {
                eprintln!(
                    "importing {name}: sent {:.1} MiB (100%); waiting for the node's report",
                    mib(self.sent)
                );
                self.tenths = 11;
            } else if tenths > self.tenths && tenths < 10 {
                self.tenths = tenths;
                eprintln!(
                    "importing {name}: {:.1} of {:.1} MiB sent ({}%)",
                    mib(self.sent),
                    mib(*len),
                    tenths * 10
                );
            }
        }
        Ok(n)
    }
}

fn tenant(admin_args: &AdminArgs, cmd: TenantCmd) -> anyhow::Result<()> {
    let out = match cmd {
        TenantCmd::Create {
            name,
            region,
            directory,
        } => admin(
            admin_args,
            "POST",
            "/api/v1/tenants",
            Some(serde_json::json!({"name": name, "region": region, "directory": directory})),
        )?,
        TenantCmd::List => admin(admin_args, "GET", "/api/v1/tenants", None)?,
        TenantCmd::Token { name, ttl_secs } => admin(
            admin_args,
            "POST",
            &format!("/api/v1/tenants/{name}/enrolment-tokens"),
            Some(serde_json::json!({"ttl_secs": ttl_secs})),
        )?,
        TenantCmd::Agents { name } => admin(
            admin_args,
            "GET",
            &format!("/api/v1/tenants/{name}/agents"),
            None,
        )?,
        TenantCmd::Revoke { agent } => admin(
            admin_args,
            "POST",
            &format!("/api/v1/agents/{agent}/revoke"),
            None,
        )?,
        TenantCmd::Federate { name, allow } => admin(
            admin_args,
            "PUT",
            &format!("/api/v1/tenants/{name}/federation"),
            Some(serde_json::json!({"allow": allow})),
        )?,
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn auth_agent(cmd: AgentCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        AgentCmd::Enroll {
            node,
            token,
            state_dir,
            name,
        } => {
            let name = name.unwrap_or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "agent".into())
            });
            let state = rt.block_on(parley_switch::agent::enroll(
                &node, &token, &state_dir, &name,
            ))?;
            println!(
                "enrolled: agent {} of tenant {} (state in {})",
                state.agent_id,
                state.tenant,
                state_dir.display()
            );
            Ok(())
        }
        AgentCmd::Run { config } => {
            let cfg = parley_switch::agent::AgentConfig::load(&config)?;
            rt.block_on(parley_switch::agent::run(cfg))
        }
    }
}

/// A node holds a descriptor per relay port, device connection and SIP connection: the
/// soft open-file limit (often 1,024) is raised to the hard limit, as servers do.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => tracing::warn!(limit = soft, error = %e, "cannot raise the open-file limit"),
        }
    }
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
        Cmd::Tenant { admin, cmd } => tenant(&admin, cmd),
        Cmd::Cdr { admin, cmd } => cdr(&admin, cmd),
        Cmd::AuthAgent { cmd } => auth_agent(cmd),
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
            raise_open_file_limit();
            actix_rt::System::new().block_on(parley_switch::node::run(cfg))
        }
    }
}
