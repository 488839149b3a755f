//! [`Error`]: what the ops and the memory bank return. One line to read, a backtrace on
//! request.
//!
//! candle appends the backtrace to an error's `Display` (after a newline) whenever
//! `RUST_BACKTRACE` is set, so a one-line message became 15-18 lines in a log. An
//! [`Error`] displays as its message alone, whatever the environment; the backtrace captured
//! where it arose (when `RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` enables capturing) is kept
//! for whoever asks: [`Error::backtrace`], or `{:?}`.

use std::backtrace::{Backtrace, BacktraceStatus};
use std::fmt;

/// `Result<T, r2scp::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

/// An error of an r2scp op or of [`MemoryBank`](crate::MemoryBank): one line naming the op,
/// the offending value and the expected one.
///
/// - `Display` (`{}`) is that one line, with or without `RUST_BACKTRACE`.
/// - `Debug` (`{:?}`, what `unwrap` and `fn main() -> Result<..>` print) adds the backtrace
///   when one was captured, as `anyhow` does.
/// - [`Error::backtrace`] returns it (`status()` is `Disabled` unless `RUST_BACKTRACE` or
///   `RUST_LIB_BACKTRACE` is set).
/// - `?` converts it into [`candle_core::Error`] (a one-line `Msg`, so candle code can call
///   the ops) and, as a [`std::error::Error`], into `anyhow::Error` or `Box<dyn Error>`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let keys = Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu)?;
/// let queries = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?;
/// let err = r2scp::cosine_topk(&queries, &keys, None, 1, None).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "cosine_topk: query dimension D = 3 does not match the keys' D = 8"
/// );
/// let _where = err.backtrace(); // captured when RUST_BACKTRACE=1
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct Error(Box<Inner>);

struct Inner {
    message: String,
    backtrace: Backtrace,
}

impl Error {
    /// An error with this message (newlines and runs of spaces folded into one space), and
    /// the backtrace of this call when capturing is enabled.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self::with_backtrace(one_line(&message.to_string()), Backtrace::capture())
    }

    fn with_backtrace(message: String, backtrace: Backtrace) -> Self {
        Error(Box::new(Inner { message, backtrace }))
    }

    /// The message: the one line `Display` prints.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Where the error arose, when `RUST_BACKTRACE` or `RUST_LIB_BACKTRACE` enabled
    /// capturing (`status()` says whether this one holds frames).
    pub fn backtrace(&self) -> &Backtrace {
        &self.0.backtrace
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)?;
        if self.0.backtrace.status() == BacktraceStatus::Captured {
            write!(f, "\n\nStack backtrace:\n{}", self.0.backtrace)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// A candle error as one line; the backtrace candle captured (its `WithBacktrace` wrapper)
/// moves into the [`Error`], else one is captured here.
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::WithBacktrace { inner, backtrace } => {
                Self::with_backtrace(crate::io::candle_text(&inner), *backtrace)
            }
            e => Self::with_backtrace(crate::io::candle_text(&e), Backtrace::capture()),
        }
    }
}

/// For `?` in functions returning `candle_core::Result`: a `candle_core::Error::Msg` with
/// the one line (the backtrace stays behind, so candle's `Display` stays one line too).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::Msg(e.0.message.clone())
    }
}

/// Whitespace runs (newlines included) folded into single spaces.
fn one_line(s: &str) -> String {
    if s.contains(['\n', '\r']) || s.contains("  ") {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    } else {
        s.to_string()
    }
}

/// `return Err(Error::msg(format!(...)).into())`: candle's `bail!` without the backtrace in
/// the message, for functions returning either [`Result`] or `candle_core::Result`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::msg(format!($($arg)*)).into())
    };
}
pub(crate) use bail;
