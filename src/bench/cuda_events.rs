//! Device time of queued work, measured with CUDA events on candle's stream (feature `cuda`):
//! what `r2scp tune` and `r2scp bench retrieve --device cuda` report beside host wall time,
//! as the PyTorch peer times with `torch.cuda.Event`.

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{Device, Result};
use std::time::Instant;

/// Times of `reps` runs after one warm-up.
#[derive(Clone, Debug, PartialEq)]
pub struct EventTimes {
    /// Device milliseconds per run (event before the first launch to event after the last).
    pub device_ms: Vec<f64>,
    /// Host milliseconds per run (the call and a stream synchronisation).
    pub host_ms: Vec<f64>,
}

impl EventTimes {
    /// Median device milliseconds.
    pub fn device_median(&self) -> f64 {
        median(&self.device_ms)
    }

    /// Median host milliseconds.
    pub fn host_median(&self) -> f64 {
        median(&self.host_ms)
    }
}

/// The median of `v` (the mean of the middle two for an even count; NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// Runs `f` (which queues work on `dev`'s stream and need not wait) once to warm up, then
/// `reps` times (at least 1) between two CUDA events, synchronising after each. Errors from
/// `f` stop the timing. `None` on a device without events (the CPU).
pub fn time_events<R, E: Into<candle_core::Error>>(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> std::result::Result<R, E>,
) -> Result<Option<(EventTimes, R)>> {
    let Device::Cuda(cuda) = dev else {
        return Ok(None);
    };
    let stream = cuda.cuda_stream();
    let err = |e| candle_core::Error::Msg(format!("cuda events: {e:?}"));
    let mut last = f().map_err(Into::into)?;
    dev.synchronize()?;
    let mut t = EventTimes {
        device_ms: Vec::new(),
        host_ms: Vec::new(),
    };
    for _ in 0..reps.max(1) {
        let h = Instant::now();
        let start = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err)?;
        last = f().map_err(Into::into)?;
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err)?;
        end.synchronize().map_err(err)?;
        t.host_ms.push(h.elapsed().as_secs_f64() * 1e3);
        t.device_ms
            .push(start.elapsed_ms(&end).map_err(err)? as f64);
    }
    Ok(Some((t, last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn cpu_has_no_events() {
        let r = time_events(&Device::Cpu, 2, || Ok::<_, candle_core::Error>(1)).unwrap();
        assert!(r.is_none());
    }
}
