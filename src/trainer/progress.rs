//! The progress bar of a training epoch. With the `cli` feature it is an indicatif bar on
//! stderr, hidden when stderr is not a terminal or with `--quiet`; without it nothing is
//! drawn. Either way it only displays: training results do not depend on it.

#[cfg(feature = "cli")]
use std::io::IsTerminal;

/// A bar over an epoch's updates.
pub struct EpochBar {
    #[cfg(feature = "cli")]
    bar: indicatif::ProgressBar,
}

impl EpochBar {
    /// A bar over `len` steps labelled `prefix`; drawn only when `visible`, stderr is a
    /// terminal and the build has the `cli` feature.
    #[cfg_attr(not(feature = "cli"), allow(unused_variables))]
    pub fn new(len: u64, prefix: &str, visible: bool) -> Self {
        #[cfg(feature = "cli")]
        {
            use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
            let target = if visible && std::io::stderr().is_terminal() {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            };
            let bar = ProgressBar::with_draw_target(Some(len), target);
            let style = ProgressStyle::with_template(
                "{prefix:>14} [{bar:28.cyan/blue}] {pos:>4}/{len:4} {elapsed_precise} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(prefix.to_string());
            Self { bar }
        }
        #[cfg(not(feature = "cli"))]
        Self {}
    }

    /// One step done; `message` (loss, accuracy, speed so far) is shown beside the bar.
    #[cfg_attr(not(feature = "cli"), allow(unused_variables))]
    pub fn step(&self, message: impl FnOnce() -> String) {
        #[cfg(feature = "cli")]
        {
            self.bar.inc(1);
            self.bar.set_message(message());
        }
    }

    /// Removes the bar (the epoch's summary line replaces it).
    pub fn finish(&self) {
        #[cfg(feature = "cli")]
        self.bar.finish_and_clear();
    }
}
