//! Overlays on the GPU: an egui-wgpu paint callback drawing one value per cell of a grid anchored on
//! the slide (a heatmap class's probability, a Grad-CAM map) through `shaders/overlay.wgsl`, coloured by
//! the same colormap polynomials as the CPU export, blended over the slide with an opacity and a
//! threshold. Each [`Layer`] has its own texture and parameters, so the heatmap and a Grad-CAM map can
//! be drawn in the same frame.
//!
//! The values live on the CPU in [`OverlayData`] (shared with the callback); each texture row remembers
//! the version in which it last changed, so `prepare` re-uploads only the rows that changed since the
//! GPU copy was made, however many frames were never rendered in between. The pipeline is created once,
//! from the render state's target format, and kept in egui-wgpu's `callback_resources`.

use std::sync::Arc;

use egui::{Rect as ERect, pos2};
use egui_wgpu::wgpu;
use parking_lot::Mutex;

use crate::dmsl::heatmap::HeatmapGrid;
use crate::tiles::Viewport;
use crate::util::colormap::Colormap;

/// The overlay's WGSL source, with `PARAMS_SPACE` still to be replaced (see [`shader_source`]).
const SHADER_TEMPLATE: &str = include_str!("../../shaders/overlay.wgsl");

/// The overlay's WGSL with its parameters in a read-only storage buffer (`storage`) or a uniform one.
///
/// Storage wherever the device allows it in fragment shaders: Mesa's lavapipe (the software Vulkan of
/// machines without a GPU) inlines the values of uniform buffers that steer branches into a new
/// compiled shader variant each time they are written, and keeps every variant: with a uniform buffer
/// written each frame, the window grew by about 15 MiB/s while an overlay was shown.
pub fn shader_source(storage: bool) -> String {
    SHADER_TEMPLATE.replace(
        "PARAMS_SPACE",
        if storage { "storage, read" } else { "uniform" },
    )
}

/// Size of the shader's `Params` buffer in bytes.
const PARAMS_SIZE: u64 = 48;

/// A cell with this value (or any negative one) is transparent: no result is known.
pub const NO_DATA: f32 = -1.0;

/// The per-cell values of the selected class, as the texture will hold them.
#[derive(Debug, Default)]
pub struct OverlayData {
    pub cols: u32,
    pub rows: u32,
    /// Row-major, `cols * rows`; [`NO_DATA`] where nothing is known.
    pub values: Vec<f32>,
    /// The version in which each row last changed.
    row_versions: Vec<u64>,
    /// Bumped by every change; never goes back, so the GPU side can tell what it has not seen.
    version: u64,
}

fn sanitize(v: f32) -> f32 {
    if v.is_finite() && v >= 0.0 {
        v.min(1.0)
    } else {
        NO_DATA
    }
}

impl OverlayData {
    /// Replaces everything (a new heatmap, or another class).
    pub fn reset(&mut self, cols: u32, rows: u32, values: Vec<f32>) {
        debug_assert_eq!(values.len(), cols as usize * rows as usize);
        self.version += 1;
        self.cols = cols;
        self.rows = rows;
        self.values = values.into_iter().map(sanitize).collect();
        self.row_versions = vec![self.version; rows as usize];
    }

    /// Sets some cells (results streaming in).
    pub fn update(&mut self, cells: impl IntoIterator<Item = (usize, f32)>) {
        self.version += 1;
        for (cell, v) in cells {
            if let Some(slot) = self.values.get_mut(cell) {
                *slot = sanitize(v);
                let row = cell / self.cols.max(1) as usize;
                if let Some(rv) = self.row_versions.get_mut(row) {
                    *rv = self.version;
                }
            }
        }
    }

    pub fn clear(&mut self) {
        self.reset(0, 0, Vec::new());
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The rows changed after `since`, as one span (first, last), if any.
    fn dirty_rows(&self, since: u64) -> Option<(u32, u32)> {
        let first = self.row_versions.iter().position(|&v| v > since)?;
        let last = self.row_versions.iter().rposition(|&v| v > since)?;
        Some((first as u32, last as u32))
    }
}

/// How the overlay looks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverlayStyle {
    pub colormap: Colormap,
    pub opacity: f32,
    pub threshold: f32,
}

