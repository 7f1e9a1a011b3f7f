//! Tenants, federation rules, enrolment tokens, auth agents and directory users.
//!
//! A tenant whose `directory` flag is set authenticates through its auth agents
//! (`docs/auth.md`); the node keeps what the directory says about its users (names,
//! numbers, never a credential) so that calls route by directory number before the user
//! has logged in and after a restart. Enrolment tokens are kept as SHA-256 hashes: the
//! database never holds one that could be replayed.

use std::time::{Duration, SystemTime};

use parley_codecs::agent::DirectoryUser;
use serde::Serialize;
use sqlx::Row;

use super::{Store, StoreError, unix_ms};

/// A tenant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TenantRow {
    /// Name (what devices give in `login`).
    pub name: String,
    /// Region for E.164 normalisation of directory numbers (ISO 3166 alpha-2).
    pub region: String,
    /// Users authenticate through auth agents against the tenant's directory.
    pub directory: bool,
}

/// An enrolled auth agent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AgentRow {
    /// Id (its certificate's CN).
    pub id: String,
    /// Tenant (its certificate's O).
    pub tenant: String,
    /// The name the agent gave at enrolment.
    pub name: String,
    /// Revoked agents are refused at the handshake.
    pub revoked: bool,
    /// When it enrolled, Unix ms.
    pub enrolled_ms: i64,
}

/// A certificate issued to an agent (an agent has a few while it renews).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCertRow {
    /// Hex SHA-256 of the certificate's DER.
    pub fingerprint: String,
    /// The agent.
    pub agent_id: String,
    /// Its tenant.
    pub tenant: String,
    /// End of validity, Unix ms.
    pub not_after_ms: i64,
    /// Whether the agent is revoked.
    pub revoked: bool,
}

/// What redeeming an enrolment token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    /// Valid: it is now used up.
    Tenant(String),
    /// Unknown, expired or already used.
    Refused,
}

/// A user as the node keeps them (built-in or from a directory).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DirectoryUserRow {
    /// Tenant.
    pub tenant: String,
    /// User name.
    pub user: String,
    /// E.164 numbers the user is reached at; the first is presented as their caller id.
    pub numbers: Vec<String>,
    /// Display name.
    pub display_name: Option<String>,
}

impl Store {
    /// Creates a tenant, or updates its region and directory flag.
    pub async fn upsert_tenant(&self, t: &TenantRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tenants (name, region, directory, created_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET region = excluded.region, directory = excluded.directory",
        )
        .bind(&t.name)
        .bind(&t.region)
        .bind(i64::from(t.directory))
        .bind(unix_ms(SystemTime::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every tenant created through the admin API or the CLI.
    pub async fn tenants(&self) -> Result<Vec<TenantRow>, StoreError> {
        let rows = sqlx::query("SELECT name, region, directory FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| TenantRow {
                name: r.get("name"),
                region: r.get("region"),
                directory: r.get::<i64, _>("directory") != 0,
            })
            .collect())
    }

    /// Replaces the tenants `tenant` allows its users to reach (one side of a rule: both
    /// tenants must allow each other).
    pub async fn set_federation(&self, tenant: &str, peers: &[String]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM tenant_federation WHERE tenant = $1")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        for p in peers {
            sqlx::query("INSERT INTO tenant_federation (tenant, peer) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(tenant)
                .bind(p)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every (tenant, peer) one-sided allowance.
    pub async fn federation(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT tenant, peer FROM tenant_federation ORDER BY tenant, peer")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get("tenant"), r.get("peer")))
            .collect())
    }

    /// Stores an enrolment token's hash for `tenant`, usable once until `expires`.
    pub async fn add_enrolment_token(
        &self,
        hash: &str,
        tenant: &str,
        expires: SystemTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO enrolment_tokens (hash, tenant, expires_ms, used) VALUES ($1, $2, $3, 0)",
        )
        .bind(hash)
        .bind(tenant)
        .bind(unix_ms(expires))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Uses up an enrolment token: the tenant when it was valid, in one statement so two
    /// agents racing with the same token cannot both enrol.
    pub async fn redeem_enrolment_token(&self, hash: &str) -> Result<TokenUse, StoreError> {
        let row = sqlx::query(
            "UPDATE enrolment_tokens SET used = 1 WHERE hash = $1 AND used = 0 AND expires_ms > $2 RETURNING tenant",
        )
        .bind(hash)
        .bind(unix_ms(SystemTime::now()))
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => TokenUse::Tenant(r.get("tenant")),
            None => TokenUse::Refused,
        })
    }

