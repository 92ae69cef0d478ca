//! Who may read whose history: bearer tokens.
//!
//! - The operator's token (`TASKHISTORY_ADMIN_TOKEN`) reaches every user and the operator
//!   routes (statistics, retention preview, metrics).
//! - A user token (`taskhistory token USER`, signed with `TASKHISTORY_SECRET`) reaches that
//!   one user until it expires: `thu1.<payload>.<signature>`, the payload base64url JSON
//!   `{"u": user, "exp": unix seconds}`, the signature base64url HMAC-SHA256 of
//!   `thu1.<payload>` with the secret. A service hands it to that user's browser.
//!
//! A token comes in `Authorization: Bearer ...`, or in `?access_token=` where a browser
//! cannot set headers (EventSource, WebSocket). Tokens are never logged, never echoed in an
//! error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The prefix (and version) of user tokens.
const PREFIX: &str = "thu1";

/// The least length of the signing secret, in bytes: shorter ones are guessable.
pub(crate) const MIN_SECRET: usize = 32;

/// The least length of the operator's token, in bytes.
pub(crate) const MIN_ADMIN_TOKEN: usize = 16;

#[derive(Serialize, Deserialize)]
struct Claims {
    u: String,
    exp: u64,
}

/// What a request's token allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Access {
    /// The operator: every user, the operator routes.
    Admin,
    /// One user.
    User(String),
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No token, or one that is not valid (malformed, forged, expired): 401.
    Unauthenticated(&'static str),
    /// A valid token for something else: 403.
    Forbidden(&'static str),
}

/// The server's keys. `Debug` shows neither.
#[derive(Clone)]
pub(crate) struct Auth {
    admin: Option<Vec<u8>>,
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("admin", &self.admin.as_ref().map(|_| "<redacted>"))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn mac(secret: &[u8], signed: &str) -> Option<Hmac<Sha256>> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).ok()?;
    mac.update(signed.as_bytes());
    Some(mac)
}

/// A token that reaches `user` for `ttl`, signed with `secret`.
pub(crate) fn issue(secret: &[u8], user: &str, ttl: Duration) -> Option<String> {
    let claims = Claims {
        u: user.to_owned(),
        exp: now().saturating_add(ttl.as_secs()),
    };
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).ok()?);
    let signed = format!("{PREFIX}.{payload}");
    let signature = URL_SAFE_NO_PAD.encode(mac(secret, &signed)?.finalize().into_bytes());
    Some(format!("{signed}.{signature}"))
}

impl Auth {
    /// Keys from the operator token and the signing secret (either may be absent).
    pub(crate) fn new(admin: Option<String>, secret: Option<String>) -> Self {
        Auth {
            admin: admin.map(String::into_bytes),
            secret: secret.map(String::into_bytes),
        }
    }

    /// Whether any token can be valid (else every route but /healthz answers 401).
    pub(crate) fn configured(&self) -> bool {
        self.admin.is_some() || self.secret.is_some()
    }

    /// The access a token gives.
    pub(crate) fn access(&self, token: &str) -> Result<Access, Denied> {
        if let Some(admin) = &self.admin {
            if bool::from(admin.as_slice().ct_eq(token.as_bytes())) {
                return Ok(Access::Admin);
            }
        }
        let invalid = Denied::Unauthenticated("the token is not valid");
        let secret = self.secret.as_ref().ok_or(invalid.clone())?;
        let (signed, signature) = token.rsplit_once('.').ok_or(invalid.clone())?;
        let payload = signed
            .strip_prefix(PREFIX)
            .and_then(|p| p.strip_prefix('.'))
            .ok_or(invalid.clone())?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| invalid.clone())?;
        mac(secret, signed)
            .ok_or(invalid.clone())?
            .verify_slice(&signature)
            .map_err(|_| invalid.clone())?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(invalid)?;
        if claims.exp <= now() {
            return Err(Denied::Unauthenticated("the token has expired"));
        }
        Ok(Access::User(claims.u))
    }

    /// The access of a request: its bearer token, else its `access_token` parameter.
    pub(crate) fn request(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Access, Denied> {
        // The scheme's name is case-insensitive (RFC 9110).
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token);
        let token = bearer.or(query_token).ok_or(Denied::Unauthenticated(
            "a token is needed: Authorization: Bearer TOKEN (or ?access_token=)",
        ))?;
        self.access(token.trim())
    }

    /// The access of a request to `user`'s data.
    pub(crate) fn for_user(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        user: &str,
    ) -> Result<Access, Denied> {
        match self.request(headers, query_token)? {
            Access::Admin => Ok(Access::Admin),
            Access::User(u) if u == user => Ok(Access::User(u)),
            Access::User(_) => Err(Denied::Forbidden("this token does not reach this user")),
        }
    }

    /// The access of a request to the operator's routes.
    pub(crate) fn for_admin(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(), Denied> {
        match self.request(headers, query_token)? {
            Access::Admin => Ok(()),
            Access::User(_) => Err(Denied::Forbidden("the operator's token is needed")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_user_token_reaches_its_user_only_until_it_expires() {
        let auth = Auth::new(Some("admin-token".into()), Some(SECRET.into()));
        let token = issue(SECRET.as_bytes(), "u1", Duration::from_secs(60)).unwrap();
        assert_eq!(auth.access(&token), Ok(Access::User("u1".into())));
        assert_eq!(auth.access("admin-token"), Ok(Access::Admin));
        let expired = issue(SECRET.as_bytes(), "u1", Duration::ZERO).unwrap();
        assert!(matches!(
            auth.access(&expired),
            Err(Denied::Unauthenticated(_))
        ));
        let forged = issue(
            b"another secret of thirty-two bytes!",
            "u1",
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(matches!(
            auth.access(&forged),
            Err(Denied::Unauthenticated(_))
        ));
        // Another user's payload under this token's signature.
        let other = issue(SECRET.as_bytes(), "u2", Duration::from_secs(60)).unwrap();
        let (_, sig) = token.rsplit_once('.').unwrap();
        let (signed, _) = other.rsplit_once('.').unwrap();
        assert!(auth.access(&format!("{signed}.{sig}")).is_err());
        assert!(auth.access("thu1.x.y").is_err());
        assert!(auth.access("").is_err());
        assert!(!format!("{auth:?}").contains("admin-token"));
    }
}
