//! Pixel size (µm/px) and objective power: parsed from metadata, overridden by the user, turned into "x".
//!
//! Work is done in µm/px; magnification is shown as the scanner convention M ≈ 10 / (µm/px).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Physical pixel sizes outside this range are metadata noise (72 dpi defaults, zeros), not microscopy.
pub const PLAUSIBLE_MPP: std::ops::RangeInclusive<f64> = 0.02..=100.0;

/// Where a pixel size came from, shown to the user next to the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MppSource {
    /// `openslide.mpp-x` / `openslide.mpp-y` (the scanner's calibration).
    OpenSlide,
    /// TIFF `XResolution` / `YResolution` with `ResolutionUnit`.
    TiffResolution,
    /// PNG `pHYs` chunk (pixels per metre).
    PngPhys,
    /// OME-XML `PhysicalSizeX`/`PhysicalSizeY` in a TIFF's ImageDescription (QuPath, Bio-Formats).
    OmeXml,
    /// Only the nominal objective power is known: 10 / power.
    ObjectivePower,
    /// Set by hand by the user.
    User,
    /// Estimated by a model.
    Estimated,
}

impl MppSource {
    pub fn label(self) -> &'static str {
        match self {
            MppSource::OpenSlide => "scanner metadata",
            MppSource::TiffResolution => "TIFF resolution tags",
            MppSource::PngPhys => "PNG pHYs chunk",
            MppSource::OmeXml => "OME-XML PhysicalSize",
            MppSource::ObjectivePower => "from nominal objective power",
            MppSource::User => "set by hand",
            MppSource::Estimated => "estimated",
        }
    }
}

/// A pixel size in µm per pixel along x and y, with its origin.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Mpp {
    pub x: f64,
    pub y: f64,
    pub source: MppSource,
}

impl Mpp {
    pub fn new(x: f64, y: f64, source: MppSource) -> Option<Self> {
        (PLAUSIBLE_MPP.contains(&x) && PLAUSIBLE_MPP.contains(&y)).then_some(Mpp { x, y, source })
    }

    /// Mean of x and y µm/px.
    pub fn mean(&self) -> f64 {
        0.5 * (self.x + self.y)
    }

    /// Equivalent objective magnification at full resolution (10 / µm/px).
    pub fn magnification(&self) -> f64 {
        magnification_from_mpp(self.mean())
    }
}

/// Scanner convention: objective power M corresponds to about 10/M µm per pixel.
pub fn magnification_from_mpp(mpp: f64) -> f64 {
    10.0 / mpp
}

pub fn mpp_from_magnification(mag: f64) -> f64 {
    10.0 / mag
}

/// Reads the pixel size from OpenSlide properties: `openslide.mpp-x/y`, else OME-XML in
/// `tiff.ImageDescription`, else `tiff.XResolution/YResolution` with `tiff.ResolutionUnit` unless
/// that is a default ([`resolution_mpp`]); values outside [`PLAUSIBLE_MPP`] are ignored.
pub fn mpp_from_properties(props: &BTreeMap<String, String>) -> Option<Mpp> {
    let num = |k: &str| props.get(k).and_then(|v| v.trim().parse::<f64>().ok());
    if let Some(x) = num("openslide.mpp-x") {
        let y = num("openslide.mpp-y").unwrap_or(x);
        if let Some(m) = Mpp::new(x, y, MppSource::OpenSlide) {
            return Some(m);
        }
    }
    if let Some(m) = props
        .get("tiff.ImageDescription")
        .and_then(|d| ome_physical_size(d))
    {
        return Some(m);
    }
    let unit = props
        .get("tiff.ResolutionUnit")
        .map(|s| s.trim().to_ascii_lowercase());
    let xres = num("tiff.XResolution")?;
    let yres = num("tiff.YResolution").unwrap_or(xres);
    let (x, y) = mpp_from_resolution(xres, yres, unit.as_deref()?)?;
    resolution_mpp(x, y, MppSource::TiffResolution).ok()
}

/// Resolutions that cameras, scanners and image editors write by default, in dots per inch: they say
/// nothing about the tissue.
pub const DEFAULT_DPI: [f64; 8] = [72.0, 96.0, 150.0, 180.0, 200.0, 240.0, 300.0, 600.0];

