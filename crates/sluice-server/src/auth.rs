//! Credentials: SCRAM-SHA-256 verifiers for passwords (PostgreSQL's stored form, so the
//! password itself is never kept), and random API tokens stored only as their SHA-256.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::rand::SecureRandom;
use ring::{digest, hmac};

use crate::catalog::{Catalog, Role, ADMIN_TENANT};
use crate::error::ApiError;

/// PBKDF2 rounds of a new verifier (PostgreSQL's default).
const ITERATIONS: usize = 4096;

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    pub tenant: String,
    pub role: Role,
}

impl Principal {
    /// An owner of the admin tenant: manages tenants, quotas and every tenant's objects.
    pub fn is_admin(&self) -> bool {
        self.tenant == ADMIN_TENANT && self.role == Role::Owner
    }

    /// Fails unless the principal may change the tenant's tables, views and pipelines.
    pub fn require_developer(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Owner | Role::Developer => Ok(()),
            Role::Viewer => Err(ApiError::denied(format!(
                "user '{}' is a viewer of tenant '{}' and may only read",
                self.user, self.tenant
            ))),
        }
    }

    pub fn require_owner(&self) -> Result<(), ApiError> {
        if self.role == Role::Owner {
            return Ok(());
        }
        Err(ApiError::denied(format!(
            "only an owner of tenant '{}' may manage its users and tokens",
            self.tenant
        )))
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            return Ok(());
        }
        Err(ApiError::denied(
            "only the server's administrators may do this",
        ))
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the system's random source");
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A SCRAM-SHA-256 verifier of `password`, as PostgreSQL stores it:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
pub fn verifier(password: &str) -> String {
    let salt = random(16);
    let salted = pgwire::api::auth::sasl::scram::gen_salted_password(password, &salt, ITERATIONS);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let server_key = hmac::sign(&key, b"Server Key");
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        B64.encode(&salt),
        B64.encode(stored_key.as_ref()),
        B64.encode(server_key.as_ref())
    )
}

/// A stored verifier's parts: salt, iterations, StoredKey, ServerKey.
pub type VerifierParts = (Vec<u8>, usize, Vec<u8>, Vec<u8>);

/// The parts of a stored verifier.
pub fn parse_verifier(v: &str) -> Option<VerifierParts> {
    let rest = v.strip_prefix("SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest.split_once('$')?;
    let (iterations, salt) = iter_salt.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    Some((
        B64.decode(salt).ok()?,
        iterations.parse().ok()?,
        B64.decode(stored).ok()?,
        B64.decode(server).ok()?,
    ))
}

/// Checks a password against a verifier (REST's basic login; the wire protocol runs SCRAM).
pub fn check_password(verifier: &str, password: &str) -> bool {
    let Some((salt, iterations, stored, _)) = parse_verifier(verifier) else {
        return false;
    };
    let salted = pgwire::api::auth::sasl::scram::gen_salted_password(password, &salt, iterations);
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let computed = digest::digest(&digest::SHA256, client_key.as_ref());
    let computed = computed.as_ref();
    computed.len() == stored.len()
        && computed
            .iter()
            .zip(&stored)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// A new random password (printed once when the admin's is not given).
pub fn new_password() -> String {
    hex(&random(12))
}

/// The stored form of a token.
pub fn token_hash(token: &str) -> String {
    hex(digest::digest(&digest::SHA256, token.as_bytes()).as_ref())
}

/// Makes a token for `user`: returns its id (to revoke it) and the secret (shown once).
pub fn create_token(catalog: &Catalog, user: &str) -> Result<(String, String), ApiError> {
    let secret = format!("sluice_{}", hex(&random(32)));
    let id = format!("tok_{}", hex(&random(8)));
    catalog.add_token(&id, &token_hash(&secret), user)?;
    Ok((id, secret))
}

/// Adds a token with a given secret (`SLUICE_ADMIN_TOKEN`), unless it exists.
pub fn ensure_token(catalog: &Catalog, user: &str, secret: &str) -> Result<(), ApiError> {
    if catalog.token_user(&token_hash(secret))?.is_some() {
        return Ok(());
    }
    let id = format!("tok_{}", hex(&random(8)));
    catalog.add_token(&id, &token_hash(secret), user)
}

/// Logs a user in with a password (the console): a new token of that user, as `CREATE TOKEN`
/// makes it (its id, to revoke it at logout, and its secret). An unknown user runs the same
/// check against a verifier of no one's, so that names cannot be told apart by time.
pub fn login(
    catalog: &Catalog,
    user: &str,
    password: &str,
) -> Result<(Principal, String, String), ApiError> {
    static NOBODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let found = catalog.user(user)?;
    let verifier = match &found {
        Some(u) => u.verifier.as_str(),
        None => NOBODY.get_or_init(|| verifier(&new_password())).as_str(),
    };
    let matches = check_password(verifier, password);
    let Some(u) = found.filter(|_| matches) else {
        return Err(ApiError::auth("the user name or the password is wrong"));
    };
    let (id, secret) = create_token(catalog, &u.name)?;
    Ok((
        Principal {
            user: u.name,
            tenant: u.tenant,
            role: u.role,
        },
        id,
        secret,
    ))
}

/// The principal a token stands for.
pub fn principal_for_token(catalog: &Catalog, token: &str) -> Result<Principal, ApiError> {
    let refused = || ApiError::auth("the token is not valid (unknown or revoked)");
    let user = catalog
        .token_user(&token_hash(token))?
        .ok_or_else(refused)?;
    principal_for_user(catalog, &user)?.ok_or_else(refused)
}

pub fn principal_for_user(catalog: &Catalog, user: &str) -> Result<Option<Principal>, ApiError> {
    Ok(catalog.user(user)?.map(|u| Principal {
        user: u.name,
        tenant: u.tenant,
        role: u.role,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_checks_its_password_only() {
        let v = verifier("s3cret");
        assert!(v.starts_with("SCRAM-SHA-256$4096:"));
        assert!(!v.contains("s3cret"));
        assert!(check_password(&v, "s3cret"));
        assert!(!check_password(&v, "s3cret "));
        assert!(!check_password(&v, ""));
        // Two verifiers of one password differ (fresh salt).
        assert_ne!(v, verifier("s3cret"));
    }
}
