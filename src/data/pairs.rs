//! Two-magnification pairs for DMSL: the same field of view read at a high and a low magnification, each
//! at its own resolution (a 300 µm field is 600 px at 20x and 150 px at 5x). Pairs come from slides
//! with labelled regions (GeoJSON polygons in level-0 pixels, as QuPath exports them) or from folders
//! of labelled images at a known magnification, one folder per class; the low-magnification partner
//! is always the same pixels area-downsampled, never an upsampled image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::augment::to_rgb;
use super::magnification::split_for_rank;
use super::manifest::{Manifest, ManifestError, Record, Split};
use crate::slide::{Slide, SlideError, resize_area, resize_area_rgb};
use crate::util::fs::write_atomic;

/// The two magnifications of a pair and the side of its (square) field of view.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairGeometry {
    pub high_magnification: f64,
    pub low_magnification: f64,
    /// Side of the field of view in µm.
    pub field_um: f64,
}

impl Default for PairGeometry {
    /// 20x + 5x over a 300 µm field: 600 px and 150 px.
    fn default() -> Self {
        PairGeometry {
            high_magnification: 20.0,
            low_magnification: 5.0,
            field_um: 300.0,
        }
    }
}

impl PairGeometry {
    /// Pixels across the field at `magnification` (µm/px = 10 / magnification).
    pub fn px_at(&self, magnification: f64) -> u32 {
        (self.field_um * magnification / 10.0).round().max(1.0) as u32
    }

    pub fn high_px(&self) -> u32 {
        self.px_at(self.high_magnification)
    }

    pub fn low_px(&self) -> u32 {
        self.px_at(self.low_magnification)
    }

    /// Side of the field in level-0 pixels of a source with `mpp` µm/px.
    pub fn level0_side(&self, mpp: f64) -> f64 {
        self.field_um / mpp
    }

    pub fn validate(&self, min_input: u32) -> Result<(), PairError> {
        let ok = self.low_magnification.is_finite()
            && self.high_magnification.is_finite()
            && self.field_um.is_finite()
            && self.low_magnification > 0.0
            && self.high_magnification > self.low_magnification
            && self.low_px() >= min_input;
        if ok {
            Ok(())
        } else {
            Err(PairError::Geometry(format!(
                "{}x + {}x over {} µm ({} px + {} px): the high magnification must exceed the low \
                 one and the low image must be at least {min_input} px",
                self.high_magnification,
                self.low_magnification,
                self.field_um,
                self.high_px(),
                self.low_px()
            )))
        }
    }
}

/// One pair of a DMSL dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// The high-magnification image (relative to the manifest's folder, or absolute).
    pub high: String,
    /// The low-magnification image of the same field.
    pub low: String,
    pub class: String,
    /// The slide region or image the pair was cut from: splits and folds never share one.
    pub source: String,
    /// Level-0 rectangle "x,y,w,h" of the field in its source.
    pub region: String,
    pub split: Split,
}

impl Record for PairRecord {
    fn path(&self) -> &str {
        &self.high
    }
    fn source(&self) -> &str {
        &self.source
    }
    fn split(&self) -> Split {
        self.split
    }
    fn validate(&self) -> Result<(), String> {
        if self.class.trim().is_empty() {
            Err("empty class name".into())
        } else {
            Ok(())
        }
    }
}

/// `dataset.json` beside `pairs.csv`: the geometry and the class order the model's outputs follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairDataset {
    pub geometry: PairGeometry,
    pub classes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PairError {
    #[error(transparent)]
    Slide(#[from] SlideError),
    #[error("invalid pair geometry: {0}")]
    Geometry(String),
    #[error("cannot read the regions {}: {message}", path.display())]
    Regions { path: PathBuf, message: String },
    #[error(
        "{} is {native:.1}x: pairs at {wanted}x would need upsampling; give its true µm/px or a lower magnification",
        path.display()
    )]
    TooLowResolution {
        path: PathBuf,
        native: f64,
        wanted: f64,
    },
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("no pair could be made: {0}")]
    Nothing(String),
}

/// A labelled polygon in level-0 pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub class: String,
    pub polygon: Vec<[f64; 2]>,
}