/// A pixel size read from resolution tags, or why it is not one: a default resolution
/// ([`DEFAULT_DPI`], within 0.5%) is "no pixel size", with the note `info` shows.
pub fn resolution_mpp(x: f64, y: f64, source: MppSource) -> Result<Mpp, String> {
    let dpi = 25_400.0 / x;
    if DEFAULT_DPI.iter().any(|d| (dpi / d - 1.0).abs() < 0.005) {
        return Err(format!("resolution tag: {dpi:.0} dpi (a default, ignored)"));
    }
    Mpp::new(x, y, source).ok_or_else(|| {
        format!("resolution tag: {x:.4} µm/px (not a plausible microscope pixel size, ignored)")
    })
}

/// `PhysicalSizeX`/`PhysicalSizeY` (with their units; µm when absent) of the first `Pixels` element
/// of an OME-XML document.
pub fn ome_physical_size(xml: &str) -> Option<Mpp> {
    if !xml.contains("<OME") && !xml.contains(":OME") {
        return None;
    }
    let attr = |name: &str| -> Option<&str> {
        let key = format!(" {name}=\"");
        let at = xml.find(&key)? + key.len();
        let end = xml[at..].find('"')?;
        Some(&xml[at..at + end])
    };
    let um = |value: &str, unit: Option<&str>| -> Option<f64> {
        let v: f64 = value.trim().parse().ok()?;
        let factor = match unit.unwrap_or("µm") {
            "µm" | "μm" | "um" | "micron" | "&#181;m" | "&#xB5;m" => 1.0,
            "nm" => 1e-3,
            "mm" => 1e3,
            "cm" => 1e4,
            "m" => 1e6,
            "Å" => 1e-4,
            _ => return None,
        };
        Some(v * factor)
    };
    let x = um(attr("PhysicalSizeX")?, attr("PhysicalSizeXUnit"))?;
    let y = attr("PhysicalSizeY")
        .and_then(|v| um(v, attr("PhysicalSizeYUnit")))
        .unwrap_or(x);
    Mpp::new(x, y, MppSource::OmeXml)
}

/// Converts TIFF-style resolutions (pixels per unit) into µm/px. `unit` is "centimeter", "inch"
/// (OpenSlide's spellings) or the numeric TIFF codes "3"/"2".
pub fn mpp_from_resolution(xres: f64, yres: f64, unit: &str) -> Option<(f64, f64)> {
    let um_per_unit = match unit {
        "centimeter" | "cm" | "3" => 10_000.0,
        "inch" | "in" | "2" => 25_400.0,
        _ => return None,
    };
    (xres > 0.0 && yres > 0.0).then(|| (um_per_unit / xres, um_per_unit / yres))
}

/// Nominal objective power from `openslide.objective-power` (or Aperio's `aperio.AppMag`).
pub fn objective_power_from_properties(props: &BTreeMap<String, String>) -> Option<f64> {
    ["openslide.objective-power", "aperio.AppMag"]
        .iter()
        .filter_map(|k| props.get(*k))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .find(|p| (0.5..=200.0).contains(p))
}

/// A calibration chosen by hand for one file; it wins over the metadata.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// µm per pixel at level 0.
    pub mpp: Option<f64>,
    /// Objective power; used for µm/px (10 / power) when `mpp` is not set.
    pub objective_power: Option<f64>,
}

impl Calibration {
    pub fn is_empty(&self) -> bool {
        self.mpp.is_none() && self.objective_power.is_none()
    }

