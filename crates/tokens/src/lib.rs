//! The tokens of `taskhistory serve`: issuing and verifying them, with no dependence on HTTP
//! types. One implementation, used by `serve`, by `taskhistory token`, and by any Rust
//! service that signs tokens for its users (the facade's feature `tokens`):
//!
//! ```
//! use std::time::{Duration, SystemTime, UNIX_EPOCH};
//! use taskhistory_tokens::{issue, Access, Keys, Secret};
//!
//! // The secret is TASKHISTORY_SECRET's value as raw bytes (not decoded from hex).
//! let secret = Secret::new(b"the server's signing secret, 32+ bytes")?;
//! let token = issue(&secret, "user_123", Duration::from_secs(3600), Duration::from_secs(30 * 86_400))?;
//!
//! // What the server does with it:
//! let keys = Keys::new(None, None, Some(secret), None, Secret::random()?, Duration::from_secs(30 * 86_400));
//! let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
//! assert_eq!(keys.verify(&token, now), Ok(Access::User("user_123".into())));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! - The operator's token (`TASKHISTORY_ADMIN_TOKEN`) reaches every user and the operator
//!   routes. It is kept and compared as its SHA-256 digest, in constant time.
//! - The metrics token (`TASKHISTORY_METRICS_TOKEN`) reads `/metrics` only; kept the same way.
//! - A user token (`taskhistory token USER`, or any service) reaches one user until it
//!   expires: `thu2.<kid>.<payload>.<signature>`, where `kid` is base64url (no padding) of the
//!   first 6 bytes of SHA-256 of the secret, `payload` base64url JSON `{"u": user, "exp": unix
//!   seconds}` and `signature` base64url HMAC-SHA256 of `thu2.<kid>.<payload>` with the secret.
//!   The key id picks the secret: the current one (`TASKHISTORY_SECRET`) or, during a
//!   rotation, the previous one (`TASKHISTORY_SECRET_PREVIOUS`). Tokens of the first format,
//!   `thu1.<payload>.<signature>` (no key id), are still accepted under either secret.
//! - A stream ticket (`POST .../events/ticket`) reaches one user's one event stream for 60 s:
//!   `tht1.<payload>.<signature>`, signed with a key drawn at start (so no ticket outlives the
//!   process), its payload naming the user, the stream kind and the task filter.
//!
//! Every token is refused, never accepted, when it is longer than [`MAX_TOKEN_LEN`], not
//! signed by a known key, or when its `exp` has passed or lies further ahead than the
//! server's maximum lifetime. Keys and tokens never reach `Debug`, logs or errors.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The prefix of user tokens with a key id.
const USER: &str = "thu2";
/// The prefix of user tokens of the first format (no key id).
const USER_V1: &str = "thu1";
/// The prefix of stream tickets.
const TICKET: &str = "tht1";

/// The least length of a signing secret, in bytes: shorter ones are guessable.
pub const MIN_SECRET: usize = 32;

/// The least length of the operator's and the metrics token, in bytes.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// The longest token looked at; longer ones are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 2048;

/// How long a stream ticket is valid.
pub const TICKET_TTL: Duration = Duration::from_secs(60);

/// Clock skew allowed between the issuer and the server when checking `exp` against the cap.
const SKEW: u64 = 300;

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A signing secret and its key id. `Debug` shows the key id only.
#[derive(Clone)]
pub struct Secret {
    key: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret").field("kid", &self.kid).finish()
    }
}

/// Why a secret or token cannot be used (never names the secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The secret is shorter than [`MIN_SECRET`].
    #[error("at least {MIN_SECRET} bytes are needed")]
    TooShort,
    /// The lifetime asked for is over the maximum.
    #[error("the lifetime {asked}s is over the maximum {max}s")]
    TooLong {
        /// Seconds asked for.
        asked: u64,
        /// The most allowed.
        max: u64,
    },
    /// The token could not be encoded.
    #[error("the token could not be encoded")]
    Encoding,
    /// The operating system gave no random bytes.
    #[error("no random bytes from the operating system")]
    Random,
}