impl Region {
    /// Ray casting: whether (x, y) lies inside the polygon.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        let p = &self.polygon;
        let mut inside = false;
        let mut j = p.len().wrapping_sub(1);
        for i in 0..p.len() {
            let ([xi, yi], [xj, yj]) = (p[i], p[j]);
            if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
                inside = !inside;
            }
            j = i;
        }
        inside
    }

    /// Whether the square [x, x+side] x [y, y+side] lies inside (its corners and centre do).
    pub fn contains_square(&self, x: f64, y: f64, side: f64) -> bool {
        let e = side * 1e-6;
        [
            (x + e, y + e),
            (x + side - e, y + e),
            (x + e, y + side - e),
            (x + side - e, y + side - e),
            (x + side / 2.0, y + side / 2.0),
        ]
        .iter()
        .all(|&(px, py)| self.contains(px, py))
    }
}

/// Reads labelled regions from GeoJSON: a FeatureCollection of Polygon (outer ring) or MultiPolygon
/// features whose class is `properties.classification.name` (QuPath) or `properties.class`.
pub fn read_regions(path: &Path) -> Result<Vec<Region>, PairError> {
    let err = |message: String| PairError::Regions {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    parse_regions(&text).map_err(err)
}

pub fn parse_regions(bytes: &[u8]) -> Result<Vec<Region>, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let features = match v.get("features") {
        Some(f) => f.as_array().cloned().unwrap_or_default(),
        None if v.get("geometry").is_some() => vec![v.clone()],
        None => v
            .as_array()
            .cloned()
            .ok_or("not a GeoJSON FeatureCollection")?,
    };
    let mut regions = Vec::new();
    for (i, f) in features.iter().enumerate() {
        let props = f.get("properties");
        let class = props
            .and_then(|p| p.pointer("/classification/name").or_else(|| p.get("class")))
            .and_then(|c| c.as_str())
            .ok_or_else(|| format!("feature {i} has no class (properties.classification.name)"))?
            .trim()
            .to_string();
        let geometry = f
            .get("geometry")
            .ok_or_else(|| format!("feature {i} has no geometry"))?;
        let kind = geometry.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let coords = geometry.get("coordinates");
        let polygons: Vec<&serde_json::Value> = match (kind, coords) {
            ("Polygon", Some(c)) => vec![c],
            ("MultiPolygon", Some(serde_json::Value::Array(ps))) => ps.iter().collect(),
            _ => {
                return Err(format!(
                    "feature {i}: only Polygon and MultiPolygon are read"
                ));
            }
        };
        for poly in polygons {
            let ring = poly
                .get(0)
                .and_then(|r| r.as_array())
                .ok_or_else(|| format!("feature {i}: a polygon without a ring"))?;
            let mut points = Vec::with_capacity(ring.len());
            for p in ring {
                let x = p.get(0).and_then(|v| v.as_f64());
                let y = p.get(1).and_then(|v| v.as_f64());
                match (x, y) {
                    (Some(x), Some(y)) if x.is_finite() && y.is_finite() => points.push([x, y]),
                    _ => return Err(format!("feature {i}: a point is not two numbers")),
                }
            }
            // GeoJSON closes a ring by repeating its first point; the polygon keeps it once.
            if points.len() > 3 && points.first() == points.last() {
                points.pop();
            }
            if points.len() < 3 {
                return Err(format!("feature {i}: a polygon needs three points"));
            }
            regions.push(Region {
                class: class.clone(),
                polygon: points,
            });
        }
    }
    if regions.is_empty() {
        return Err("no labelled polygon".into());
    }
    Ok(regions)
}

/// Where histolens keeps the regions drawn on a slide: `SLIDE.regions.geojson` beside it.
pub fn regions_sidecar(slide: &Path) -> PathBuf {
    let mut name = slide.as_os_str().to_os_string();
    name.push(".regions.geojson");
    PathBuf::from(name)
}

/// Regions as GeoJSON in QuPath's form (a FeatureCollection of annotations whose class is
/// `properties.classification.name`), so that QuPath and [`parse_regions`] read them back.
pub fn regions_geojson(regions: &[Region]) -> String {
    let features: Vec<serde_json::Value> = regions
        .iter()
        .map(|r| {
            let mut ring: Vec<[f64; 2]> = r.polygon.clone();
            if let (Some(first), Some(last)) = (ring.first().copied(), ring.last())
                && first != *last
            {
                ring.push(first);
            }
            serde_json::json!({
                "type": "Feature",
                "geometry": { "type": "Polygon", "coordinates": [ring] },
                "properties": { "objectType": "annotation", "classification": { "name": r.class } },
            })
        })
        .collect();
    serde_json::json!({ "type": "FeatureCollection", "features": features }).to_string()
}

