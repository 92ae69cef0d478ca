//! The primitive input rules that the domain types check themselves with (a cursor read
//! from text) and that [`validate`](crate::validate) builds every other rule from: below
//! both, so neither imports the other.

use chrono::{DateTime, NaiveDate, SubsecRound, Utc};

use crate::error::StoreError;

/// The longest `user_id` or `task_id`, in bytes.
pub const MAX_ID_BYTES: usize = 255;

/// Checks an identifier reported as `field`.
pub fn id(field: &str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() {
        return Err(StoreError::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(StoreError::invalid(
            field,
            format!(
                "is {} bytes long; at most {MAX_ID_BYTES} are allowed",
                value.len()
            ),
        ));
    }
    no_nul(field, value)
}

/// Checks a timestamp and returns it cut to the microsecond, the precision every store keeps.
pub fn timestamp(field: &str, value: DateTime<Utc>) -> Result<DateTime<Utc>, StoreError> {
    let min = NaiveDate::from_ymd_opt(1, 1, 1).and_then(|d| d.and_hms_opt(0, 0, 0));
    let max = NaiveDate::from_ymd_opt(10000, 1, 1).and_then(|d| d.and_hms_opt(0, 0, 0));
    let naive = value.naive_utc();
    match (min, max) {
        (Some(min), Some(max)) if naive >= min && naive < max => Ok(value.trunc_subsecs(6)),
        _ => Err(StoreError::invalid(
            field,
            format!("{value} is outside the years 1 to 9999"),
        )),
    }
}

/// Refuses a string holding NUL, which PostgreSQL's text and jsonb cannot store.
pub(crate) fn no_nul(field: &str, value: &str) -> Result<(), StoreError> {
    if value.contains('\0') {
        return Err(StoreError::invalid(
            field,
            "contains a NUL character (\\u0000)",
        ));
    }
    Ok(())
}
