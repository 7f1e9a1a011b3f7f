//! A PostgreSQL database for one test: a fresh database on the server
//! `PARLEY_TEST_POSTGRES` names (`.ci/test` starts one private cluster for the whole run),
//! or else on a private cluster this test starts itself (`initdb` + `pg_ctl` from Debian's
//! `postgresql`, on a free loopback port, as the `postgres` user when run as root) and
//! stops when the guard drops. With neither, the test fails and says what is missing: a
//! PostgreSQL test never passes without a PostgreSQL server.
//!
//! Shared by the store's unit tests (included with `#[path]`) and the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A database of its own for one test; the private cluster (if any) stops on drop.
pub struct TestPostgres {
    /// `postgres://parley@127.0.0.1:PORT/DATABASE`.
    pub url: String,
    _cluster: Option<Cluster>,
}

/// A private PostgreSQL cluster in a temporary directory.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    /// `postgres://parley@127.0.0.1:PORT` (no database).
    pub server: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = run_pg(
            &self.bin,
            "pg_ctl",
            self.as_postgres,
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where Debian's server binaries are: beside `initdb` on the PATH, or the newest
/// `/usr/lib/postgresql/*/bin`.
fn pg_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").exists() && d.join("pg_ctl").exists() {
                // A symlink into the version's directory, where `postgres` is too.
                let real = std::fs::canonicalize(d.join("initdb")).ok()?;
                return real.parent().map(Path::to_path_buf);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

/// Whether this process runs as root (initdb refuses to).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn run_pg(bin: &Path, tool: &str, as_postgres: bool, args: &[&str]) -> Result<String, String> {
    let exe = bin.join(tool);
    let out = if as_postgres {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&exe)
            .args(args)
            .output()
    } else {
        Command::new(&exe).args(args).output()
    }
    .map_err(|e| format!("{}: {e}", exe.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn uid_gid_of(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

impl Cluster {
    /// Starts a private cluster (fsync off: test data), user `parley`, trust auth on
    /// loopback only.
    pub fn start() -> Self {
        let bin = pg_bin().unwrap_or_else(|| {
            panic!(
                "PostgreSQL tests need a server: set PARLEY_TEST_POSTGRES=postgres://USER@HOST:PORT \
                 or install Debian's postgresql (initdb and pg_ctl were not found)"
            )
        });
        let as_postgres = is_root();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "parley-pg-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cluster directory");
        if as_postgres {
            let (uid, gid) = uid_gid_of("postgres")
                .expect("running as root: PostgreSQL needs its `postgres` user (Debian's postgresql creates it)");
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown cluster directory");
        }
        let data = dir.join("data");
        let data_s = data.to_string_lossy().into_owned();
        run_pg(
            &bin,
            "initdb",
            as_postgres,
            &[
                "-D",
                &data_s,
                "-U",
                "parley",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300",
            dir.display()
        );
        let log = dir.join("server.log").to_string_lossy().into_owned();
        run_pg(
            &bin,
            "pg_ctl",
            as_postgres,
            &["-D", &data_s, "-o", &opts, "-l", &log, "-w", "start"],
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        Self {
            dir,
            bin,
            as_postgres,
            server: format!("postgres://parley@127.0.0.1:{port}"),
        }
    }
}

/// A fresh database for one test.
pub async fn database() -> TestPostgres {
    let (server, cluster) = match std::env::var("PARLEY_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => (url.trim_end_matches('/').to_owned(), None),
        _ => {
            let c = tokio::task::spawn_blocking(Cluster::start)
                .await
                .expect("starting PostgreSQL");
            (c.server.clone(), Some(c))
        }
    };
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "test_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    use sqlx::Connection;
    let mut admin = sqlx::postgres::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {server}: {e}"));
    // The name is made here of digits and underscores.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE on {server}: {e}"));
    let _ = admin.close().await;
    TestPostgres {
        url: format!("{server}/{name}"),
        _cluster: cluster,
    }
}