/// Writes regions atomically (an empty list removes the file).
pub fn write_regions(path: &Path, regions: &[Region]) -> Result<(), PairError> {
    let io = |message: String| PairError::Io {
        path: path.to_path_buf(),
        message,
    };
    if regions.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e.to_string())),
            _ => Ok(()),
        };
    }
    write_atomic(path, regions_geojson(regions).as_bytes()).map_err(|e| io(e.to_string()))
}

/// A square of a slide's level 0, read at `out` px with an area filter from the coarsest level that is
/// still at least as fine, composited over white.
pub fn read_field(
    slide: &Slide,
    x: f64,
    y: f64,
    side: f64,
    out: u32,
) -> Result<RgbImage, SlideError> {
    read_field_rect(slide, [x, y], [side, side], out)
}

/// A `w` x `h` rectangle of level 0 at `[x, y]` read into `out` x `out` px: a square field of a source
/// whose pixels are not square (`w` = `h` x its pixel aspect).
pub fn read_field_rect(
    slide: &Slide,
    [x, y]: [f64; 2],
    [w, h]: [f64; 2],
    out: u32,
) -> Result<RgbImage, SlideError> {
    let info = slide.info();
    let wanted = w.min(h) / f64::from(out);
    let level = info
        .levels
        .iter()
        .rposition(|l| l.downsample <= wanted + 1e-9)
        .unwrap_or(0);
    let ds = info.levels[level].downsample;
    let (rw, rh) = (
        ((w / ds).round() as u32).max(1),
        ((h / ds).round() as u32).max(1),
    );
    let region = slide.read_region(level, x.round() as i64, y.round() as i64, rw, rh)?;
    Ok(to_rgb(&resize_area(&region, out, out)))
}

/// Both images of a pair from one high-magnification field image (the low one area-downsampled).
pub fn pair_from_field(high: &RgbImage, geometry: &PairGeometry) -> RgbImage {
    resize_area_rgb(high, geometry.low_px(), geometry.low_px())
}

/// How pairs are cut.
#[derive(Debug, Clone, Serialize)]
pub struct PairConfig {
    pub geometry: PairGeometry,
    /// Grid step over labelled regions as a share of the field (1: fields touch; 0.5: half overlap).
    pub stride: f64,
    /// Shares of train, validation and test, dealt by source group (region or image).
    pub fractions: [f64; 3],
    /// At most this many fields per group (a random subset), so that one large region (e.g. of
    /// glass) does not outweigh the others.
    pub max_per_group: Option<usize>,
    /// Fields of labelled images whose share of background (glass, see [`crate::data::tissue`]) is
    /// above this are not cut: tissue only. Labelled slide regions are cut whole: their label says
    /// what they hold (a region of glass may be a class of its own).
    pub max_background: f64,
    pub seed: u64,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig {
            geometry: PairGeometry::default(),
            stride: 1.0,
            fractions: [0.7, 0.15, 0.15],
            max_per_group: None,
            max_background: 0.5,
            seed: 0,
        }
    }
}

/// A slide and its labelled regions.
#[derive(Debug, Clone)]
pub struct SlideSource {
    pub path: PathBuf,
    /// µm/px of level 0 (from the metadata unless given).
    pub mpp: f64,
    pub regions: Vec<Region>,
}

/// A folder with one sub-folder per class, of images at `magnification`.
#[derive(Debug, Clone)]
pub struct FolderSource {
    pub path: PathBuf,
    /// Of the images' vertical axis (10 / µm/px).
    pub magnification: f64,
    /// Width of a stored pixel's content over its height: 1 for square pixels; 0.75 for images
    /// squashed horizontally to 3/4 of their width (BACH's JPEG copies), whose fields are read
    /// 0.75 times as wide as tall and so come out square again.
    pub pixel_aspect: f64,
}

impl FolderSource {
    /// The files of its class sub-folders (sorted), each its own group. Files that are not images
    /// are found out (and skipped) when the fields are cut.
    pub fn images(&self) -> Result<Vec<ImageSource>, PairError> {
        let mut images = Vec::new();
        for dir in sorted_entries(&self.path, Path::is_dir)? {
            let class = dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            // What is not a readable file is said, not skipped silently.
            for other in sorted_entries(&dir, |p| !p.is_file())? {
                let why = if other.is_dir() {
                    "a sub-folder inside a class folder is not read (move its images up)"
                } else if std::fs::symlink_metadata(&other).is_ok_and(|m| m.is_symlink()) {
                    "a symbolic link to nothing (dangling, or a loop)"
                } else {
                    "not a regular file"
                };
                log::warn!("skipped {}: {why}", other.display());
            }
            for file in sorted_entries(&dir, Path::is_file)? {
                images.push(ImageSource {
                    group: file.display().to_string(),
                    path: file,
                    class: class.clone(),
                    magnification: self.magnification,
                    pixel_aspect: self.pixel_aspect,
                });
            }
        }
        Ok(images)
    }
}

