//! Who may do what: a request's token (read here, verified by `auth.rs`) against the route,
//! and the per-address limit on failed authentication.
//!
//! A token comes in `Authorization: Bearer ...`. Only the two event routes (where a browser
//! cannot set a header: EventSource, WebSocket) also take `?access_token=`, and there only a
//! stream ticket or a user token, never the operator's or the metrics token (a URL ends up in
//! proxies' logs).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use taskhistory_tokens::{now, Access, Keys};

/// Why a request is refused (fixed texts: what a client may know).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No token, or one that is not valid (malformed, forged, expired): 401.
    Unauthenticated(&'static str),
    /// A valid token for something else: 403.
    Forbidden(&'static str),
}

const NO_TOKEN: &str = "a token is needed: Authorization: Bearer TOKEN";
const NOT_IN_URL: &str =
    "a token in the URL is accepted only on the event routes, and never the operator's";

/// The request side of the keys.
#[derive(Debug, Clone)]
pub(crate) struct Auth {
    keys: Keys,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    // The scheme's name is case-insensitive (RFC 9110).
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

impl Auth {
    pub(crate) fn new(keys: Keys) -> Auth {
        Auth { keys }
    }

    /// Whether any token can be valid.
    pub(crate) fn configured(&self) -> bool {
        self.keys.configured()
    }

    /// The keys (to issue tickets).
    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    fn verify(&self, token: &str) -> Result<Access, Denied> {
        self.keys
            .verify(token, now())
            .map_err(|why| Denied::Unauthenticated(why.message()))
    }

    /// The access of a request's bearer token; a token in the URL is refused here.
    fn header(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<Access, Denied> {
        match bearer(headers) {
            Some(token) => self.verify(token),
            None if query_token.is_some_and(|t| !t.is_empty()) => {
                Err(Denied::Unauthenticated(NOT_IN_URL))
            }
            None => Err(Denied::Unauthenticated(NO_TOKEN)),
        }
    }

    /// The access of a request's bearer token, if it has a valid one (`/healthz`'s detail).
    pub(crate) fn optional(&self, headers: &HeaderMap) -> Option<Access> {
        bearer(headers).and_then(|t| self.verify(t).ok())
    }

    /// What the request's bearer token is (`/v1/whoami`): any valid token, in the header.
    pub(crate) fn identify(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Access, Denied> {
        self.header(headers, query_token)
    }

    /// A request to `user`'s data (not a stream): the user's token or the operator's, in
    /// the header.
    pub(crate) fn for_user(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        user: &str,
    ) -> Result<Access, Denied> {
        match self.header(headers, query_token)? {
            Access::Admin => Ok(Access::Admin),
            Access::User(u) if u == user => Ok(Access::User(u)),
            Access::User(_) => Err(Denied::Forbidden("this token does not reach this user")),
            Access::Metrics => Err(Denied::Forbidden("the metrics token reads /metrics only")),
            Access::Ticket { .. } => Err(Denied::Forbidden(
                "a stream ticket opens its event stream only",
            )),
        }
    }

    /// A request to open `user`'s event stream of `kind` (`sse` or `ws`) filtered on `task`:
    /// the header as for [`Auth::for_user`], or in the URL a user token or a ticket of that
    /// very stream.
    pub(crate) fn for_stream(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        user: &str,
        kind: &str,
        task: Option<&str>,
    ) -> Result<Access, Denied> {
        let access = match (bearer(headers), query_token.filter(|t| !t.is_empty())) {
            (Some(token), _) | (None, Some(token)) => self.verify(token.trim())?,
            (None, None) => return Err(Denied::Unauthenticated(NO_TOKEN)),
        };
        let in_url = bearer(headers).is_none();
        match access {
            Access::Admin | Access::Metrics if in_url => Err(Denied::Unauthenticated(NOT_IN_URL)),
            Access::Ticket {
                user: u,
                kind: k,
                task: t,
            } => {
                if u == user && k == kind && t.as_deref() == task {
                    Ok(Access::User(u))
                } else {
                    Err(Denied::Forbidden("this ticket is for another stream"))
                }
            }
            Access::Admin => Ok(Access::Admin),
            Access::User(u) if u == user => Ok(Access::User(u)),
            Access::User(_) => Err(Denied::Forbidden("this token does not reach this user")),
            Access::Metrics => Err(Denied::Forbidden("the metrics token reads /metrics only")),
        }
    }

    /// A request to the operator's routes.
    pub(crate) fn for_admin(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(), Denied> {
        match self.header(headers, query_token)? {
            Access::Admin => Ok(()),
            _ => Err(Denied::Forbidden("the operator's token is needed")),
        }
    }

    /// A request to `/metrics`: the metrics token or the operator's.
    pub(crate) fn for_metrics(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(), Denied> {
        match self.header(headers, query_token)? {
            Access::Admin | Access::Metrics => Ok(()),
            _ => Err(Denied::Forbidden(
                "the metrics token (or the operator's) is needed",
            )),
        }
    }
}

/// Failed authentications per client address in a fixed window: once an address reaches the
/// limit, its requests are answered 429 until the window ends. IPv6 addresses count per /64
/// (one host usually holds the whole prefix). The table holds at most `MAX_ADDRESSES`; when
/// full, finished windows are dropped, and if none has finished further addresses go
/// uncounted until one does (memory stays bounded whatever the number of addresses).
#[derive(Debug)]
pub(crate) struct FailureLimiter {
    limit: u32,
    window: Duration,
    table: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const MAX_ADDRESSES: usize = 100_000;

fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl FailureLimiter {
    /// At most `limit` failures per `window` (a limit of 0 turns limiting off).
    pub(crate) fn new(limit: u32, window: Duration) -> FailureLimiter {
        FailureLimiter {
            limit,
            window,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `ip` may try again, if it is limited now.
    pub(crate) fn limited(&self, ip: IpAddr) -> Option<u64> {
        if self.limit == 0 {
            return None;
        }
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let (since, count) = table.get(&bucket(ip))?;
        let elapsed = since.elapsed();
        (elapsed < self.window && *count >= self.limit)
            .then(|| self.window.saturating_sub(elapsed).as_secs().max(1))
    }

    /// Counts a failed authentication of `ip`.
    pub(crate) fn failed(&self, ip: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let key = bucket(ip);
        if !table.contains_key(&key) && table.len() >= MAX_ADDRESSES {
            let window = self.window;
            table.retain(|_, (since, _)| now.duration_since(*since) < window);
            if table.len() >= MAX_ADDRESSES {
                return;
            }
        }
        let entry = table.entry(key).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_limited_after_its_failures_for_the_window() {
        let l = FailureLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b2: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.limited(a), None);
            l.failed(a);
            l.failed(b);
        }
        assert!(l.limited(a).is_some());
        assert!(l.limited(b2).is_some(), "the same /64");
        assert_eq!(l.limited("10.0.0.2".parse().unwrap()), None);
        let off = FailureLimiter::new(0, Duration::from_secs(60));
        for _ in 0..10 {
            off.failed(a);
        }
        assert_eq!(off.limited(a), None);
    }
}
