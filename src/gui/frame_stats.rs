//! Frame time recording: CPU time of each frame and the interval between frames while the view moves.

use std::collections::VecDeque;
use std::time::Instant;

use serde::Serialize;

const KEEP: usize = 20_000;

#[derive(Debug, Default)]
pub struct FrameStats {
    cpu_ms: VecDeque<f32>,
    interval_ms: VecDeque<f32>,
    last_frame: Option<Instant>,
    /// Whether the previous frame asked for another one (animation, loading, interaction).
    previous_was_busy: bool,
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct FrameSummary {
    pub frames: usize,
    pub cpu_p50_ms: f32,
    pub cpu_p99_ms: f32,
    pub interval_p50_ms: f32,
    pub interval_p99_ms: f32,
}

fn push(q: &mut VecDeque<f32>, v: f32) {
    if q.len() == KEEP {
        q.pop_front();
    }
    q.push_back(v);
}

fn percentile(q: &VecDeque<f32>, p: f32) -> f32 {
    if q.is_empty() {
        return 0.0;
    }
    let mut v: Vec<f32> = q.iter().copied().collect();
    v.sort_by(f32::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f32).round() as usize;
    v[i.min(v.len() - 1)]
}

impl FrameStats {
    /// Records a frame. `cpu_seconds` is eframe's measure of the previous frame's work; `busy` says
    /// whether this frame is part of continuous motion (only then is the interval a frame time).
    pub fn record(&mut self, cpu_seconds: Option<f32>, busy: bool) {
        let now = Instant::now();
        if let Some(cpu) = cpu_seconds {
            push(&mut self.cpu_ms, cpu * 1000.0);
        }
        if let Some(last) = self.last_frame
            && self.previous_was_busy
        {
            push(&mut self.interval_ms, (now - last).as_secs_f32() * 1000.0);
        }
        self.last_frame = Some(now);
        self.previous_was_busy = busy;
    }

    pub fn last_cpu_ms(&self) -> Option<f32> {
        self.cpu_ms.back().copied()
    }

    pub fn summary(&self) -> FrameSummary {
        FrameSummary {
            frames: self.cpu_ms.len(),
            cpu_p50_ms: percentile(&self.cpu_ms, 50.0),
            cpu_p99_ms: percentile(&self.cpu_ms, 99.0),
            interval_p50_ms: percentile(&self.interval_ms, 50.0),
            interval_p99_ms: percentile(&self.interval_ms, 99.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut s = FrameStats::default();
        for i in 1..=100 {
            s.record(Some(i as f32 / 1000.0), false);
        }
        let m = s.summary();
        assert_eq!(m.frames, 100);
        assert!((m.cpu_p50_ms - 50.0).abs() <= 1.0);
        assert!((m.cpu_p99_ms - 99.0).abs() <= 1.0);
        assert_eq!(
            m.interval_p50_ms, 0.0,
            "idle frames are not frame intervals"
        );
    }
}
