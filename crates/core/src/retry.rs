//! Retrying transient failures: exponential backoff with jitter, a bounded number of attempts.

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;

/// When and how often a failed operation is tried again.
///
/// Only [transient](StoreError::is_transient) errors are retried (the Python service's
/// decorator retried everything, including bad input). The wait before retry `n` (1-based) is
/// `initial_backoff * multiplier^(n-1)`, capped at `max_backoff`, then reduced by a random
/// fraction of up to `jitter` so that many clients failing together do not retry together.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means no retry.
    pub max_attempts: u32,
    /// The wait before the first retry.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// How much each wait grows over the one before.
    pub multiplier: f64,
    /// The largest fraction (0 to 1) taken off each wait at random.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 3 attempts, waits of about 50 ms then 100 ms (at most 2 s), 50 % jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.5,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn never() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The wait before retry number `retry` (1 for the first retry), jitter applied.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(retry.saturating_sub(1).min(64) as i32);
        let base = self.initial_backoff.as_secs_f64() * exp;
        let capped = base.min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0) * fastrand::f64();
        Duration::try_from_secs_f64(capped * (1.0 - jitter)).unwrap_or(self.max_backoff)
    }

    /// Runs `op` until it succeeds, fails with a non-transient error, or has been tried
    /// `max_attempts` times; the last error is returned. `on_retry` hears of each retry (the
    /// error, the retry number and the wait) before the wait, for counters and logs.
    pub async fn run<T, F, Fut>(
        &self,
        mut op: F,
        mut on_retry: impl FnMut(&StoreError, u32, Duration),
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt < self.max_attempts => {
                    let wait = self.backoff(attempt);
                    on_retry(&e, attempt, wait);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
            multiplier: 2.0,
            jitter: 0.0,
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = quick();
        assert_eq!(p.backoff(1), Duration::from_millis(1));
        assert_eq!(p.backoff(2), Duration::from_millis(2));
        assert_eq!(p.backoff(3), Duration::from_millis(4));
        assert_eq!(p.backoff(30), Duration::from_millis(4));
        let jittered = RetryPolicy {
            jitter: 1.0,
            ..quick()
        };
        for _ in 0..100 {
            assert!(jittered.backoff(3) <= Duration::from_millis(4));
        }
    }

    #[tokio::test]
    async fn retries_transient_errors_up_to_the_limit() {
        let calls = AtomicU32::new(0);
        let mut retries = Vec::new();
        let out: Result<(), _> = quick()
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(StoreError::Unavailable {
                        operation: "t",
                        source: "down".into(),
                    })
                },
                |_, n, _| retries.push(n),
            )
            .await;
        assert!(matches!(out, Err(StoreError::Unavailable { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(retries, [1, 2, 3]);
    }

    #[tokio::test]
    async fn stops_at_success_and_never_retries_permanent_errors() {
        let calls = AtomicU32::new(0);
        let out = quick()
            .run(
                || async {
                    let n = calls.fetch_add(1, Ordering::SeqCst);
                    if n == 0 {
                        Err(StoreError::Timeout {
                            operation: "t",
                            source: "slow".into(),
                        })
                    } else {
                        Ok(n)
                    }
                },
                |_, _, _| {},
            )
            .await;
        assert_eq!(out.ok(), Some(1));

        let calls = AtomicU32::new(0);
        let out: Result<(), _> = quick()
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(StoreError::invalid("user_id", "empty"))
                },
                |_, _, _| {},
            )
            .await;
        assert!(matches!(out, Err(StoreError::InvalidInput { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
