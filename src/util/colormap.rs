//! Colormaps for overlays: viridis and magma (sixth-degree polynomial fits of matplotlib's maps, the
//! same polynomials as in `shaders/overlay.wgsl`) and a blue-white-red diverging map.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Colormap {
    #[default]
    Viridis,
    Magma,
    /// Blue (0) through white (0.5) to red (1).
    Diverging,
}

const VIRIDIS: [[f32; 3]; 7] = [
    [0.277_727_33, 0.005_407_344_5, 0.334_099_8],
    [0.105_093_04, 1.404_613_5, 1.384_590_2],
    [-0.330_861_83, 0.214_847_56, 0.095_095_16],
    [-4.634_230_6, -5.799_101, -19.332_441],
    [6.228_27, 14.179_933, 56.690_55],
    [4.776_385, -13.745_145, -65.353_03],
    [-5.435_456, 4.645_852_6, 26.312_435],
];

const MAGMA: [[f32; 3]; 7] = [
    [-0.002_136_485, -0.000_749_655_05, -0.005_386_128],
    [0.251_660_54, 0.677_523_2, 2.494_026_6],
    [8.353_717, -3.577_719_4, 0.314_467_9],
    [-27.668_733, 14.264_731, -13.649_213],
    [52.176_14, -27.943_606, 12.944_169],
    [-50.768_524, 29.046_583, 4.234_153],
    [18.655_705, -11.489_774, -5.601_961_5],
];

impl Colormap {
    pub const ALL: [Colormap; 3] = [Colormap::Viridis, Colormap::Magma, Colormap::Diverging];

    pub fn name(self) -> &'static str {
        match self {
            Colormap::Viridis => "viridis",
            Colormap::Magma => "magma",
            Colormap::Diverging => "diverging",
        }
    }

    pub fn parse(s: &str) -> Option<Colormap> {
        Colormap::ALL
            .into_iter()
            .find(|c| c.name() == s.to_ascii_lowercase())
    }

    /// The index the overlay shader knows this map by.
    pub fn shader_index(self) -> u32 {
        self as u32
    }

    /// Linear RGB in [0, 1] of `t` (clamped to [0, 1]).
    pub fn rgb(self, t: f32) -> [f32; 3] {
        let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
        let poly = |c: &[[f32; 3]; 7]| {
            let mut out = [0f32; 3];
            for (ch, o) in out.iter_mut().enumerate() {
                // Horner: c0 + t(c1 + t(c2 + …)).
                *o = c
                    .iter()
                    .rev()
                    .fold(0.0, |acc, k| acc * t + k[ch])
                    .clamp(0.0, 1.0);
            }
            out
        };
        match self {
            Colormap::Viridis => poly(&VIRIDIS),
            Colormap::Magma => poly(&MAGMA),
            Colormap::Diverging => {
                const BLUE: [f32; 3] = [0.230, 0.299, 0.754];
                const WHITE: [f32; 3] = [0.865, 0.865, 0.865];
                const RED: [f32; 3] = [0.706, 0.016, 0.150];
                let (a, b, s) = if t < 0.5 {
                    (BLUE, WHITE, t * 2.0)
                } else {
                    (WHITE, RED, (t - 0.5) * 2.0)
                };
                std::array::from_fn(|i| a[i] + (b[i] - a[i]) * s)
            }
        }
    }

    /// 8-bit RGB of `t`.
    pub fn rgb8(self, t: f32) -> [u8; 3] {
        self.rgb(t).map(|v| (v * 255.0).round() as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: [f32; 3], b: [f32; 3], tol: f32) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
    }

    /// The fits stay close to matplotlib's values at the ends and the middle.
    #[test]
    fn maps_match_matplotlib_at_known_points() {
        assert!(close(
            Colormap::Viridis.rgb(0.0),
            [0.267, 0.005, 0.329],
            0.02
        ));
        assert!(close(
            Colormap::Viridis.rgb(0.5),
            [0.128, 0.567, 0.551],
            0.02
        ));
        assert!(close(
            Colormap::Viridis.rgb(1.0),
            [0.993, 0.906, 0.144],
            0.02
        ));
        assert!(close(Colormap::Magma.rgb(0.0), [0.001, 0.000, 0.014], 0.02));
        assert!(close(Colormap::Magma.rgb(0.5), [0.716, 0.215, 0.475], 0.02));
        assert!(close(Colormap::Magma.rgb(1.0), [0.987, 0.991, 0.750], 0.03));
        assert!(close(
            Colormap::Diverging.rgb(0.5),
            [0.865, 0.865, 0.865],
            1e-6
        ));
        assert_eq!(Colormap::parse("Magma"), Some(Colormap::Magma));
    }
}