/// Square cells laid on the slide: `cols` x `rows` of side `cell` (level-0 pixels) from `origin`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellGrid {
    pub origin: [f64; 2],
    pub cell: f64,
    pub cols: u32,
    pub rows: u32,
}

impl From<HeatmapGrid> for CellGrid {
    fn from(g: HeatmapGrid) -> Self {
        CellGrid {
            origin: [0.0, 0.0],
            cell: g.cell,
            cols: g.cols,
            rows: g.rows,
        }
    }
}

/// The overlays drawn together, bottom first; each keeps its own texture on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    Heatmap,
    Gradcam,
}

const LAYERS: usize = 2;

impl Layer {
    fn index(self) -> usize {
        match self {
            Layer::Heatmap => 0,
            Layer::Gradcam => 1,
        }
    }
}

/// What the viewer needs to draw one overlay in one frame.
#[derive(Clone)]
pub struct GridOverlay {
    pub layer: Layer,
    pub data: Arc<Mutex<OverlayData>>,
    pub grid: CellGrid,
    pub style: OverlayStyle,
}

/// Where the grid lands on screen this frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverlayPlacement {
    /// The part of the canvas the grid covers (points): the callback's rectangle.
    pub rect: ERect,
    /// The first cell (column, row) in `rect` and the screen position (points) of its top-left corner.
    pub first: [i32; 2],
    pub corner: egui::Pos2,
    /// Side of a cell in points.
    pub cell_points: f32,
}

/// Places `grid` (level-0 cells) over a slide of `dims` level-0 pixels on a canvas at `canvas` viewing
/// `vp`; cells overhanging the slide are cut at its edge. None when nothing is on screen.
pub fn placement(
    grid: &CellGrid,
    dims: (u64, u64),
    canvas: ERect,
    vp: &Viewport,
) -> Option<OverlayPlacement> {
    let positive = |v: f64| v > 0.0; // false for NaN too
    if grid.cols == 0 || grid.rows == 0 || !positive(grid.cell) || !positive(vp.scale) {
        return None;
    }
    let at = |p: [f64; 2]| {
        let s = vp.slide_to_screen(p);
        [
            f64::from(canvas.min.x) + s[0],
            f64::from(canvas.min.y) + s[1],
        ]
    };
    let [ox, oy] = grid.origin;
    let a = at([ox.max(0.0), oy.max(0.0)]);
    let b = at([
        (ox + f64::from(grid.cols) * grid.cell).min(dims.0 as f64),
        (oy + f64::from(grid.rows) * grid.cell).min(dims.1 as f64),
    ]);
    let covered = ERect::from_min_max(
        pos2(a[0] as f32, a[1] as f32),
        pos2(b[0] as f32, b[1] as f32),
    )
    .intersect(canvas);
    if !(covered.width() > 0.0 && covered.height() > 0.0) {
        return None;
    }
    // The first visible cell, computed in f64 so that the corner stays precise at any zoom.
    let r = vp.visible_rect();
    let c0 = ((r.x0 - ox) / grid.cell)
        .floor()
        .clamp(0.0, f64::from(grid.cols - 1));
    let r0 = ((r.y0 - oy) / grid.cell)
        .floor()
        .clamp(0.0, f64::from(grid.rows - 1));
    let corner = at([ox + c0 * grid.cell, oy + r0 * grid.cell]);
    Some(OverlayPlacement {
        rect: covered,
        first: [c0 as i32, r0 as i32],
        corner: pos2(corner[0] as f32, corner[1] as f32),
        cell_points: (grid.cell * vp.scale) as f32,
    })
}

impl GridOverlay {
    /// Adds the paint callback to `painter` (clipped to the canvas and the slide of `dims`).
    pub fn paint(&self, painter: &egui::Painter, canvas: ERect, vp: &Viewport, dims: (u64, u64)) {
        let Some(place) = placement(&self.grid, dims, canvas, vp) else {
            return;
        };
        if self.style.opacity <= 0.0 {
            return;
        }
        painter.add(egui_wgpu::Callback::new_paint_callback(
            place.rect,
            OverlayCallback {
                layer: self.layer,
                data: self.data.clone(),
                place,
                style: self.style,
            },
        ));
    }
}

struct OverlayCallback {
    layer: Layer,
    data: Arc<Mutex<OverlayData>>,
    place: OverlayPlacement,
    style: OverlayStyle,
}