    /// Records a newly enrolled agent and its first certificate.
    pub async fn add_agent(
        &self,
        agent: &AgentRow,
        fingerprint: &str,
        not_after: SystemTime,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO agents (id, tenant, name, revoked, enrolled_ms) VALUES ($1, $2, $3, 0, $4)",
        )
        .bind(&agent.id)
        .bind(&agent.tenant)
        .bind(&agent.name)
        .bind(agent.enrolled_ms)
        .execute(&mut *tx)
        .await?;
        add_cert(&mut *tx, &agent.id, fingerprint, not_after).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a renewed certificate of an agent.
    pub async fn add_agent_cert(
        &self,
        agent_id: &str,
        fingerprint: &str,
        not_after: SystemTime,
    ) -> Result<(), StoreError> {
        add_cert(&self.pool, agent_id, fingerprint, not_after).await
    }

    /// Marks an agent revoked; `false` when there is no such agent.
    pub async fn revoke_agent(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE agents SET revoked = 1 WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Agents, optionally of one tenant.
    pub async fn agents(&self, tenant: Option<&str>) -> Result<Vec<AgentRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant, name, revoked, enrolled_ms FROM agents WHERE ($1 IS NULL OR tenant = $1) ORDER BY enrolled_ms, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AgentRow {
                id: r.get("id"),
                tenant: r.get("tenant"),
                name: r.get("name"),
                revoked: r.get::<i64, _>("revoked") != 0,
                enrolled_ms: r.get("enrolled_ms"),
            })
            .collect())
    }

    /// Every unexpired agent certificate, with its agent's tenant and standing.
    pub async fn agent_certs(&self) -> Result<Vec<AgentCertRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.fingerprint, c.agent_id, a.tenant, c.not_after_ms, a.revoked FROM agent_certs c \
             JOIN agents a ON a.id = c.agent_id WHERE c.not_after_ms > $1",
        )
        .bind(unix_ms(SystemTime::now()))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AgentCertRow {
                fingerprint: r.get("fingerprint"),
                agent_id: r.get("agent_id"),
                tenant: r.get("tenant"),
                not_after_ms: r.get("not_after_ms"),
                revoked: r.get::<i64, _>("revoked") != 0,
            })
            .collect())
    }

    /// Replaces the directory users of `tenant` (the result of a sync): listed users are
    /// inserted or updated, directory users not listed are removed. Built-in users of the
    /// tenant are left alone. `users` are (user, E.164 numbers, display name).
    pub async fn replace_directory_users(
        &self,
        tenant: &str,
        users: &[DirectoryUserRow],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE users SET source = 'stale' WHERE tenant = $1 AND source = 'directory'")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        for u in users {
            upsert_directory_user(&mut *tx, u).await?;
        }
        sqlx::query("DELETE FROM users WHERE tenant = $1 AND source = 'stale'")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Inserts or updates one directory user (learned from a login).
    pub async fn upsert_directory_user(&self, u: &DirectoryUserRow) -> Result<(), StoreError> {
        upsert_directory_user(&self.pool, u).await
    }

    /// Every user with all their numbers and names, built-in users first, then directory
    /// users in the order the node learned them (so that when two users list the same
    /// number, the one who had it first keeps it across restarts).
    /// The flag says whether the user came from a directory.
    pub async fn all_users(&self) -> Result<Vec<(DirectoryUserRow, bool)>, StoreError> {
        let sql = format!(
            "SELECT tenant, username, number, numbers, display_name, source FROM users \
             ORDER BY CASE source WHEN 'local' THEN 0 ELSE 1 END, {}",
            self.backend.row_id()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let extra: Option<String> = r.get("numbers");
                let mut numbers = vec![r.get::<String, _>("number")];
                if let Some(json) = extra
                    && let Ok(more) = serde_json::from_str::<Vec<String>>(&json)
                {
                    numbers = more;
                }
                numbers.retain(|n| !n.is_empty());
                let source: String = r.get("source");
                (
                    DirectoryUserRow {
                        tenant: r.get("tenant"),
                        user: r.get("username"),
                        numbers,
                        display_name: r.get("display_name"),
                    },
                    source != "local",
                )
            })
            .collect())
    }
}

async fn add_cert<'e>(
    exec: impl sqlx::Executor<'e, Database = sqlx::Any>,
    agent_id: &str,
    fingerprint: &str,
    not_after: SystemTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO agent_certs (fingerprint, agent_id, not_after_ms) VALUES ($1, $2, $3)",
    )
    .bind(fingerprint)
    .bind(agent_id)
    .bind(unix_ms(not_after))
    .execute(exec)
    .await?;
    Ok(())
}