/// One labelled image at a known magnification, tiled whole into fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSource {
    pub path: PathBuf,
    pub class: String,
    /// The split unit: images of one group are dealt to the same split.
    pub group: String,
    /// Of the vertical axis (10 / µm/px).
    pub magnification: f64,
    /// See [`FolderSource::pixel_aspect`].
    pub pixel_aspect: f64,
}

/// One field before it is written: where it came from and its image at the high magnification.
struct Field {
    class: String,
    group: String,
    region: String,
    high: RgbImage,
}

/// The "x,y,w,h" of a level-0 square, rounded.
fn square_region(x: f64, y: f64, side: f64) -> String {
    rect_region(x, y, side, side)
}

/// The "x,y,w,h" of a level-0 rectangle, rounded.
fn rect_region(x: f64, y: f64, w: f64, h: f64) -> String {
    format!("{},{},{},{}", x.round(), y.round(), w.round(), h.round())
}

/// Whether a field is tissue enough to be cut (see [`PairConfig::max_background`]).
fn is_tissue(high: &RgbImage, cfg: &PairConfig) -> bool {
    crate::data::tissue::background_fraction_rgb(high) <= cfg.max_background
}

/// Cuts pairs from labelled slide regions, class folders and single labelled images into
/// `out/pairs/<class>/` and writes `out/pairs.csv` and `out/dataset.json` (atomically). Groups (a
/// slide's region, an image of a class folder, an [`ImageSource`]'s group) are dealt whole to the
/// splits, per class.
pub fn build(
    slides: &[SlideSource],
    folders: &[FolderSource],
    images: &[ImageSource],
    out: &Path,
    cfg: &PairConfig,
    mut progress: impl FnMut(&str),
) -> Result<(Manifest<PairRecord>, PairDataset), PairError> {
    let g = cfg.geometry;
    g.validate(1)?;
    let mut fields = Vec::new();
    for s in slides {
        progress(&s.path.display().to_string());
        fields.extend(slide_fields(s, cfg)?);
    }
    for image in images {
        check_resolution(&image.path, image.magnification, &g)?;
    }
    for f in folders {
        check_resolution(&f.path, f.magnification, &g)?;
        progress(&f.path.display().to_string());
        for image in f.images()? {
            fields.extend(image_fields(&image, cfg)?);
        }
    }
    for image in images {
        progress(&image.path.display().to_string());
        fields.extend(image_fields(image, cfg)?);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    if let Some(cap) = cfg.max_per_group {
        let mut by_group: BTreeMap<String, Vec<Field>> = BTreeMap::new();
        for f in fields {
            by_group.entry(f.group.clone()).or_default().push(f);
        }
        fields = Vec::new();
        for (_, mut list) in by_group {
            list.shuffle(&mut rng);
            list.truncate(cap.max(1));
            fields.extend(list);
        }
    }
    if fields.is_empty() {
        return Err(PairError::Nothing(format!(
            "no labelled region or image holds a whole {} µm field of tissue",
            g.field_um
        )));
    }
    // Deal the groups of each class to the splits in a shuffled order.
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in &fields {
        let list = groups.entry(f.class.as_str()).or_default();
        if !list.contains(&f.group.as_str()) {
            list.push(f.group.as_str());
        }
    }
    let mut split_of: BTreeMap<&str, Split> = BTreeMap::new();
    for list in groups.values_mut() {
        list.shuffle(&mut rng);
        for (rank, group) in list.iter().enumerate() {
            split_of.insert(group, split_for_rank(rank, list.len(), cfg.fractions));
        }
    }
    let classes: Vec<String> = groups.keys().map(|c| c.to_string()).collect();
    let mut records = Vec::with_capacity(fields.len());
    let mut counters: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &fields {
        let k = counters.entry(f.class.as_str()).or_default();
        *k += 1;
        let class_dir = sanitize(&f.class);
        let stem = format!("pairs/{class_dir}/{class_dir}-{:05}", *k);
        let (high_rel, low_rel) = (format!("{stem}-high.png"), format!("{stem}-low.png"));
        save_png(&out.join(&high_rel), &f.high)?;
        save_png(&out.join(&low_rel), &pair_from_field(&f.high, &g))?;
        records.push(PairRecord {
            high: high_rel,
            low: low_rel,
            class: f.class.clone(),
            source: f.group.clone(),
            region: f.region.clone(),
            split: split_of
                .get(f.group.as_str())
                .copied()
                .unwrap_or(Split::Train),
        });
    }
    let manifest = Manifest {
        root: out.to_path_buf(),
        records,
    };
    manifest.check_disjoint()?;
    manifest.save(&out.join("pairs.csv"))?;
    let dataset = PairDataset {
        geometry: g,
        classes,
    };
    save_dataset(&out.join("dataset.json"), &dataset)?;
    Ok((manifest, dataset))
}

/// `dataset.json`, written atomically.
pub fn save_dataset(path: &Path, d: &PairDataset) -> Result<(), PairError> {
    let io = |message: String| PairError::Io {
        path: path.to_path_buf(),
        message,
    };
    let json = serde_json::to_vec_pretty(d).map_err(|e| io(e.to_string()))?;
    write_atomic(path, &json).map_err(|e| io(e.to_string()))
}

/// The `dataset.json` beside a pairs manifest.
pub fn load_dataset(manifest: &Path) -> Result<PairDataset, PairError> {
    let path = manifest.with_file_name("dataset.json");
    let io = |message: String| PairError::Io {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(&path).map_err(|e| io(e.to_string()))?;
    let d: PairDataset = serde_json::from_slice(&bytes).map_err(|e| io(e.to_string()))?;
    if d.classes.len() < 2 {
        return Err(io("a classifier needs at least two classes".into()));
    }
    Ok(d)
}

fn slide_fields(s: &SlideSource, cfg: &PairConfig) -> Result<Vec<Field>, PairError> {
    let g = cfg.geometry;
    let native = 10.0 / s.mpp;
    if !(s.mpp.is_finite() && s.mpp > 0.0) || g.high_magnification > native * 1.02 {
        return Err(PairError::TooLowResolution {
            path: s.path.clone(),
            native,
            wanted: g.high_magnification,
        });
    }
    let slide = Slide::open(&s.path)?;
    let (w, h) = slide.info().dimensions();
    let side = g.level0_side(s.mpp);
    let step = (side * cfg.stride.clamp(0.05, 10.0)).max(1.0);
    let mut fields = Vec::new();
    for (ri, region) in s.regions.iter().enumerate() {
        let (mut x0, mut y0, mut x1, mut y1) = (f64::MAX, f64::MAX, f64::MIN, f64::MIN);
        for &[x, y] in &region.polygon {
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
        let (x0, y0) = (x0.max(0.0), y0.max(0.0));
        let (x1, y1) = (x1.min(w as f64), y1.min(h as f64));
        let mut y = y0;
        while y + side <= y1 {
            let mut x = x0;
            while x + side <= x1 {
                if region.contains_square(x, y, side) {
                    fields.push(Field {
                        class: region.class.clone(),
                        group: format!("{}#region{ri}", s.path.display()),
                        region: square_region(x, y, side),
                        high: read_field(&slide, x, y, side, g.high_px())?,
                    });
                }
                x += step;
            }
            y += step;
        }
    }
    Ok(fields)
}

/// Pairs are never cut from images below the high magnification (they would need upsampling).
fn check_resolution(path: &Path, magnification: f64, g: &PairGeometry) -> Result<(), PairError> {
    if magnification.is_nan() || magnification < g.high_magnification * 0.98 {
        return Err(PairError::TooLowResolution {
            path: path.to_path_buf(),
            native: magnification,
            wanted: g.high_magnification,
        });
    }
    Ok(())
}

/// The entries of `dir` that pass `keep`, sorted.
fn sorted_entries(dir: &Path, keep: fn(&Path) -> bool) -> Result<Vec<PathBuf>, PairError> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PairError::Io {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| keep(p))
        .collect();
    paths.sort();
    Ok(paths)
}

/// The most fields one labelled image gives.
const MAX_FIELDS_PER_IMAGE: u64 = 256;

/// Whole fields tiled over an image (after downsampling it to the high magnification), centred;
/// fields of glass are left out. A file that is not an image is skipped: a folder of images often
/// holds a stray note.
fn image_fields(image: &ImageSource, cfg: &PairConfig) -> Result<Vec<Field>, PairError> {
    let g = &cfg.geometry;
    check_resolution(&image.path, image.magnification, g)?;
    let aspect = image.pixel_aspect;
    if !(aspect.is_finite() && aspect > 0.0) {
        return Err(PairError::Geometry(format!(
            "{}: a pixel aspect must be a positive number, not {aspect}",
            image.path.display()
        )));
    }
    let file = &image.path;
    let Ok(slide) = Slide::open(file) else {
        log::warn!("skipped {}: not an image", file.display());
        return Ok(Vec::new());
    };
    let out = g.high_px();
    // The field in stored pixels: `h` tall and, where pixels are squashed, `aspect` times as wide.
    let h = f64::from(out) * image.magnification / g.high_magnification;
    let w = h * aspect;
    let (width, height) = slide.info().dimensions();
    let (nx, ny) = ((width as f64 / w) as u64, (height as f64 / h) as u64);
    if nx == 0 || ny == 0 {
        log::warn!(
            "skipped {}: smaller than a {} µm field",
            file.display(),
            g.field_um
        );
        return Ok(Vec::new());
    }
    let mx = (width as f64 - nx as f64 * w) / 2.0;
    let my = (height as f64 - ny as f64 * h) / 2.0;
    // A labelled image is a field of view, not a slide: a huge one gives evenly spread fields, at
    // most MAX_FIELDS_PER_IMAGE, so that work and memory stay bounded.
    let total = nx * ny;
    let step = total.div_ceil(MAX_FIELDS_PER_IMAGE);
    if step > 1 {
        log::warn!(
            "{}: {width}x{height} px holds {total} fields; {} evenly spread are used (give a slide \
             this large with labelled regions instead)",
            file.display(),
            total.div_ceil(step)
        );
    }
    let mut fields = Vec::with_capacity(total.div_ceil(step) as usize);
    for k in (0..total).step_by(step as usize) {
        let (i, j) = (k % nx, k / nx);
        let (x, y) = (mx + i as f64 * w, my + j as f64 * h);
        let high = read_field_rect(&slide, [x, y], [w, h], out)?;
        if is_tissue(&high, cfg) {
            fields.push(Field {
                class: image.class.clone(),
                group: image.group.clone(),
                region: rect_region(x, y, w, h),
                high,
            });
        }
    }
    Ok(fields)
}

fn sanitize(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() { "class".into() } else { t }
}

fn save_png(path: &Path, img: &RgbImage) -> Result<(), PairError> {
    crate::util::fs::write_png_atomic(path, img).map_err(|e| PairError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_paper_example() {
        let g = PairGeometry::default();
        assert_eq!((g.high_px(), g.low_px()), (600, 150));
        assert!((g.level0_side(0.25) - 1200.0).abs() < 1e-9);
        assert!(g.validate(75).is_ok());
        let bad = PairGeometry {
            high_magnification: 5.0,
            low_magnification: 20.0,
            field_um: 300.0,
        };
        assert!(bad.validate(32).is_err());
    }

    #[test]
    fn class_folders_and_image_sources_cut_the_same_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("classes");
        for (class, shade) in [("stroma", 40u8), ("tumour", 200)] {
            for i in 0..3u32 {
                let img = RgbImage::from_fn(200, 150, |x, y| {
                    image::Rgb([shade, (x + i) as u8, (y * 2) as u8])
                });
                let path = root.join(class).join(format!("{i}.png"));
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                img.save(&path).unwrap();
            }
        }
        std::fs::write(root.join("tumour/readme.txt"), "not an image").unwrap();
        let cfg = PairConfig {
            geometry: PairGeometry {
                high_magnification: 20.0,
                low_magnification: 10.0,
                field_um: 32.0,
            },
            seed: 4,
            ..Default::default()
        };
        let folder = FolderSource {
            path: root.clone(),
            magnification: 40.0,
            pixel_aspect: 1.0,
        };
        let images = folder.images().unwrap();
        assert_eq!(images.len(), 7);
        assert_eq!(images[0].class, "stroma");
        let (from_folder, _) =
            build(&[], &[folder], &[], &dir.path().join("a"), &cfg, |_| {}).unwrap();
        let (from_images, ds) =
            build(&[], &[], &images, &dir.path().join("b"), &cfg, |_| {}).unwrap();
        assert_eq!(from_folder.records, from_images.records);
        // 200 x 150 px at 40x is 100 x 75 px at 20x: 1 x 1 field of 64 px, centred.
        assert_eq!(from_images.records.len(), 6);
        assert_eq!(from_images.records[0].region, "36,11,128,128");
        assert_eq!(ds.classes, ["stroma", "tumour"]);
        let too_coarse = ImageSource {
            magnification: 10.0,
            ..images[0].clone()
        };
        assert!(matches!(
            build(&[], &[], &[too_coarse], &dir.path().join("c"), &cfg, |_| {}),
            Err(PairError::TooLowResolution { .. })
        ));
    }

    /// "x,y,w,h" of a record's region, in µm of a source of `mpp_x` x `mpp_y` µm/px: centre and side.
    fn physical(region: &str, [mpp_x, mpp_y]: [f64; 2]) -> [f64; 4] {
        let v: Vec<f64> = region.split(',').map(|t| t.parse().unwrap()).collect();
        [
            (v[0] + v[2] / 2.0) * mpp_x,
            (v[1] + v[3] / 2.0) * mpp_y,
            v[2] * mpp_x,
            v[3] * mpp_y,
        ]
    }

    fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
        assert_eq!(a.dimensions(), b.dimensions());
        let sum: u64 = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(&x, &y)| u64::from(x.abs_diff(y)))
            .sum();
        sum as f64 / a.as_raw().len() as f64
    }

    /// An image squashed horizontally to 3/4 of its width (as BACH's copies are), cut with that
    /// pixel aspect, gives the fields of the unsquashed image: the same centre and extent in µm, the
    /// same pixels at the high magnification, and at the low one the same field area-downsampled.
    #[test]
    fn squashed_images_give_the_fields_of_the_true_image_at_both_magnifications() {
        let dir = tempfile::tempdir().unwrap();
        // 400 x 300 px at 0.5 µm/px (20x), tissue-coloured waves along both axes.
        let wave = |t: f64, period: f64| (t * std::f64::consts::TAU / period).sin();
        let truth = RgbImage::from_fn(400, 300, |x, y| {
            let (x, y) = (f64::from(x), f64::from(y));
            image::Rgb([
                (170.0 + 60.0 * wave(x, 60.0)) as u8,
                (110.0 + 50.0 * wave(y, 45.0)) as u8,
                (160.0 + 40.0 * wave(x + y, 80.0)) as u8,
            ])
        });
        let rgba = image::DynamicImage::ImageRgb8(truth.clone()).to_rgba8();
        let squashed = to_rgb(&resize_area(&rgba, 300, 300));
        for (name, img) in [("truth", &truth), ("squashed", &squashed)] {
            let path = dir.path().join(name).join("tumour").join("a.png");
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            img.save(&path).unwrap();
        }
        // 64 px fields at 20x (32 µm), 16 px at 5x.
        let cfg = PairConfig {
            geometry: PairGeometry {
                high_magnification: 20.0,
                low_magnification: 5.0,
                field_um: 32.0,
            },
            ..Default::default()
        };
        let cut = |name: &str, pixel_aspect: f64| {
            let folder = FolderSource {
                path: dir.path().join(name),
                magnification: 20.0,
                pixel_aspect,
            };
            let out = dir.path().join(format!("{name}-{pixel_aspect}"));
            build(&[], &[folder], &[], &out, &cfg, |_| {}).unwrap().0
        };
        let (reference, restored) = (cut("truth", 1.0), cut("squashed", 0.75));
        assert_eq!(reference.records.len(), 6 * 4);
        assert_eq!(restored.records.len(), reference.records.len());
        let read = |m: &Manifest<PairRecord>, rel: &str| {
            image::open(m.resolve_path(rel)).unwrap().to_rgb8()
        };
        for (a, b) in reference.records.iter().zip(&restored.records) {
            let pa = physical(&a.region, [0.5, 0.5]);
            let pb = physical(&b.region, [0.5 / 0.75, 0.5]);
            for (u, v) in pa.iter().zip(&pb) {
                assert!(
                    (u - v).abs() < 0.5,
                    "{} vs {}: {pa:?} vs {pb:?}",
                    a.region,
                    b.region
                );
            }
            assert!(
                (pb[2] - 32.0).abs() < 0.5 && (pb[3] - 32.0).abs() < 0.5,
                "{pb:?}"
            );
            let (high_a, high_b) = (read(&reference, &a.high), read(&restored, &b.high));
            assert!(mean_abs_diff(&high_a, &high_b) < 4.0, "{}", a.region);
            // The low image is the same field, read at 5x.
            let low_b = read(&restored, &b.low);
            assert_eq!(low_b.dimensions(), (16, 16));
            assert!(mean_abs_diff(&read(&reference, &a.low), &low_b) < 3.0);
        }
        // Cut without its aspect, the squashed image's fields are not the true ones.
        let wrong = cut("squashed", 1.0);
        let d = mean_abs_diff(
            &read(&reference, &reference.records[0].high),
            &read(&wrong, &wrong.records[0].high),
        );
        assert!(d > 10.0, "{d}");
    }

    /// Fields of glass are left out; the rest of the image is cut.
    #[test]
    fn fields_of_glass_are_not_cut() {
        let dir = tempfile::tempdir().unwrap();
        // Left half tissue, right half glass: 128 x 64 px, two 64 px fields.
        let img = RgbImage::from_fn(128, 64, |x, _| {
            if x < 64 {
                image::Rgb([180, 90, 160])
            } else {
                image::Rgb([242, 240, 244])
            }
        });
        let path = dir.path().join("in/tumour/a.png");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(&path).unwrap();
        let folder = FolderSource {
            path: dir.path().join("in"),
            magnification: 20.0,
            pixel_aspect: 1.0,
        };
        let mut cfg = PairConfig {
            geometry: PairGeometry {
                high_magnification: 20.0,
                low_magnification: 5.0,
                field_um: 32.0,
            },
            ..Default::default()
        };
        let (m, _) = build(
            &[],
            std::slice::from_ref(&folder),
            &[],
            &dir.path().join("a"),
            &cfg,
            |_| {},
        )
        .unwrap();
        assert_eq!(m.records.len(), 1);
        assert_eq!(m.records[0].region, "0,0,64,64");
        cfg.max_background = 1.0;
        let (m, _) = build(&[], &[folder], &[], &dir.path().join("b"), &cfg, |_| {}).unwrap();
        assert_eq!(m.records.len(), 2);
    }

    #[test]
    fn regions_parse_from_qupath_geojson_and_contain_points() {
        let json = br#"{"type":"FeatureCollection","features":[
            {"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[0,0],[100,0],[100,50],[0,50],[0,0]]]},
             "properties":{"classification":{"name":"stroma"}}},
            {"type":"Feature","geometry":{"type":"Polygon","coordinates":[[[0,0],[10,0],[0,10],[0,0]]]},
             "properties":{"class":"tumour"}}]}"#;
        let r = parse_regions(json).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].class, "stroma");
        assert!(r[0].contains(50.0, 25.0));
        assert!(!r[0].contains(150.0, 25.0));
        assert!(r[0].contains_square(10.0, 10.0, 30.0));
        assert!(!r[0].contains_square(80.0, 10.0, 30.0));
        // Triangle: the square's far corner is outside.
        assert!(!r[1].contains_square(0.0, 0.0, 8.0));
        assert!(r[1].contains_square(0.5, 0.5, 4.0));
        assert!(parse_regions(b"{}").is_err());
        assert!(parse_regions(br#"{"features":[{"geometry":{"type":"Point","coordinates":[1,2]},"properties":{"class":"a"}}]}"#).is_err());
    }

    /// Regions written as GeoJSON (rings closed, as GeoJSON wants them) read back the same, and an
    /// empty list removes the file.
    #[test]
    fn regions_round_trip_through_geojson() {
        let dir = tempfile::tempdir().unwrap();
        let regions = vec![
            Region {
                class: "tumour".into(),
                polygon: vec![[0.0, 0.0], [100.0, 0.0], [100.0, 50.0], [0.0, 50.0]],
            },
            Region {
                class: "stroma".into(),
                polygon: vec![[10.0, 10.0], [40.0, 12.5], [20.0, 30.0]],
            },
        ];
        let json: serde_json::Value = serde_json::from_str(&regions_geojson(&regions)).unwrap();
        let ring = &json["features"][0]["geometry"]["coordinates"][0];
        assert_eq!(
            ring.as_array().map(Vec::len),
            Some(5),
            "a closed ring: {ring}"
        );
        let path = regions_sidecar(&dir.path().join("a.svs"));
        assert!(path.ends_with("a.svs.regions.geojson"));
        write_regions(&path, &regions).unwrap();
        let back = read_regions(&path).unwrap();
        assert_eq!(back, regions);
        write_regions(&path, &[]).unwrap();
        assert!(!path.exists());
    }
}
