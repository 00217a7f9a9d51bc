//! Admin users: created from the CLI (`callbridge admin create`), one tenant each, with
//! argon2id password hashes stored as PHC strings. Emails are unique across the installation
//! (stored lower-cased), so the login form needs no tenant field.

use std::sync::LazyLock;

use anyhow::{Context, bail};
use argon2::{
    Argon2,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};
use sea_orm::{ConnectionTrait, DatabaseConnection, EntityTrait};

use crate::{
    db::{self, stmt},
    entities::tenant,
};

/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest accepted password, in bytes (argon2 accepts more; this bounds the work per request).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// A stored admin user.
#[derive(Debug, Clone)]
pub struct AdminUser {
    /// `adm_…`.
    pub id: String,
    /// The tenant this admin manages.
    pub tenant_id: String,
    /// Lower-cased email.
    pub email: String,
    /// PHC string (`$argon2id$v=19$…`).
    pub password_hash: String,
}

/// Normalise and check an email address (lower-cased, trimmed).
///
/// # Errors
/// Not something that looks like `name@host`.
pub fn normalize_email(email: &str) -> anyhow::Result<String> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
        && e.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'));
    if !ok {
        bail!("--email must look like name@example.com");
    }
    Ok(e)
}

/// Check a new password against the policy.
///
/// # Errors
/// Too short or too long (the message says which).
pub fn check_password_policy(password: &str) -> anyhow::Result<()> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_CHARS {
        bail!("the password must be at least {MIN_PASSWORD_CHARS} characters (got {n})");
    }
    if password.len() > MAX_PASSWORD_BYTES {
        bail!("the password must be at most {MAX_PASSWORD_BYTES} bytes");
    }
    Ok(())
}

/// Hash a password with argon2id (default parameters: 19 MiB, 2 passes) into a PHC string.
/// CPU-heavy: call from a blocking thread in async code.
///
/// # Errors
/// The hasher failed (it does not for valid input).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

/// A hash of a random password, verified against when the email is unknown so that an
/// unknown email costs the same time as a wrong password.
static DUMMY_HASH: LazyLock<String> =
    LazyLock::new(|| hash_password(&crate::crypto::random_token("", 24)).unwrap_or_default());

/// Whether `password` matches `phc` (or, with `None`, spend the same effort and answer no).
/// CPU-heavy: call from a blocking thread in async code.
#[must_use]
pub fn verify_password(password: &str, phc: Option<&str>) -> bool {
    let (target, real) = match phc {
        Some(h) => (h, true),
        None => (DUMMY_HASH.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(target) else {
        return false;
    };
    let ok = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    ok && real
}

/// Warm the dummy hash so the first unknown-email login is not slower than later ones.
pub fn warm_up() {
    LazyLock::force(&DUMMY_HASH);
}

/// Create an admin user for `tenant_id`.
///
/// # Errors
/// Unknown tenant, bad email, weak password, an existing admin with that email, or a
/// database failure; each with a message meant for the person at the terminal.
pub async fn create(
    db: &DatabaseConnection,
    tenant_id: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<AdminUser> {
    let email = normalize_email(email)?;
    check_password_policy(password)?;
    if tenant::Entity::find_by_id(tenant_id.to_owned())
        .one(db)
        .await?
        .is_none()
    {
        bail!("no tenant {tenant_id} (see `callbridge tenant create`)");
    }
    let pw = password.to_owned();
    let password_hash = tokio::task::spawn_blocking(move || hash_password(&pw))
        .await
        .context("hashing the password")??;
    let id = format!("adm_{}", uuid::Uuid::now_v7().simple());
    let backend = db.get_database_backend();
    let result = db::execute_write(
        db,
        stmt(
            backend,
            "INSERT INTO admin_users (id, tenant_id, email, password_hash, created_at) \
             VALUES (?, ?, ?, ?, ?)",
            vec![
                id.clone().into(),
                tenant_id.into(),
                email.clone().into(),
                password_hash.clone().into(),
                db::now_ms().into(),
            ],
        ),
    )
    .await;
    match result {
        Ok(_) => Ok(AdminUser {
            id,
            tenant_id: tenant_id.to_owned(),
            email,
            password_hash,
        }),
        Err(e) if db::is_unique_violation(&e) => {
            bail!("an admin with the email {email} already exists")
        }
        Err(e) => Err(anyhow::Error::new(e).context("storing the admin user")),
    }
}

/// The admin user with this (normalised) email.
///
/// # Errors
/// Database failure.
pub async fn by_email(
    db: &DatabaseConnection,
    email: &str,
) -> Result<Option<AdminUser>, sea_orm::DbErr> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(stmt(
            backend,
            "SELECT id, tenant_id, email, password_hash FROM admin_users WHERE email = ?",
            vec![email.trim().to_lowercase().into()],
        ))
        .await?;
    row.map(|r| {
        Ok(AdminUser {
            id: r.try_get("", "id")?,
            tenant_id: r.try_get("", "tenant_id")?,
            email: r.try_get("", "email")?,
            password_hash: r.try_get("", "password_hash")?,
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_to_argon2id_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", Some(&h)));
        assert!(!verify_password("wrong horse battery", Some(&h)));
        assert!(!verify_password("correct horse battery", None));
        assert!(!verify_password("x", Some("not a phc string")));
    }

    #[test]
    fn policy_and_email_rules() {
        assert!(check_password_policy("short").is_err());
        assert!(check_password_policy("twelve chars").is_ok());
        assert_eq!(normalize_email(" A@B.example ").unwrap(), "a@b.example");
        for bad in ["", "a", "@b", "a@", "a b@c", "a@b@c"] {
            assert!(normalize_email(bad).is_err(), "{bad}");
        }
    }
}