async fn upsert_directory_user<'e>(
    exec: impl sqlx::Executor<'e, Database = sqlx::Any>,
    u: &DirectoryUserRow,
) -> Result<(), StoreError> {
    let numbers = serde_json::to_string(&u.numbers).unwrap_or_else(|_| "[]".into());
    // A built-in user of the same name keeps their password; only names and numbers of
    // directory users are written here.
    sqlx::query(
        "INSERT INTO users (tenant, username, number, password_hash, display_name, numbers, source) \
         VALUES ($1, $2, $3, '', $4, $5, 'directory') \
         ON CONFLICT (tenant, username) DO UPDATE SET number = excluded.number, \
         display_name = excluded.display_name, numbers = excluded.numbers, \
         source = CASE users.source WHEN 'local' THEN 'local' ELSE 'directory' END",
    )
    .bind(&u.tenant)
    .bind(&u.user)
    .bind(u.numbers.first().cloned().unwrap_or_default())
    .bind(&u.display_name)
    .bind(numbers)
    .execute(exec)
    .await?;
    Ok(())
}

/// Converts a profile from a directory into what the node keeps, numbers normalised to
/// E.164 with the tenant's region (numbers that do not parse are dropped).
pub fn directory_row(tenant: &TenantRow, p: &DirectoryUser) -> DirectoryUserRow {
    let mut numbers: Vec<String> = Vec::new();
    for n in &p.numbers {
        if let Some(e164) = crate::numbers::to_e164(n, &tenant.region)
            && !numbers.contains(&e164)
        {
            numbers.push(e164);
        }
    }
    DirectoryUserRow {
        tenant: tenant.name.clone(),
        user: p.user.clone(),
        numbers,
        display_name: p.display_name.clone(),
    }
}

/// Default lifetime of an enrolment token.
pub const ENROLMENT_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    both_backends! {
    async fn tokens_are_used_once_and_directory_users_replace_by_sync(store: Store) {
        let acme = TenantRow {
            name: "acme".into(),
            region: "FR".into(),
            directory: true,
        };
        store.upsert_tenant(&acme).await.unwrap();
        assert_eq!(store.tenants().await.unwrap(), vec![acme.clone()]);
        let later = SystemTime::now() + Duration::from_secs(60);
        store
            .add_enrolment_token("h1", "acme", later)
            .await
            .unwrap();
        store
            .add_enrolment_token("h2", "acme", SystemTime::now() - Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            store.redeem_enrolment_token("h1").await.unwrap(),
            TokenUse::Tenant("acme".into())
        );
        assert_eq!(
            store.redeem_enrolment_token("h1").await.unwrap(),
            TokenUse::Refused
        );
        assert_eq!(
            store.redeem_enrolment_token("h2").await.unwrap(),
            TokenUse::Refused
        );
        assert_eq!(
            store.redeem_enrolment_token("nope").await.unwrap(),
            TokenUse::Refused
        );

        store
            .ensure_user("acme", "local", "+33100000000", "pw")
            .await
            .unwrap();
        let row = |user: &str, n: &str| DirectoryUserRow {
            tenant: "acme".into(),
            user: user.into(),
            numbers: vec![n.into()],
            display_name: Some(user.to_uppercase()),
        };
        store
            .replace_directory_users(
                "acme",
                &[row("a", "+33123456789"), row("b", "+33123456780")],
            )
            .await
            .unwrap();
        store
            .replace_directory_users("acme", &[row("b", "+33123456781")])
            .await
            .unwrap();
        let users = store.all_users().await.unwrap();
        let names: Vec<_> = users.iter().map(|(u, d)| (u.user.as_str(), *d)).collect();
        assert_eq!(names, [("local", false), ("b", true)]);
        assert_eq!(users[1].0.numbers, ["+33123456781"]);
        // A directory user never logs in against the local store.
        assert!(store.verify("acme", "b", "").await.unwrap().is_none());
        assert!(store.verify("acme", "local", "pw").await.unwrap().is_some());
    }
    }

    #[test]
    fn directory_numbers_become_e164() {
        let t = TenantRow {
            name: "acme".into(),
            region: "FR".into(),
            directory: true,
        };
        let p = DirectoryUser {
            user: "alice".into(),
            numbers: vec![
                "+33 1 23 45 67 89".into(),
                "06 12 34 56 78".into(),
                "01 23 45 67 89".into(),
                "not a number".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            directory_row(&t, &p).numbers,
            ["+33123456789", "+33612345678"]
        );
    }
}
