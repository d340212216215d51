//! The project as training data: a magnification manifest, or DMSL pairs.

use std::collections::BTreeSet;
use std::path::Path;

use super::{Label, LabelError, LabelSet, is_slide_path};
use crate::data::manifest::{MagnificationRecord, Manifest, Split};
use crate::data::pairs::{self, ImageSource, PairConfig, PairDataset, PairRecord};

impl LabelSet {
    /// The images with a magnification label and a split as a magnification manifest at `out`
    /// (written atomically; paths relative to its folder where they lie under it). Each record covers
    /// the whole image ("0,0,w,h") and its source is the entry's group, so splits stay disjoint.
    /// Whole slides are refused: the trainer reads images (cut patches from slides with
    /// `histolens dataset magnification`).
    pub fn to_magnification_manifest(
        &self,
        out: &Path,
    ) -> Result<Manifest<MagnificationRecord>, LabelError> {
        let out = std::path::absolute(out).map_err(|source| LabelError::Write {
            path: out.to_path_buf(),
            source,
        })?;
        let root = out.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut records = Vec::new();
        for e in &self.entries {
            let (Some(Label::Magnification { magnification, mpp }), Some(split)) =
                (&e.label, e.split)
            else {
                continue;
            };
            if is_slide_path(&e.path) {
                return Err(LabelError::SlideNotSupported(e.path.clone()));
            }
            if !e.path.exists() {
                return Err(LabelError::Missing(e.path.clone()));
            }
            let (w, h) = image::image_dimensions(&e.path).map_err(|err| LabelError::Image {
                path: e.path.clone(),
                message: err.to_string(),
            })?;
            records.push(MagnificationRecord {
                path: e
                    .path
                    .strip_prefix(&root)
                    .unwrap_or(&e.path)
                    .to_string_lossy()
                    .into_owned(),
                magnification: *magnification,
                mpp: mpp.unwrap_or(10.0 / magnification),
                source: e.split_unit(),
                region: format!("0,0,{w},{h}"),
                split,
                group: e.split_unit(),
                absolute: true,
                field: String::new(),
            });
        }
        if records.is_empty() {
            return Err(LabelError::NothingToExport(
                "no image has both a magnification label and a split".into(),
            ));
        }
        if !records.iter().any(|r| r.split == Split::Train) {
            return Err(LabelError::NothingToExport(
                "the train split holds no image with a magnification label".into(),
            ));
        }
        let manifest = Manifest { root, records };
        manifest.check_disjoint()?;
        manifest.save(&out)?;
        Ok(manifest)
    }

    /// The class-labelled images, all at `magnification` with pixels `pixel_aspect` as wide as tall
    /// ([`pairs::FolderSource::pixel_aspect`]), and the slides with regions drawn on them
    /// (`pairs::regions_sidecar`), through the DMSL pair builder into `out_dir` (`pairs.csv`,
    /// `dataset.json`, `pairs/`). Each image is tiled whole into fields; an
    /// entry's group is its split unit, and the builder deals the groups of each class to the splits
    /// itself (`cfg.fractions`, `cfg.seed`): the project's own splits are not used here.
    pub fn to_dmsl_pairs(
        &self,
        out_dir: &Path,
        cfg: &PairConfig,
        magnification: f64,
        pixel_aspect: f64,
        progress: impl FnMut(&str),
    ) -> Result<(Manifest<PairRecord>, PairDataset), LabelError> {
        let mut images = Vec::new();
        let mut slides = Vec::new();
        for e in &self.entries {
            // A slide contributes the regions drawn on it (whatever its own label).
            if is_slide_path(&e.path) {
                let regions = pairs::regions_sidecar(&e.path);
                if regions.is_file() {
                    slides.push(slide_source(&e.path, &regions)?);
                } else if e.label.is_some() {
                    return Err(LabelError::SlideNotSupported(e.path.clone()));
                }
                continue;
            }
            let Some(Label::Class(class)) = &e.label else {
                continue;
            };
            if !e.path.exists() {
                return Err(LabelError::Missing(e.path.clone()));
            }
            images.push(ImageSource {
                path: e.path.clone(),
                class: class.clone(),
                group: e.split_unit(),
                magnification,
                pixel_aspect,
            });
        }
        let classes: BTreeSet<&str> = images
            .iter()
            .map(|i| i.class.as_str())
            .chain(
                slides
                    .iter()
                    .flat_map(|s: &pairs::SlideSource| s.regions.iter().map(|r| r.class.as_str())),
            )
            .collect();
        if classes.len() < 2 {
            return Err(LabelError::NothingToExport(format!(
                "a classifier needs images of at least two classes; the class-labelled images have {}",
                if classes.is_empty() {
                    "none".to_string()
                } else {
                    classes.into_iter().collect::<Vec<_>>().join(", ")
                }
            )));
        }
        Ok(pairs::build(&slides, &[], &images, out_dir, cfg, progress)?)
    }
}

/// A slide with the regions drawn on it, at the µm/px its metadata gives.
fn slide_source(path: &Path, regions: &Path) -> Result<pairs::SlideSource, LabelError> {
    let slide = crate::slide::Slide::open(path).map_err(|e| LabelError::Image {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mpp = slide
        .info()
        .mpp
        .map(|m| (m.x + m.y) / 2.0)
        .ok_or_else(|| LabelError::Image {
            path: path.to_path_buf(),
            message: "its µm/px is unknown: pairs need it".into(),
        })?;
    Ok(pairs::SlideSource {
        path: path.to_path_buf(),
        mpp,
        regions: pairs::read_regions(regions)?,
    })
}