/// The GPU side, kept in egui-wgpu's callback resources.
pub struct OverlayGpu {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    srgb_target: bool,
    /// STORAGE or UNIFORM: how the parameters reach the shader (see [`shader_source`]).
    params_usage: wgpu::BufferUsages,
    max_side: u32,
    layers: [Option<GpuValues>; LAYERS],
}

struct GpuValues {
    /// The layer's `Params` buffer (each layer has its own: all callbacks prepare before any paints).
    params: wgpu::Buffer,
    /// What `params` holds, so that it is written only when the view or the style changed.
    params_written: Option<[u8; PARAMS_SIZE as usize]>,
    texture: wgpu::Texture,
    bind_group: wgpu::BindGroup,
    cols: u32,
    rows: u32,
    /// The data version the texture holds.
    version: u64,
}

/// Creates the overlay pipeline once for the window's render state (eframe's default: no MSAA, no
/// depth buffer).
pub fn install(render_state: &egui_wgpu::RenderState) {
    let device = &render_state.device;
    let format = render_state.target_format;
    let storage = device.limits().max_storage_buffers_per_shader_stage > 0;
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("histolens-overlay"),
        source: wgpu::ShaderSource::Wgsl(shader_source(storage).into()),
    });
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("histolens-overlay-layout"),
        entries: &[
            wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Buffer {
                    ty: if storage {
                        wgpu::BufferBindingType::Storage { read_only: true }
                    } else {
                        wgpu::BufferBindingType::Uniform
                    },
                    has_dynamic_offset: false,
                    min_binding_size: wgpu::BufferSize::new(PARAMS_SIZE),
                },
                count: None,
            },
            wgpu::BindGroupLayoutEntry {
                binding: 1,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Texture {
                    sample_type: wgpu::TextureSampleType::Float { filterable: false },
                    view_dimension: wgpu::TextureViewDimension::D2,
                    multisampled: false,
                },
                count: None,
            },
        ],
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("histolens-overlay-pipeline-layout"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some("histolens-overlay-pipeline"),
        layout: Some(&pipeline_layout),
        vertex: wgpu::VertexState {
            module: &module,
            entry_point: Some("vs_main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            buffers: &[],
        },
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        fragment: Some(wgpu::FragmentState {
            module: &module,
            entry_point: Some("fs_main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            targets: &[Some(wgpu::ColorTargetState {
                format,
                // Premultiplied alpha, as egui blends.
                blend: Some(wgpu::BlendState {
                    color: wgpu::BlendComponent {
                        src_factor: wgpu::BlendFactor::One,
                        dst_factor: wgpu::BlendFactor::OneMinusSrcAlpha,
                        operation: wgpu::BlendOperation::Add,
                    },
                    alpha: wgpu::BlendComponent {
                        src_factor: wgpu::BlendFactor::OneMinusDstAlpha,
                        dst_factor: wgpu::BlendFactor::One,
                        operation: wgpu::BlendOperation::Add,
                    },
                }),
                write_mask: wgpu::ColorWrites::ALL,
            })],
        }),
        multiview_mask: None,
        cache: None,
    });
    let gpu = OverlayGpu {
        pipeline,
        layout,
        srgb_target: format.is_srgb(),
        params_usage: if storage {
            wgpu::BufferUsages::STORAGE
        } else {
            wgpu::BufferUsages::UNIFORM
        },
        max_side: device.limits().max_texture_dimension_2d,
        layers: [None, None],
    };
    render_state.renderer.write().callback_resources.insert(gpu);
}

/// The `Params` uniform's bytes (see the shader).
fn params_bytes(
    place: &OverlayPlacement,
    size: [u32; 2],
    style: &OverlayStyle,
    ppp: f32,
    srgb: bool,
) -> [u8; PARAMS_SIZE as usize] {
    let mut out = [0u8; PARAMS_SIZE as usize];
    let words: [[u8; 4]; 12] = [
        (place.corner.x * ppp).to_le_bytes(),
        (place.corner.y * ppp).to_le_bytes(),
        (place.cell_points * ppp).to_le_bytes(),
        (place.cell_points * ppp).to_le_bytes(),
        place.first[0].to_le_bytes(),
        place.first[1].to_le_bytes(),
        (size[0] as i32).to_le_bytes(),
        (size[1] as i32).to_le_bytes(),
        style.colormap.shader_index().to_le_bytes(),
        style.opacity.clamp(0.0, 1.0).to_le_bytes(),
        style.threshold.to_le_bytes(),
        u32::from(srgb).to_le_bytes(),
    ];
    for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&w);
    }
    out
}

