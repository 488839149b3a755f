//! Progress bars (indicatif): hidden when stderr is not a terminal or with `--quiet`.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `len` steps labelled `prefix`; hidden unless `visible` and stderr is a TTY.
pub fn bar(len: u64, prefix: &str, visible: bool) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(len), target(visible));
    let style = ProgressStyle::with_template(
        "{prefix:>14} [{bar:28.cyan/blue}] {pos:>4}/{len:4} {elapsed_precise} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(prefix.to_string());
    pb
}

fn target(visible: bool) -> ProgressDrawTarget {
    if visible && std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    }
}

/// True when progress output (bars, per-epoch lines) should be shown.
pub fn interactive(visible: bool) -> bool {
    visible && std::io::stderr().is_terminal()
}