impl Secret {
    /// A secret of at least [`MIN_SECRET`] bytes.
    pub fn new(key: &[u8]) -> Result<Secret, KeyError> {
        if key.len() < MIN_SECRET {
            return Err(KeyError::TooShort);
        }
        Ok(Secret::unchecked(key))
    }

    fn unchecked(key: &[u8]) -> Secret {
        let digest = Sha256::digest(key);
        Secret {
            key: key.to_vec(),
            kid: URL_SAFE_NO_PAD.encode(&digest[..6]),
        }
    }

    /// A random key (stream tickets): 32 bytes from the operating system.
    ///
    /// # Errors
    /// [`KeyError::Random`] when the operating system gives no random bytes.
    pub fn random() -> Result<Secret, KeyError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|_| KeyError::Random)?;
        Ok(Secret::unchecked(&key))
    }

    /// The key id tokens signed with this secret carry.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    fn mac(&self, signed: &str) -> Option<Hmac<Sha256>> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).ok()?;
        mac.update(signed.as_bytes());
        Some(mac)
    }

    fn sign(&self, signed: String) -> Result<String, KeyError> {
        let mac = self.mac(&signed).ok_or(KeyError::Encoding)?;
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{signed}.{signature}"))
    }

    /// Whether `signature` (base64url) is this secret's signature of `signed`, in constant time.
    fn verifies(&self, signed: &str, signature: &str) -> bool {
        let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        self.mac(signed)
            .is_some_and(|mac| mac.verify_slice(&signature).is_ok())
    }
}

/// A user token's and a ticket's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Claims {
    /// The user.
    u: String,
    /// Expiry, unix seconds.
    exp: u64,
    /// Tickets: the stream kind (`sse` or `ws`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    s: Option<String>,
    /// Tickets: the task filter of the stream (none: every task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    t: Option<String>,
}

fn encode_claims(claims: &Claims) -> Result<String, KeyError> {
    let json = serde_json::to_vec(claims).map_err(|_| KeyError::Encoding)?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

/// A user token that reaches `user` for `ttl` (at most `max_ttl`), signed with `secret`.
pub fn issue(
    secret: &Secret,
    user: &str,
    ttl: Duration,
    max_ttl: Duration,
) -> Result<String, KeyError> {
    if ttl > max_ttl {
        return Err(KeyError::TooLong {
            asked: ttl.as_secs(),
            max: max_ttl.as_secs(),
        });
    }
    let claims = Claims {
        u: user.to_owned(),
        exp: now().saturating_add(ttl.as_secs()),
        s: None,
        t: None,
    };
    secret.sign(format!("{USER}.{}.{}", secret.kid, encode_claims(&claims)?))
}

/// What a token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The operator: every user, the operator routes.
    Admin,
    /// The metrics scraper: `/metrics` only.
    Metrics,
    /// One user.
    User(String),
    /// One user's one event stream (`kind`: `sse` or `ws`; `task`: its filter).
    Ticket {
        /// The user.
        user: String,
        /// `sse` or `ws`.
        kind: String,
        /// The stream's task filter.
        task: Option<String>,
    },
}

/// Why a token is refused (the reasons a client may know; the same text for any forgery).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Malformed, too long, or not signed by a known key.
    NotValid,
    /// Its `exp` has passed.
    Expired,
    /// Its `exp` lies beyond the server's maximum lifetime.
    TooLong,
}

impl Invalid {
    /// A fixed message for the client.
    pub fn message(self) -> &'static str {
        match self {
            Invalid::NotValid => "the token is not valid",
            Invalid::Expired => "the token has expired",
            Invalid::TooLong => "the token's lifetime is over the server's maximum",
        }
    }
}