fn upload_rows(queue: &wgpu::Queue, gpu: &GpuValues, data: &OverlayData, rows: (u32, u32)) {
    let (r0, r1) = rows;
    let cols = data.cols as usize;
    let slice = &data.values[r0 as usize * cols..(r1 as usize + 1) * cols];
    let bytes: Vec<u8> = slice.iter().flat_map(|v| v.to_le_bytes()).collect();
    queue.write_texture(
        wgpu::TexelCopyTextureInfo {
            texture: &gpu.texture,
            mip_level: 0,
            origin: wgpu::Origin3d { x: 0, y: r0, z: 0 },
            aspect: wgpu::TextureAspect::All,
        },
        &bytes,
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(4 * data.cols),
            rows_per_image: Some(r1 - r0 + 1),
        },
        wgpu::Extent3d {
            width: data.cols,
            height: r1 - r0 + 1,
            depth_or_array_layers: 1,
        },
    );
}

impl egui_wgpu::CallbackTrait for OverlayCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(gpu) = resources.get_mut::<OverlayGpu>() else {
            return Vec::new();
        };
        let data = self.data.lock();
        let (cols, rows) = (data.cols, data.rows);
        let slot = &mut gpu.layers[self.layer.index()];
        if cols == 0 || rows == 0 || cols > gpu.max_side || rows > gpu.max_side {
            *slot = None;
            return Vec::new();
        }
        let fresh = !slot
            .as_ref()
            .is_some_and(|t| t.cols == cols && t.rows == rows);
        if fresh {
            let params = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("histolens-overlay-params"),
                size: PARAMS_SIZE,
                usage: gpu.params_usage | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let texture = device.create_texture(&wgpu::TextureDescriptor {
                label: Some("histolens-overlay-values"),
                size: wgpu::Extent3d {
                    width: cols,
                    height: rows,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::R32Float,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            });
            let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("histolens-overlay-bind-group"),
                layout: &gpu.layout,
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: params.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: wgpu::BindingResource::TextureView(&view),
                    },
                ],
            });
            let values = GpuValues {
                params,
                params_written: None,
                texture,
                bind_group,
                cols,
                rows,
                version: 0,
            };
            upload_rows(queue, &values, &data, (0, rows - 1));
            *slot = Some(GpuValues {
                version: data.version(),
                ..values
            });
        } else if let Some(values) = slot.as_mut()
            && values.version != data.version()
        {
            if let Some(span) = data.dirty_rows(values.version) {
                upload_rows(queue, values, &data, span);
            }
            values.version = data.version();
        }
        drop(data);
        let bytes = params_bytes(
            &self.place,
            [cols, rows],
            &self.style,
            screen.pixels_per_point,
            gpu.srgb_target,
        );
        if let Some(values) = &mut gpu.layers[self.layer.index()]
            && values.params_written != Some(bytes)
        {
            queue.write_buffer(&values.params, 0, &bytes);
            values.params_written = Some(bytes);
        }
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        let Some(gpu) = resources.get::<OverlayGpu>() else {
            return;
        };
        let Some(values) = &gpu.layers[self.layer.index()] else {
            return;
        };
        render_pass.set_pipeline(&gpu.pipeline);
        render_pass.set_bind_group(0, &values.bind_group, &[]);
        render_pass.draw(0..3, 0..1);
    }
}

/// `colormap` from 0 (left) to 1 (right) across `bar`.
pub fn paint_colour_bar(painter: &egui::Painter, bar: ERect, colormap: Colormap) {
    let steps = 64;
    for i in 0..steps {
        let t = (i as f32 + 0.5) / steps as f32;
        let [r, g, b] = colormap.rgb8(t);
        let x0 = bar.min.x + bar.width() * i as f32 / steps as f32;
        let x1 = bar.min.x + bar.width() * (i + 1) as f32 / steps as f32;
        painter.rect_filled(
            ERect::from_min_max(pos2(x0, bar.min.y), pos2(x1 + 0.5, bar.max.y)),
            0.0,
            egui::Color32::from_rgb(r, g, b),
        );
    }
}

