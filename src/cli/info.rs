//! `histolens info FILE [--json]`.

use std::path::Path;

use anyhow::Context as _;
use histolens::slide::{CalibrationStore, Slide};

pub fn run(path: &Path, json: bool) -> anyhow::Result<()> {
    let slide = Slide::open(path)?;
    let info = slide.info();
    let calibration = CalibrationStore::saved_for(path);
    let effective = info.effective_mpp(&calibration);
    if json {
        let value = serde_json::json!({
            "info": info,
            "calibration": calibration,
            "effective_mpp": effective,
            "magnification": effective.map(|m| m.magnification()),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).context("serialising the slide info")?
        );
        return Ok(());
    }
    let (w, h) = info.dimensions();
    println!("file:            {}", info.path.display());
    println!("format:          {}", info.format_label());
    println!("dimensions:      {w} x {h} px");
    match info.mpp {
        Some(m) => println!(
            "µm/px:           {:.4} x {:.4} ({})",
            m.x,
            m.y,
            m.source.label()
        ),
        None => println!("µm/px:           unknown (not in the metadata)"),
    }
    if let Some(note) = info.properties.get(histolens::slide::RESOLUTION_NOTE) {
        println!("                 {note}");
    }
    if let Some(m) = effective.filter(|m| Some(*m) != info.mpp) {
        println!("µm/px in use:    {:.4} ({})", m.mean(), m.source.label());
    }
    match effective {
        Some(m) => println!("magnification:   {:.1}x equivalent", m.magnification()),
        None => println!("magnification:   unknown"),
    }
    match info.objective_power {
        Some(p) => println!("objective power: {p}x"),
        None => println!("objective power: not in the metadata"),
    }
    println!("levels:          {}", info.levels.len());
    for (i, l) in info.levels.iter().enumerate() {
        println!(
            "  level {i}: {} x {} px, downsample {:.4}",
            l.width, l.height, l.downsample
        );
    }
    if info.associated.is_empty() {
        println!("associated:      none");
    } else {
        println!("associated:");
        for a in &info.associated {
            println!("  {}: {} x {} px", a.name, a.width, a.height);
        }
    }
    println!("properties:      {}", info.properties.len());
    Ok(())
}
