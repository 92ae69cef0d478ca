//! The partitioned layout's types: what the layout is, by what period it is partitioned,
//! and a partition's figures. Kept apart from [`crate::partition`] (which runs the DDL and
//! retention) so that the configuration can name them without depending on the store.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Months, NaiveTime, TimeDelta, TimeZone, Utc};
use serde::Serialize;

/// How much time one partition covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionInterval {
    /// A calendar day (UTC).
    Day,
    /// A week, Monday to Sunday (UTC).
    Week,
    /// A calendar month (UTC). The default.
    #[default]
    Month,
}

impl PartitionInterval {
    /// `day`, `week` or `month`.
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionInterval::Day => "day",
            PartitionInterval::Week => "week",
            PartitionInterval::Month => "month",
        }
    }

    /// The start of the period holding `t`.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let day = t.date_naive();
        let start = match self {
            PartitionInterval::Day => day,
            PartitionInterval::Week => {
                day - chrono::Days::new(u64::from(day.weekday().num_days_from_monday()))
            }
            PartitionInterval::Month => day.with_day(1).unwrap_or(day),
        };
        Utc.from_utc_datetime(&start.and_time(NaiveTime::MIN))
    }

    /// The period start `n` periods after the period start `start` (before it when `n` is
    /// negative); `None` past the calendar's range.
    pub fn shift(self, start: DateTime<Utc>, n: i64) -> Option<DateTime<Utc>> {
        match self {
            PartitionInterval::Day => start.checked_add_signed(TimeDelta::try_days(n)?),
            PartitionInterval::Week => {
                start.checked_add_signed(TimeDelta::try_days(n.checked_mul(7)?)?)
            }
            PartitionInterval::Month => {
                let months = Months::new(u32::try_from(n.unsigned_abs()).ok()?);
                if n >= 0 {
                    start.checked_add_months(months)
                } else {
                    start.checked_sub_months(months)
                }
            }
        }
    }
}

impl fmt::Display for PartitionInterval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PartitionInterval {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "day" | "daily" => Ok(PartitionInterval::Day),
            "week" | "weekly" => Ok(PartitionInterval::Week),
            "month" | "monthly" => Ok(PartitionInterval::Month),
            _ => Err(format!("{s:?}: expected day, week or month")),
        }
    }
}

/// The partitioned layout's settings ([`PgConfig::partitioning`](crate::PgConfig)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitioning {
    /// The time one partition covers (a conversion records it; later runs read it back).
    pub interval: PartitionInterval,
    /// Partitions kept ready past the current one (default 3).
    pub ahead: u32,
}

impl Default for Partitioning {
    fn default() -> Self {
        Partitioning {
            interval: PartitionInterval::Month,
            ahead: 3,
        }
    }
}

/// How `task_history` is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "layout", rename_all = "lowercase")]
pub enum Layout {
    /// One table (the default).
    Plain,
    /// Range-partitioned by task start.
    Partitioned {
        /// The time one partition covers.
        interval: PartitionInterval,
    },
}

/// One partition of the partitioned layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionInfo {
    /// Table name.
    pub name: String,
    /// First task start it holds (`None`: the default partition).
    pub from: Option<DateTime<Utc>>,
    /// First task start past it (`None`: the default partition).
    pub to: Option<DateTime<Utc>>,
    /// Size on disk, with TOAST.
    pub bytes: u64,
    /// The planner's row estimate (0 until ANALYZE or autovacuum has seen it).
    pub estimated_rows: u64,
}

impl PartitionInfo {
    /// Whether this is the default partition (rows no ranged partition covers).
    pub fn is_default(&self) -> bool {
        self.from.is_none()
    }

    pub(crate) fn overlaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> bool {
        match (self.from, self.to) {
            (Some(f), Some(t)) => f < to && from < t,
            _ => false,
        }
    }
}
