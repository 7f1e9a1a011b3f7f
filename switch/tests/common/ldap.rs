//! Real OpenLDAP `slapd` directories and real `parley auth-agent` processes for the
//! federation tests.
//!
//! Each [`Slapd`] is a private server on a free loopback port, built from a generated
//! cn=config (`back_mdb`, the ppolicy overlay, the core/cosine/inetorgperson schemas and a
//! small auxiliary class `user` carrying Active Directory's account attributes, so one
//! directory holds accounts both an `openldap` and an `active_directory` agent can read;
//! optionally LDAPS and StartTLS with a certificate from a test CA). Missing slapd fails the test: CI
//! installs Debian's `slapd` and `ldap-utils`.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Node;

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";
const LDAPMODIFY: &str = "/usr/bin/ldapmodify";

/// The root DN's password of every test directory.
pub const ROOT_PW: &str = "secret";
/// The service account's password.
pub const SERVICE_PW: &str = "svc-pw";

fn need(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install Debian's slapd and ldap-utils (CI's .ci/test does)"
    );
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A user entry for [`Slapd::start`].
pub struct Person<'a> {
    /// `uid`.
    pub uid: &'a str,
    /// `cn`.
    pub cn: &'a str,
    /// `userPassword`.
    pub password: &'a str,
    /// `telephoneNumber`s.
    pub phones: &'a [&'a str],
    /// `mobile`.
    pub mobile: Option<&'a str>,
    /// Extra LDIF lines (e.g. `pwdAccountLockedTime: 000001010000Z`).
    pub extra: &'a str,
}

/// A running slapd.
pub struct Slapd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `ldap://127.0.0.1:PORT`.
    pub url: String,
    /// The suffix, e.g. `dc=acme,dc=test`.
    pub suffix: String,
    /// `ldaps://127.0.0.1:PORT` when started with TLS.
    pub ldaps_url: Option<String>,
    /// The test CA's certificate (PEM) when started with TLS.
    pub ca_file: Option<PathBuf>,
    port: u16,
    tls_port: Option<u16>,
}