/// A legend in the canvas's top-right corner: `title` over the colour bar of `colormap` from 0 to 1.
/// Legends of several overlays stack downwards by `slot`.
pub fn legend(ui: &egui::Ui, canvas: ERect, title: &str, colormap: Colormap, slot: usize) -> ERect {
    use egui::{Color32, vec2};
    let size = vec2(190.0, 44.0);
    let rect = ERect::from_min_size(
        pos2(
            canvas.max.x - size.x - 12.0,
            canvas.min.y + 12.0 + slot as f32 * (size.y + 6.0),
        ),
        size,
    );
    let painter = ui.painter_at(canvas);
    painter.rect_filled(rect, 4.0, Color32::from_black_alpha(170));
    let bar = ERect::from_min_size(rect.min + vec2(8.0, 22.0), vec2(size.x - 16.0, 10.0));
    paint_colour_bar(&painter, bar, colormap);
    painter.text(
        rect.min + vec2(8.0, 5.0),
        egui::Align2::LEFT_TOP,
        title,
        egui::FontId::proportional(12.0),
        Color32::WHITE,
    );
    for (x, align, label) in [
        (bar.min.x, egui::Align2::LEFT_TOP, "0"),
        (bar.max.x, egui::Align2::RIGHT_TOP, "1"),
    ] {
        painter.text(
            pos2(x, bar.max.y + 1.0),
            align,
            label,
            egui::FontId::proportional(9.0),
            Color32::WHITE,
        );
    }
    rect
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shader compiles in both forms (naga's WGSL front end and validator, as wgpu runs them).
    #[test]
    fn shader_is_valid_wgsl() {
        use wgpu::naga;
        for storage in [true, false] {
            let module = naga::front::wgsl::parse_str(&shader_source(storage))
                .expect("the overlay shader parses");
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::empty(),
            )
            .validate(&module)
            .expect("the overlay shader validates");
        }
    }

    /// The coefficient table named `name` in the WGSL source.
    fn wgsl_table(name: &str) -> Vec<[f32; 3]> {
        let start = SHADER_TEMPLATE
            .find(&format!("const {name} = array<vec3<f32>, 7>("))
            .expect("table present");
        let body = &SHADER_TEMPLATE[start..];
        let body = &body[body.find('(').unwrap() + 1..body.find(");").unwrap()];
        body.split("vec3<f32>(")
            .skip(1)
            .map(|v| {
                let nums: Vec<f32> = v
                    .split(')')
                    .next()
                    .unwrap()
                    .split(',')
                    .map(|s| s.trim().parse().unwrap())
                    .collect();
                [nums[0], nums[1], nums[2]]
            })
            .collect()
    }

    /// The shader's polynomials are the CPU colormaps': evaluated the shader's way, they agree.
    #[test]
    fn shader_colormaps_match_the_cpu_ones() {
        for (name, map) in [("VIRIDIS", Colormap::Viridis), ("MAGMA", Colormap::Magma)] {
            let table = wgsl_table(name);
            assert_eq!(table.len(), 7);
            for i in 0..=100 {
                let t = i as f32 / 100.0;
                let gpu: [f32; 3] = std::array::from_fn(|ch| {
                    table
                        .iter()
                        .rev()
                        .fold(0.0f32, |acc, k| acc * t + k[ch])
                        .clamp(0.0, 1.0)
                });
                let cpu = map.rgb(t);
                for ch in 0..3 {
                    assert!(
                        (gpu[ch] - cpu[ch]).abs() < 1e-6,
                        "{name} at {t}: {gpu:?} vs {cpu:?}"
                    );
                }
            }
        }
        // The diverging map's anchors.
        for anchor in [
            "0.230, 0.299, 0.754",
            "0.865, 0.865, 0.865",
            "0.706, 0.016, 0.150",
        ] {
            assert!(SHADER_TEMPLATE.contains(anchor), "{anchor}");
        }
        assert_eq!(Colormap::Magma.shader_index(), 1);
        assert_eq!(Colormap::Diverging.shader_index(), 2);
    }

    #[test]
    fn only_changed_rows_are_dirty() {
        let mut d = OverlayData::default();
        d.reset(3, 4, vec![0.5; 12]);
        let v0 = d.version();
        assert_eq!(d.dirty_rows(0), Some((0, 3)));
        assert_eq!(d.dirty_rows(v0), None);
        d.update([(4, 0.9), (7, f32::NAN)]);
        assert_eq!(d.dirty_rows(v0), Some((1, 2)));
        assert_eq!(d.values[7], NO_DATA);
        assert_eq!(d.values[4], 0.9);
    }

    #[test]
    fn placement_follows_the_viewport() {
        let grid = CellGrid::from(HeatmapGrid::new((1000, 500), 100.0));
        let canvas = ERect::from_min_size(pos2(10.0, 20.0), egui::vec2(400.0, 300.0));
        let vp = Viewport {
            center: [500.0, 250.0],
            scale: 0.4,
            size: [400.0, 300.0],
        };
        let p = placement(&grid, (1000, 500), canvas, &vp).unwrap();
        assert_eq!(p.first, [0, 0]);
        assert!((p.corner.x - 10.0).abs() < 1e-4 && (p.corner.y - 70.0).abs() < 1e-4);
        assert!((p.cell_points - 40.0).abs() < 1e-4);
        assert_eq!(p.rect.min, pos2(10.0, 70.0));
        // Zoomed in on cell (7, 3): its corner is placed in f64 and stays exact.
        let vp = Viewport {
            center: [750.0, 350.0],
            scale: 8.0,
            size: [400.0, 300.0],
        };
        let p = placement(&grid, (1000, 500), canvas, &vp).unwrap();
        assert_eq!(p.first, [7, 3]);
        assert!((p.corner.x - (10.0 + 200.0 - 400.0)).abs() < 1e-3);
        assert_eq!(p.rect, canvas);
        // Panned away: nothing to draw.
        let vp = Viewport {
            center: [5000.0, 250.0],
            ..vp
        };
        assert!(placement(&grid, (1000, 500), canvas, &vp).is_none());
        // A grid overhanging its slide is cut at the slide's edge.
        let grid = CellGrid::from(HeatmapGrid::new((950, 480), 100.0));
        let vp = Viewport {
            center: [500.0, 250.0],
            scale: 0.4,
            size: [400.0, 300.0],
        };
        let p = placement(&grid, (950, 480), canvas, &vp).unwrap();
        assert!((p.rect.max.x - (10.0 + 380.0)).abs() < 1e-3, "{:?}", p.rect);
        assert!((p.rect.max.y - (70.0 + 192.0)).abs() < 1e-3, "{:?}", p.rect);
    }

    /// A grid anchored away from the slide's origin (a Grad-CAM field) lands where its origin is, and
    /// its first visible cell counts from that origin.
    #[test]
    fn placement_of_a_grid_with_an_origin() {
        let grid = CellGrid {
            origin: [300.0, 200.0],
            cell: 2.0,
            cols: 64,
            rows: 64,
        };
        let canvas = ERect::from_min_size(pos2(0.0, 0.0), egui::vec2(400.0, 300.0));
        let vp = Viewport {
            center: [500.0, 250.0],
            scale: 0.4,
            size: [400.0, 300.0],
        };
        let p = placement(&grid, (1000, 500), canvas, &vp).unwrap();
        assert_eq!(p.first, [0, 0]);
        // Level-0 x 300 is 200 px left of the centre, 80 points at 0.4.
        assert!((p.corner.x - 120.0).abs() < 1e-3 && (p.corner.y - 130.0).abs() < 1e-3);
        assert!((p.rect.width() - 128.0 * 0.4).abs() < 1e-3, "{:?}", p.rect);
        // Zoomed in on level-0 (350, 260): the view starts at (330, 245), inside cell (15, 22).
        let vp = Viewport {
            center: [350.0, 260.0],
            scale: 10.0,
            size: [400.0, 300.0],
        };
        let p = placement(&grid, (1000, 500), canvas, &vp).unwrap();
        assert_eq!(p.first, [15, 22]);
        // Cell 15 starts at level-0 x 330, the view's left edge; cell 22's top, 244, is 1 px above it.
        assert!(
            p.corner.x.abs() < 1e-3 && (p.corner.y + 10.0).abs() < 1e-3,
            "{:?}",
            p.corner
        );
        assert_eq!(p.rect, canvas);
    }
}
