//! Task status and error codes, spelled as the Python service spells them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A string that names no known [`TaskStatus`] or [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?} (expected one of: {expected})")]
pub struct ParseEnumError {
    /// What was being parsed: `"task status"` or `"error code"`.
    pub kind: &'static str,
    /// The text that did not parse.
    pub value: String,
    /// The accepted spellings, comma separated.
    pub expected: &'static str,
}

/// Where a task stands. The spelling (serde, [`Display`](fmt::Display), [`FromStr`]) is the
/// lowercase one the Python service stores in the `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Not started, or unknown to the store.
    Pending,
    /// Started and not yet finished.
    Running,
    /// Finished successfully.
    Completed,
    /// Cancelled; the store refuses every later write to the task.
    Cancelled,
    /// Gave up after its time limit.
    TimedOut,
    /// Finished with an error.
    Failed,
}

impl TaskStatus {
    /// Every status, in declaration order.
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Pending,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Cancelled,
        TaskStatus::TimedOut,
        TaskStatus::Failed,
    ];

    /// The stored spelling, e.g. `"timed_out"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Failed => "failed",
        }
    }

    /// True for statuses a task does not leave by itself: completed, cancelled, timed out,
    /// failed. A terminal task cannot be cancelled.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed
                | TaskStatus::Cancelled
                | TaskStatus::TimedOut
                | TaskStatus::Failed
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| ParseEnumError {
                kind: "task status",
                value: s.to_owned(),
                expected: "pending, running, completed, cancelled, timed_out, failed",
            })
    }
}

/// The Python service's error codes, serialized as the code strings (`"E001"` ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ErrorCode {
    /// E001: the input failed validation.
    #[serde(rename = "E001")]
    Validation,
    /// E002: the step ran out of time.
    #[serde(rename = "E002")]
    Timeout,
    /// E003: the step failed while executing.
    #[serde(rename = "E003")]
    Execution,
    /// E004: the task was cancelled.
    #[serde(rename = "E004")]
    Cancelled,
    /// E005: retries were exhausted.
    #[serde(rename = "E005")]
    RetryExhausted,
    /// E006: a database operation failed.
    #[serde(rename = "E006")]
    Database,
    /// E007: evaluating the task's DSL failed.
    #[serde(rename = "E007")]
    DslEvaluation,
}

impl ErrorCode {
    /// Every code, in order.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::Validation,
        ErrorCode::Timeout,
        ErrorCode::Execution,
        ErrorCode::Cancelled,
        ErrorCode::RetryExhausted,
        ErrorCode::Database,
        ErrorCode::DslEvaluation,
    ];

    /// The code string, e.g. `"E003"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Validation => "E001",
            ErrorCode::Timeout => "E002",
            ErrorCode::Execution => "E003",
            ErrorCode::Cancelled => "E004",
            ErrorCode::RetryExhausted => "E005",
            ErrorCode::Database => "E006",
            ErrorCode::DslEvaluation => "E007",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = ParseEnumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| ParseEnumError {
                kind: "error code",
                value: s.to_owned(),
                expected: "E001, E002, E003, E004, E005, E006, E007",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_spellings_agree_everywhere() {
        for s in TaskStatus::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(s.as_str().parse::<TaskStatus>().ok(), Some(s));
        }
        assert_eq!(TaskStatus::TimedOut.to_string(), "timed_out");
    }

    #[test]
    fn unknown_strings_are_typed_errors() {
        let err = "RUNNING".parse::<TaskStatus>().err();
        assert!(matches!(
            err,
            Some(ParseEnumError {
                kind: "task status",
                ..
            })
        ));
        assert!("E008".parse::<ErrorCode>().is_err());
        assert!(serde_json::from_str::<TaskStatus>("\"done\"").is_err());
    }

    #[test]
    fn terminal_statuses() {
        let terminal: Vec<_> = TaskStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                TaskStatus::Completed,
                TaskStatus::Cancelled,
                TaskStatus::TimedOut,
                TaskStatus::Failed
            ]
        );
    }

    #[test]
    fn error_codes_serialize_as_code_strings() {
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
            assert_eq!(c.as_str().parse::<ErrorCode>().ok(), Some(c));
        }
        assert_eq!(ErrorCode::DslEvaluation.as_str(), "E007");
    }
}