    pub fn as_mpp(&self) -> Option<Mpp> {
        match (self.mpp, self.objective_power) {
            (Some(m), _) => Mpp::new(m, m, MppSource::User),
            (None, Some(p)) if p > 0.0 => {
                let m = mpp_from_magnification(p);
                Mpp::new(m, m, MppSource::User)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn openslide_mpp_wins() {
        let p = props(&[
            ("openslide.mpp-x", "0.499"),
            ("openslide.mpp-y", "0.4991"),
            ("tiff.XResolution", "20000"),
            ("tiff.ResolutionUnit", "centimeter"),
        ]);
        let m = mpp_from_properties(&p).unwrap();
        assert_eq!(m.source, MppSource::OpenSlide);
        assert!((m.x - 0.499).abs() < 1e-12 && (m.y - 0.4991).abs() < 1e-12);
        assert!((m.magnification() - 20.03).abs() < 0.01);
    }

    #[test]
    fn tiff_resolution_units() {
        let cm = props(&[
            ("tiff.XResolution", "20040.08"),
            ("tiff.ResolutionUnit", "centimeter"),
        ]);
        let m = mpp_from_properties(&cm).unwrap();
        assert_eq!(m.source, MppSource::TiffResolution);
        assert!((m.x - 0.499).abs() < 1e-4);
        let inch = props(&[
            ("tiff.XResolution", "101600"),
            ("tiff.ResolutionUnit", "inch"),
        ]);
        assert!((mpp_from_properties(&inch).unwrap().x - 0.25).abs() < 1e-9);
    }

    #[test]
    fn default_resolutions_are_no_pixel_size() {
        for dpi in DEFAULT_DPI {
            let um = 25_400.0 / dpi;
            let why = resolution_mpp(um, um, MppSource::TiffResolution).unwrap_err();
            assert!(why.contains("a default, ignored"), "{why}");
        }
        // 57531 px/inch (0.4415 µm/px) is a real scanner resolution.
        let m = resolution_mpp(
            25_400.0 / 57_531.0,
            25_400.0 / 57_531.0,
            MppSource::TiffResolution,
        )
        .unwrap();
        assert!((m.x - 0.4415).abs() < 1e-4);
        // The same through OpenSlide's properties: 300 dpi is dropped, 40000 px/cm kept.
        let p = props(&[("tiff.XResolution", "300"), ("tiff.ResolutionUnit", "inch")]);
        assert_eq!(mpp_from_properties(&p), None);
        let p = props(&[
            ("tiff.XResolution", "40000"),
            ("tiff.ResolutionUnit", "centimeter"),
        ]);
        assert_eq!(mpp_from_properties(&p).map(|m| m.x), Some(0.25));
    }

    #[test]
    fn ome_xml_pixel_sizes() {
        let ome = |x: &str, unit: &str| {
            format!(
                r#"<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels DimensionOrder="XYCZT" PhysicalSizeX="{x}" {unit} PhysicalSizeY="{x}" SizeX="10"/></Image></OME>"#
            )
        };
        let m = ome_physical_size(&ome("0.2271", r#"PhysicalSizeXUnit="µm""#)).unwrap();
        assert_eq!((m.x, m.source), (0.2271, MppSource::OmeXml));
        // No unit: µm (the schema's default).
        assert_eq!(ome_physical_size(&ome("0.5", "")).map(|m| m.y), Some(0.5));
        let m = ome_physical_size(&ome(
            "227.1",
            r#"PhysicalSizeXUnit="nm" PhysicalSizeYUnit="nm""#,
        ))
        .unwrap();
        assert!((m.x - 0.2271).abs() < 1e-9);
        assert!(ome_physical_size("ImageJ=1.5\nunit=micron").is_none());
        let p = props(&[("tiff.ImageDescription", &ome("0.25", ""))]);
        assert_eq!(
            mpp_from_properties(&p).map(|m| m.source),
            Some(MppSource::OmeXml)
        );
    }

    #[test]
    fn implausible_or_unitless_resolution_is_unknown() {
        // 72 dpi is a default written by image editors, not a microscope calibration.
        let dpi72 = props(&[("tiff.XResolution", "72"), ("tiff.ResolutionUnit", "inch")]);
        assert!(mpp_from_properties(&dpi72).is_none());
        let none = props(&[
            ("tiff.XResolution", "20000"),
            ("tiff.ResolutionUnit", "none"),
        ]);
        assert!(mpp_from_properties(&none).is_none());
        let zero = props(&[("openslide.mpp-x", "0")]);
        assert!(mpp_from_properties(&zero).is_none());
        assert!(mpp_from_properties(&BTreeMap::new()).is_none());
    }

    #[test]
    fn objective_power_and_calibration() {
        let p = props(&[("aperio.AppMag", "20")]);
        assert_eq!(objective_power_from_properties(&p), Some(20.0));
        let c = Calibration {
            mpp: None,
            objective_power: Some(40.0),
        };
        assert!((c.as_mpp().unwrap().x - 0.25).abs() < 1e-12);
        let c = Calibration {
            mpp: Some(0.5),
            objective_power: Some(40.0),
        };
        assert_eq!(c.as_mpp().unwrap().x, 0.5);
        assert!(Calibration::default().as_mpp().is_none());
    }
}