impl Slapd {
    /// Starts a directory under `dc=<org>,dc=test` with a service account
    /// `cn=svc,dc=<org>,dc=test` and the given people under `ou=people`.
    pub fn start(org: &str, people: &[Person<'_>]) -> Slapd {
        Self::start_inner(org, people, false)
    }

    /// As [`Slapd::start`], also serving LDAPS ([`Slapd::ldaps_url`]) and StartTLS on the
    /// plain port, with a certificate for 127.0.0.1 from a test CA ([`Slapd::ca_file`]).
    pub fn start_tls(org: &str, people: &[Person<'_>]) -> Slapd {
        Self::start_inner(org, people, true)
    }

    fn start_inner(org: &str, people: &[Person<'_>], tls: bool) -> Slapd {
        for p in [SLAPD, SLAPADD, LDAPMODIFY] {
            need(p);
        }
        let dir = tempfile::tempdir().unwrap();
        let suffix = format!("dc={org},dc=test");
        let cfg = dir.path().join("slapd.d");
        let db = dir.path().join("db");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::create_dir_all(&db).unwrap();
        let tls_lines = if tls {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "test directory CA");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let params =
                rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                    .unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
            std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("server-key.pem"), key.serialize_pem()).unwrap();
            format!(
                "olcTLSCertificateFile: {}\nolcTLSCertificateKeyFile: {}\n",
                dir.path().join("server.pem").display(),
                dir.path().join("server-key.pem").display()
            )
        } else {
            String::new()
        };
        let config = format!(
            r#"dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {pid}
{tls_lines}
dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb
olcModuleLoad: ppolicy

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file:///etc/ldap/schema/core.ldif
include: file:///etc/ldap/schema/cosine.ldif
include: file:///etc/ldap/schema/inetorgperson.ldif

dn: cn=parleytest,cn=schema,cn=config
objectClass: olcSchemaConfig
cn: parleytest
olcAttributeTypes: ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName' EQUALITY caseIgnoreMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.8 NAME 'userAccountControl' EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.96 NAME 'pwdLastSet' EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.662 NAME 'lockoutTime' EQUALITY integerMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.2.102 NAME 'memberOf' EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
olcObjectClasses: ( 1.3.6.1.4.1.55555.1.1 NAME 'user' AUXILIARY MAY ( sAMAccountName $ userAccountControl $ pwdLastSet $ lockoutTime $ memberOf ) )

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {suffix}
olcRootDN: cn=admin,{suffix}
olcRootPW: {ROOT_PW}
olcDbDirectory: {db}
olcAccess: {{0}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{1}}to * by users read by * none

dn: olcOverlay={{0}}ppolicy,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcPPolicyConfig
olcOverlay: {{0}}ppolicy
"#,
            pid = dir.path().join("slapd.pid").display(),
            db = db.display(),
        );
        let config_path = dir.path().join("config.ldif");
        std::fs::write(&config_path, config).unwrap();
        run(Command::new(SLAPADD)
            .args(["-n0", "-F"])
            .arg(&cfg)
            .arg("-l")
            .arg(&config_path));
        let mut data = format!(
            "dn: {suffix}\nobjectClass: dcObject\nobjectClass: organization\ndc: {org}\no: {org}\n\n\
             dn: ou=people,{suffix}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: cn=svc,{suffix}\nobjectClass: person\ncn: svc\nsn: svc\nuserPassword: {SERVICE_PW}\n\n"
        );
        for p in people {
            data.push_str(&person_ldif(&suffix, p));
        }
        let data_path = dir.path().join("data.ldif");
        std::fs::write(&data_path, data).unwrap();
        run(Command::new(SLAPADD)
            .args(["-n1", "-F"])
            .arg(&cfg)
            .arg("-l")
            .arg(&data_path));
        let port = free_tcp_port();
        let tls_port = tls.then(free_tcp_port);
        let mut s = Slapd {
            child: None,
            url: format!("ldap://127.0.0.1:{port}"),
            ldaps_url: tls_port.map(|p| format!("ldaps://127.0.0.1:{p}")),
            ca_file: tls.then(|| dir.path().join("ca.pem")),
            dir,
            suffix,
            port,
            tls_port,
        };
        s.resume();
        s
    }

    /// (Re)starts the server on its port (after [`Slapd::pause`]).
    pub fn resume(&mut self) {
        let cfg = self.dir.path().join("slapd.d");
        // -d 0: stay in the foreground (so the test owns the process), log nothing.
        let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
        if let Some(p) = self.tls_port {
            urls.push_str(&format!(" ldaps://127.0.0.1:{p}/"));
        }
        let child = Command::new(SLAPD)
            .args(["-d", "0", "-h"])
            .arg(urls)
            .arg("-F")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn slapd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "slapd did not start on {}",
                self.url
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's process id (0 while paused).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Stops the server (the directory is then unreachable).
    pub fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Applies LDIF changes as the root DN.
    pub fn modify(&self, ldif: &str) {
        let mut child = Command::new(LDAPMODIFY)
            .args(["-x", "-H", &self.url, "-D"])
            .arg(format!("cn=admin,{}", self.suffix))
            .args(["-w", ROOT_PW])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ldapmodify");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ldif.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "ldapmodify failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The DN of a person.
    pub fn dn(&self, uid: &str) -> String {
        format!("uid={uid},ou=people,{}", self.suffix)
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.pause();
    }
}

fn person_ldif(suffix: &str, p: &Person<'_>) -> String {
    let mut s = format!(
        "dn: uid={uid},ou=people,{suffix}\nobjectClass: inetOrgPerson\nobjectClass: user\nuid: {uid}\nsAMAccountName: {uid}\ncn: {cn}\ndisplayName: {cn}\nsn: {cn}\nuserPassword: {pw}\n",
        uid = p.uid,
        cn = p.cn,
        pw = p.password
    );
    for ph in p.phones {
        s.push_str(&format!("telephoneNumber: {ph}\n"));
    }
    if let Some(m) = p.mobile {
        s.push_str(&format!("mobile: {m}\n"));
    }
    s.push_str(p.extra);
    if !p.extra.is_empty() && !p.extra.ends_with('\n') {
        s.push('\n');
    }
    s.push('\n');
    s
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run slapadd");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates a directory tenant on the node and returns an enrolment token for it.
pub fn directory_tenant(node: &Node, name: &str, region: &str) -> String {
    let (st, body) = node.post(
        "/api/v1/tenants",
        &format!(r#"{{"name":"{name}","region":"{region}","directory":true}}"#),
        true,
    );
    assert_eq!(st, 201, "{body}");
    enrolment_token(node, name)
}

/// A fresh enrolment token for a tenant.
pub fn enrolment_token(node: &Node, tenant: &str) -> String {
    let (st, body) = node.post(
        &format!("/api/v1/tenants/{tenant}/enrolment-tokens"),
        "",
        true,
    );
    assert_eq!(st, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["token"].as_str().unwrap().to_owned()
}

/// A running `parley auth-agent`.
pub struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Its id on the node.
    pub id: String,
}

impl Agent {
    /// Enrols an agent with `token` and starts it with `directory` as its `[directory]`
    /// section body (TOML), plus `extra` top-level keys.
    pub fn start(node: &Node, token: &str, directory: &str, extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let out = Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["auth-agent", "enroll", "--node"])
            .arg(node.agents.expect("node has an agent endpoint").to_string())
            .args(["--token", token, "--state-dir"])
            .arg(&state)
            .args(["--name", "test-agent"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "enrolment failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            node.log()
        );
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state.join("agent.json")).unwrap()).unwrap();
        let cfg = format!(
            "node = \"{node}\"\nstate_dir = \"{state}\"\n{extra}\n[directory]\n{directory}\n",
            node = node.agents.unwrap(),
            state = state.display(),
        );
        std::fs::write(dir.path().join("agent.toml"), cfg).unwrap();
        let mut a = Agent {
            child: None,
            dir,
            id: json["agent_id"].as_str().unwrap().to_owned(),
        };
        a.resume();
        a
    }

    /// Starts (again) the agent process on its configuration.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["auth-agent", "run", "--config"])
            .arg(self.dir.path().join("agent.toml"))
            .env("PARLEY_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn auth agent");
        self.child = Some(child);
    }

    /// The agent's process id (0 while killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILLs the agent.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Rewrites the agent's configuration (takes effect at the next [`Agent::resume`]).
    pub fn reconfigure(&self, directory: &str, extra: &str, node: SocketAddr) {
        let cfg = format!(
            "node = \"{node}\"\nstate_dir = \"{state}\"\n{extra}\n[directory]\n{directory}\n",
            state = self.state_dir().display(),
        );
        std::fs::write(self.dir.path().join("agent.toml"), cfg).unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `[directory]` section for an OpenLDAP test directory at `urls` (failover order).
/// Acme's directory: alice (two numbers), bob (locked), carol (disabled, Active Directory
/// style), dave (a national number).
pub fn acme_people() -> Vec<Person<'static>> {
    vec![
        Person {
            uid: "alice",
            cn: "Alice Martin",
            password: "alice-pw",
            phones: &["+33 1 23 45 67 89"],
            mobile: Some("06 12 34 56 78"),
            extra: "mail: alice@acme.test",
        },
        Person {
            uid: "bob",
            cn: "Bob Locked",
            password: "bob-pw",
            phones: &[],
            mobile: None,
            extra: "pwdAccountLockedTime: 000001010000Z",
        },
        Person {
            uid: "carol",
            cn: "Carol Disabled",
            password: "carol-pw",
            phones: &["+33 1 23 45 67 00"],
            mobile: None,
            // Active Directory's ACCOUNTDISABLE bit (514 = NORMAL_ACCOUNT | DISABLE).
            extra: "userAccountControl: 514",
        },
        Person {
            uid: "dave",
            cn: "Dave Directory",
            password: "dave-pw",
            phones: &["01 23 45 67 11"],
            mobile: None,
            extra: "",
        },
    ]
}

/// Makes `tenant` (region `region`) a directory tenant of `node`, enrols and starts an
/// agent reading `slapd` (with `agent_extra` top-level keys), and waits for it to connect.
pub fn directory_agent(
    node: &Node,
    slapd: &Slapd,
    tenant: &str,
    region: &str,
    agent_extra: &str,
) -> Agent {
    let token = directory_tenant(node, tenant, region);
    let agent = Agent::start(
        node,
        &token,
        &directory_section(slapd, &[&slapd.url]),
        agent_extra,
    );
    wait_for_metric(
        node,
        &format!("parley_auth_agents_connected{{tenant=\"{tenant}\"}}"),
        |v| v == 1.0,
        "agents connected",
    );
    agent
}

pub fn directory_section(slapd: &Slapd, urls: &[&str]) -> String {
    let servers: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "servers = [{}]\nbind_dn = \"cn=svc,{s}\"\nbind_password = \"{SERVICE_PW}\"\nbase = \"ou=people,{s}\"\ntimeout_ms = 1000\n",
        servers.join(", "),
        s = slapd.suffix
    )
}

/// Waits until the node's metric (summed over lines starting with `prefix`) satisfies
/// `pred`, or fails with the logs.
pub fn wait_for_metric(node: &Node, prefix: &str, pred: impl Fn(f64) -> bool, what: &str) {
    wait_for_metric_within(node, prefix, pred, what, Duration::from_secs(30));
}

/// [`wait_for_metric`] with its own deadline.
pub fn wait_for_metric_within(
    node: &Node,
    prefix: &str,
    pred: impl Fn(f64) -> bool,
    what: &str,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let v = node.metric(prefix);
        if pred(v) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {prefix} = {v}\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