/// A token's SHA-256, for constant-time comparisons of equal-length values.
fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The server's keys and rules. `Debug` shows no key.
#[derive(Clone)]
pub struct Keys {
    admin: Option<[u8; 32]>,
    metrics: Option<[u8; 32]>,
    current: Option<Secret>,
    previous: Option<Secret>,
    tickets: Secret,
    max_ttl: Duration,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("admin", &self.admin.map(|_| "<redacted>"))
            .field("metrics", &self.metrics.map(|_| "<redacted>"))
            .field("current", &self.current.as_ref().map(Secret::kid))
            .field("previous", &self.previous.as_ref().map(Secret::kid))
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys from the operator token, the metrics token, the signing secrets (each may be
    /// absent), the ticket key and the cap on user tokens' lifetime.
    pub fn new(
        admin: Option<&[u8]>,
        metrics: Option<&[u8]>,
        current: Option<Secret>,
        previous: Option<Secret>,
        tickets: Secret,
        max_ttl: Duration,
    ) -> Keys {
        Keys {
            admin: admin.map(digest),
            metrics: metrics.map(digest),
            current,
            previous,
            tickets,
            max_ttl,
        }
    }

    /// Whether any token can be valid (tickets need one to be asked for).
    pub fn configured(&self) -> bool {
        self.admin.is_some() || self.metrics.is_some() || self.current.is_some()
    }

    /// A ticket for `user`'s stream of `kind` (`sse` or `ws`) filtered on `task`.
    pub fn ticket(&self, user: &str, kind: &str, task: Option<&str>) -> Result<String, KeyError> {
        let claims = Claims {
            u: user.to_owned(),
            exp: now().saturating_add(TICKET_TTL.as_secs()),
            s: Some(kind.to_owned()),
            t: task.map(str::to_owned),
        };
        self.tickets
            .sign(format!("{TICKET}.{}", encode_claims(&claims)?))
    }

    /// What `token` gives at `now` (unix seconds). Never panics, whatever the input.
    pub fn verify(&self, token: &str, now: u64) -> Result<Access, Invalid> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(Invalid::NotValid);
        }
        let candidate = digest(token.as_bytes());
        if self
            .admin
            .is_some_and(|d| bool::from(d.as_slice().ct_eq(&candidate)))
        {
            return Ok(Access::Admin);
        }
        if self
            .metrics
            .is_some_and(|d| bool::from(d.as_slice().ct_eq(&candidate)))
        {
            return Ok(Access::Metrics);
        }
        let (signed, signature) = token.rsplit_once('.').ok_or(Invalid::NotValid)?;
        let mut parts = signed.split('.');
        let prefix = parts.next().ok_or(Invalid::NotValid)?;
        let (payload, secret) = match prefix {
            USER => {
                let kid = parts.next().ok_or(Invalid::NotValid)?;
                let payload = parts.next().ok_or(Invalid::NotValid)?;
                let secret = [&self.current, &self.previous]
                    .into_iter()
                    .flatten()
                    .find(|s| s.kid == kid)
                    .ok_or(Invalid::NotValid)?;
                (payload, secret)
            }
            USER_V1 | TICKET => {
                let payload = parts.next().ok_or(Invalid::NotValid)?;
                let secret = if prefix == TICKET {
                    Some(&self.tickets)
                } else {
                    [&self.current, &self.previous]
                        .into_iter()
                        .flatten()
                        .find(|s| s.verifies(signed, signature))
                };
                (payload, secret.ok_or(Invalid::NotValid)?)
            }
            _ => return Err(Invalid::NotValid),
        };
        if parts.next().is_some() || !secret.verifies(signed, signature) {
            return Err(Invalid::NotValid);
        }
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(Invalid::NotValid)?;
        if claims.exp <= now {
            return Err(Invalid::Expired);
        }
        let max = if prefix == TICKET {
            TICKET_TTL
        } else {
            self.max_ttl
        };
        if claims.exp > now.saturating_add(max.as_secs()).saturating_add(SKEW) {
            return Err(Invalid::TooLong);
        }
        match (prefix, claims.s) {
            (TICKET, Some(kind)) => Ok(Access::Ticket {
                user: claims.u,
                kind,
                task: claims.t,
            }),
            (TICKET, None) => Err(Invalid::NotValid),
            _ => Ok(Access::User(claims.u)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OLD: &[u8] = b"an older secret of thirty-two bytes!";
    const DAY: Duration = Duration::from_secs(86_400);
    const DEFAULT_MAX_TTL: Duration = Duration::from_secs(30 * 86_400);

    fn keys(previous: Option<&[u8]>) -> Keys {
        Keys::new(
            Some(b"admin-token-0123"),
            Some(b"metrics-token-0123"),
            Some(Secret::new(SECRET).unwrap()),
            previous.map(|p| Secret::new(p).unwrap()),
            Secret::random().unwrap(),
            DEFAULT_MAX_TTL,
        )
    }

    fn sign_v1(secret: &[u8], claims: &str) -> String {
        let s = Secret::new(secret).unwrap();
        s.sign(format!("thu1.{}", URL_SAFE_NO_PAD.encode(claims)))
            .unwrap()
    }

    #[test]
    fn a_user_token_reaches_its_user_only_until_it_expires() {
        let k = keys(None);
        let secret = Secret::new(SECRET).unwrap();
        let token = issue(&secret, "u1", Duration::from_secs(60), DAY).unwrap();
        assert!(token.starts_with(&format!("thu2.{}.", secret.kid())));
        let t = now();
        assert_eq!(k.verify(&token, t), Ok(Access::User("u1".into())));
        assert_eq!(k.verify(&token, t + 61), Err(Invalid::Expired));
        assert_eq!(k.verify("admin-token-0123", t), Ok(Access::Admin));
        assert_eq!(k.verify("metrics-token-0123", t), Ok(Access::Metrics));
        let forged = issue(&Secret::new(OLD).unwrap(), "u1", DAY, DAY).unwrap();
        assert_eq!(k.verify(&forged, t), Err(Invalid::NotValid));
        // Another user's payload under this token's signature.
        let other = issue(&secret, "u2", Duration::from_secs(60), DAY).unwrap();
        let (_, sig) = token.rsplit_once('.').unwrap();
        let (signed, _) = other.rsplit_once('.').unwrap();
        assert!(k.verify(&format!("{signed}.{sig}"), t).is_err());
        assert!(k.verify("thu2.x.y.z", t).is_err());
        assert!(k.verify("", t).is_err());
        assert!(issue(&secret, "u1", DAY * 31, DEFAULT_MAX_TTL).is_err());
        let debug = format!("{k:?}{secret:?}");
        assert!(!debug.contains("admin-token") && !debug.contains("0123456789abcdef"));
    }

    #[test]
    fn the_lifetime_cap_and_the_previous_secret() {
        let t = now();
        let far = sign_v1(SECRET, &format!(r#"{{"u":"u1","exp":{}}}"#, u64::MAX));
        assert_eq!(keys(None).verify(&far, t), Err(Invalid::TooLong));
        let v1 = sign_v1(SECRET, &format!(r#"{{"u":"u1","exp":{}}}"#, t + 60));
        assert_eq!(keys(None).verify(&v1, t), Ok(Access::User("u1".into())));
        let old = issue(&Secret::new(OLD).unwrap(), "u1", DAY, DAY).unwrap();
        assert_eq!(keys(None).verify(&old, t), Err(Invalid::NotValid));
        assert_eq!(
            keys(Some(OLD)).verify(&old, t),
            Ok(Access::User("u1".into()))
        );
        let old_v1 = sign_v1(OLD, &format!(r#"{{"u":"u1","exp":{}}}"#, t + 60));
        assert!(keys(Some(OLD)).verify(&old_v1, t).is_ok());
        assert!(keys(None).verify(&old_v1, t).is_err());
    }

    #[test]
    fn tickets_name_their_stream_and_last_a_minute() {
        let k = keys(None);
        let t = now();
        let ticket = k.ticket("u1", "sse", Some("t1")).unwrap();
        assert_eq!(
            k.verify(&ticket, t),
            Ok(Access::Ticket {
                user: "u1".into(),
                kind: "sse".into(),
                task: Some("t1".into())
            })
        );
        assert_eq!(k.verify(&ticket, t + 61), Err(Invalid::Expired));
        // Another process's ticket key: refused.
        assert_eq!(keys(None).verify(&ticket, t), Err(Invalid::NotValid));
        // A ticket signed with the user secret (as if by a service): refused.
        let secret = Secret::new(SECRET).unwrap();
        let fake = secret
            .sign(format!(
                "tht1.{}",
                URL_SAFE_NO_PAD.encode(format!(r#"{{"u":"u1","exp":{},"s":"sse"}}"#, t + 30))
            ))
            .unwrap();
        assert_eq!(k.verify(&fake, t), Err(Invalid::NotValid));
    }

    fn mutations() -> impl Strategy<Value = String> {
        let k = keys(None);
        let secret = Secret::new(SECRET).unwrap();
        let good = issue(&secret, "u1", Duration::from_secs(600), DAY).unwrap();
        let ticket = k.ticket("u1", "ws", None).unwrap();
        let payloads = prop_oneof![
            Just(format!(r#"{{"u":"u1","exp":{}}}"#, u64::MAX)),
            Just(r#"{"u":"u1","exp":1e400}"#.to_owned()),
            Just(r#"{"u":"u1","exp":-1}"#.to_owned()),
            Just(r#"{"u":"u1","exp":99999999999999999999999999999}"#.to_owned()),
            Just(r#"{"u":1,"exp":1}"#.to_owned()),
            ".{0,64}",
        ];
        prop_oneof![
            // Random bytes (as text), dots and padding.
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            "[a-z0-9._=-]{0,200}",
            "thu[12t]\\.[A-Za-z0-9_=.-]{0,120}",
            // Truncations and extensions of a good token and a ticket.
            (0..good.len()).prop_map(move |n| good[..n].to_owned()),
            (0..ticket.len()).prop_map(move |n| ticket[..n].to_owned()),
            "[.=]{1,8}".prop_map(|p| format!(
                "{}{p}",
                issue(&Secret::new(SECRET).unwrap(), "u1", DAY, DAY).unwrap()
            )),
            // Any payload, unsigned or signed by another key.
            payloads.prop_map(|p| format!(
                "thu2.{}.{}.AAAA",
                Secret::new(SECRET).unwrap().kid(),
                URL_SAFE_NO_PAD.encode(p)
            )),
            "[0-9]{1,40}".prop_map(|n| sign_v1(OLD, &format!(r#"{{"u":"u1","exp":{n}}}"#))),
            // Huge tokens.
            (2049usize..20_000).prop_map(|n| "a".repeat(n)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random bytes, truncations, padding, dots, huge numbers: never a panic, never
        /// accepted unless signed by a known key within its lifetime.
        #[test]
        fn the_parser_never_panics_and_accepts_only_signed_tokens(token in mutations()) {
            let k = keys(None);
            let t = now();
            if let Ok(access) = k.verify(&token, t) {
                // Only an untouched signed token can pass: re-signing it must give itself.
                let secret = Secret::new(SECRET).unwrap();
                let (signed, _) = token.rsplit_once('.').unwrap();
                let ok = matches!(access, Access::User(_)) && secret.verifies(signed, token.rsplit_once('.').unwrap().1);
                prop_assert!(ok, "accepted {token:?} as {access:?}");
            }
        }

        /// A signed token with any `exp` is accepted only when `now < exp <= now + max + skew`.
        #[test]
        fn exp_is_checked_for_any_number(exp in any::<u64>()) {
            let k = keys(None);
            let t = now();
            let token = Secret::new(SECRET).unwrap().sign(format!(
                "thu2.{}.{}",
                Secret::new(SECRET).unwrap().kid(),
                URL_SAFE_NO_PAD.encode(format!(r#"{{"u":"u1","exp":{exp}}}"#))
            )).unwrap();
            let accepted = k.verify(&token, t).is_ok();
            prop_assert_eq!(accepted, exp > t && exp <= t + DEFAULT_MAX_TTL.as_secs() + SKEW);
        }
    }
}
