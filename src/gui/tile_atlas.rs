//! Slide tiles on the GPU: one atlas texture of tile-sized slots, filled from the streamer's cache under
//! a per-frame upload budget, and drawn by one instanced draw call of an egui-wgpu paint callback
//! through `shaders/tiles.wgsl`.
//!
//! egui's own image path (sRGB textures, filtered, tinted, blended, one mesh per texture) cost about
//! 15 ms a frame for a full-window slide on a software renderer (Mesa's lavapipe, the usual case on a
//! machine without a GPU); here a fragment is one texel read and one write. Tiles are composited on
//! white when uploaded (OpenSlide leaves unscanned areas transparent), so nothing is blended.
//!
//! The slide's overview (an antialiased thumbnail) has a texture of its own in the same pipeline: it
//! stands in for tiles not loaded yet, and replaces them wherever it has as many pixels as the
//! screen shows (a slide without coarse levels, zoomed out, would otherwise be drawn from hundreds of
//! minified level-0 tiles).
//!
//! The UI thread owns the slots ([`TileAtlas`]): which tile each holds and when it was last drawn. It
//! queues uploads in [`AtlasShared`], which the callback's `prepare` writes into the texture before
//! the frame's render pass; a slot drawn in the current frame is never given to another tile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::Rect as ERect;
use egui_wgpu::wgpu;
use image::RgbaImage;
use parking_lot::Mutex;

use crate::tiles::{Tile, TileKey, TileStreamer};

/// Side of the atlas texture in pixels: 64 MiB, 256 slots of 256 px tiles.
pub const ATLAS_SIDE: u32 = 4096;
/// Time one frame may spend preparing tile uploads.
const UPLOAD_BUDGET: Duration = Duration::from_millis(6);
/// Bytes of one quad: destination, texture coordinates and sampling bounds, four f32 each.
const QUAD_BYTES: u64 = 48;
const SHADER: &str = include_str!("../../shaders/tiles.wgsl");

/// A tile's place in the atlas.
#[derive(Debug, Clone, Copy)]
struct Slot {
    index: u32,
    /// The tile's size in pixels (edge tiles are smaller than the slot).
    width: u32,
    height: u32,
    /// The frame in which it was last drawn or uploaded.
    used: u64,
}

/// What the UI thread hands to the GPU side.
#[derive(Default)]
pub struct AtlasShared {
    /// Tiles to write, each at its slot's corner (pixels), before the next render pass.
    uploads: Vec<([u32; 2], RgbaImage)>,
    /// A new slide's overview.
    overview: Option<RgbaImage>,
}

/// The UI side of the atlas: which tile each slot holds.
pub struct TileAtlas {
    shared: Arc<Mutex<AtlasShared>>,
    /// The overview's size in pixels.
    overview: (u32, u32),
    slot_side: u32,
    per_row: u32,
    slots: HashMap<TileKey, Slot>,
    free: Vec<u32>,
    frame: u64,
    /// Tiles that were ready but did not fit in this frame's budget (or found no free slot).
    backlog: usize,
}

/// What a quad shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuadSource {
    Tile(TileKey),
    Overview,
}

/// One tile or overview (or part of one) to draw: where on the canvas (points) and which part of
/// it (0-1).
#[derive(Debug, Clone, Copy)]
pub struct TileQuad {
    pub source: QuadSource,
    pub screen: ERect,
    pub uv: ERect,
}

impl TileAtlas {
    /// An atlas for tiles of `tile_size` pixels, and the slide's `overview`.
    pub fn new(tile_size: u32, overview: &RgbaImage) -> Self {
        let slot_side = tile_size.clamp(1, ATLAS_SIDE);
        let per_row = ATLAS_SIDE / slot_side;
        let count = per_row * per_row;
        let (ow, oh) = overview.dimensions();
        TileAtlas {
            shared: Arc::new(Mutex::new(AtlasShared {
                uploads: Vec::new(),
                overview: Some(opaque(overview, ow, oh)),
            })),
            overview: (ow, oh),
            slot_side,
            per_row,
            slots: HashMap::new(),
            free: (0..count).rev().collect(),
            frame: 0,
            backlog: 0,
        }
    }

    pub fn contains(&self, key: TileKey) -> bool {
        self.slots.contains_key(&key)
    }

    pub fn backlog(&self) -> usize {
        self.backlog
    }

    /// Tiles held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes of the tiles held (the atlas itself is [`ATLAS_SIDE`]² x 4 bytes).
    pub fn used_bytes(&self) -> usize {
        self.slots
            .values()
            .map(|s| (s.width * s.height * 4) as usize)
            .sum()
    }

    /// Starts a frame: slots drawn in earlier frames may be reused from now on.
    pub fn begin_frame(&mut self) {
        self.frame += 1;
    }

    /// Queues uploads of cached tiles among `keys` (in priority order) that are not in the atlas yet,
    /// until the frame's time budget is spent (at least one per frame, so progress never stops).
    pub fn upload(&mut self, ctx: &egui::Context, streamer: &TileStreamer, keys: &[TileKey]) {
        let start = Instant::now();
        self.backlog = 0;
        let mut uploaded = 0usize;
        for &key in keys {
            if let Some(s) = self.slots.get_mut(&key) {
                s.used = self.frame;
                continue;
            }
            let Some(tile) = streamer.get(key) else {
                continue;
            };
            if uploaded > 0 && start.elapsed() > UPLOAD_BUDGET {
                self.backlog += 1;
                continue;
            }
            let (width, height) = self.fit(&tile);
            let Some(corner) = self.place(key, width, height) else {
                self.backlog += 1;
                continue;
            };
            self.shared
                .lock()
                .uploads
                .push((corner, opaque(&tile.image, width, height)));
            uploaded += 1;
        }
        if self.backlog > 0 {
            ctx.request_repaint();
        }
    }

    /// The tile's size, cut to the slot.
    fn fit(&self, tile: &Tile) -> (u32, u32) {
        let (w, h) = tile.image.dimensions();
        (w.min(self.slot_side), h.min(self.slot_side))
    }

    /// Gives `key` a slot (a free one, else the least recently drawn one not drawn in this frame) and
    /// returns the slot's top-left pixel; None when every slot is drawn in this frame.
    fn place(&mut self, key: TileKey, width: u32, height: u32) -> Option<[u32; 2]> {
        let index = self.take_slot()?;
        self.slots.insert(
            key,
            Slot {
                index,
                width,
                height,
                used: self.frame,
            },
        );
        Some(self.corner(index))
    }

    /// The top-left pixel of slot `index`.
    fn corner(&self, index: u32) -> [u32; 2] {
        [
            index % self.per_row * self.slot_side,
            index / self.per_row * self.slot_side,
        ]
    }

    /// A free slot, or the least recently used one not drawn in this frame.
    fn take_slot(&mut self) -> Option<u32> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        let (&key, slot) = self
            .slots
            .iter()
            .filter(|(_, s)| s.used < self.frame)
            .min_by_key(|(_, s)| s.used)?;
        let index = slot.index;
        self.slots.remove(&key);
        Some(index)
    }

    /// Adds the paint callback that draws `quads` (tiles not in the atlas are skipped) on `canvas`.
    /// `exact` (one texel per physical pixel, aligned) samples tiles at the nearest texel.
    pub fn paint(
        &mut self,
        painter: &egui::Painter,
        canvas: ERect,
        quads: &[TileQuad],
        exact: bool,
    ) {
        let ndc = |p: egui::Pos2| {
            [
                (p.x - canvas.min.x) / canvas.width() * 2.0 - 1.0,
                1.0 - (p.y - canvas.min.y) / canvas.height() * 2.0,
            ]
        };
        // (destination, texture rectangle in pixels, texture size) → the shader's quad.
        let quad =
            |out: &mut Vec<u8>, q: &TileQuad, [x0, y0, w, h]: [f32; 4], [tw, th]: [f32; 2]| {
                let (a, b) = (ndc(q.screen.min), ndc(q.screen.max));
                let u = |t: f32| (x0 + t * w) / tw;
                let v = |t: f32| (y0 + t * h) / th;
                let values = [
                    a[0],
                    a[1],
                    b[0],
                    b[1],
                    u(q.uv.min.x),
                    v(q.uv.min.y),
                    u(q.uv.max.x),
                    v(q.uv.max.y),
                    (x0 + 0.5) / tw,
                    (y0 + 0.5) / th,
                    (x0 + w - 0.5) / tw,
                    (y0 + h - 0.5) / th,
                ];
                out.extend(values.iter().flat_map(|f| f.to_le_bytes()));
            };
        let (mut tiles, mut overview) = (Vec::new(), Vec::new());
        let side = ATLAS_SIDE as f32;
        for q in quads {
            match q.source {
                QuadSource::Tile(key) => {
                    let Some(s) = self.slots.get_mut(&key) else {
                        continue;
                    };
                    s.used = self.frame;
                    let (index, w, h) = (s.index, s.width as f32, s.height as f32);
                    let [x0, y0] = self.corner(index).map(|c| c as f32);
                    quad(&mut tiles, q, [x0, y0, w, h], [side, side]);
                }
                QuadSource::Overview => {
                    let (w, h) = (self.overview.0 as f32, self.overview.1 as f32);
                    quad(&mut overview, q, [0.0, 0.0, w, h], [w, h]);
                }
            }
        }
        {
            let shared = self.shared.lock();
            if tiles.is_empty()
                && overview.is_empty()
                && shared.uploads.is_empty()
                && shared.overview.is_none()
            {
                return;
            }
        }
        painter.add(egui_wgpu::Callback::new_paint_callback(
            canvas,
            TilesCallback {
                shared: self.shared.clone(),
                tiles,
                overview,
                exact,
            },
        ));
    }
}

/// `image` cut to `width` x `height` and composited on white: opaque, as the shader draws it.
fn opaque(image: &RgbaImage, width: u32, height: u32) -> RgbaImage {
    RgbaImage::from_fn(width, height, |x, y| {
        let [r, g, b, a] = image.get_pixel(x, y).0;
        let over = |c: u8| {
            let (c, a) = (u32::from(c), u32::from(a));
            ((c * a + 255 * (255 - a) + 127) / 255) as u8
        };
        image::Rgba([over(r), over(g), over(b), 255])
    })
}

struct TilesCallback {
    shared: Arc<Mutex<AtlasShared>>,
    /// The quads' vertex data ([`QUAD_BYTES`] each), of tiles and of the overview.
    tiles: Vec<u8>,
    overview: Vec<u8>,
    exact: bool,
}

/// The GPU side, kept in egui-wgpu's callback resources.
pub struct AtlasGpu {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    linear_sampler: wgpu::Sampler,
    texture: wgpu::Texture,
    /// Bind groups sampling the atlas linearly and at the nearest texel.
    linear: wgpu::BindGroup,
    nearest: wgpu::BindGroup,
    /// The overview's texture and bind group.
    overview: Option<(wgpu::Texture, wgpu::BindGroup)>,
    quads: wgpu::Buffer,
    /// Quads of tiles, then of the overview, in `quads`.
    counts: [u32; 2],
    exact: bool,
}

/// Creates the atlas and its pipeline once for the window's render state (eframe's default: no
/// MSAA, no depth buffer). Without it (a device whose textures are smaller than the atlas), the
/// viewer shows the slide's overview.
pub fn install(render_state: &egui_wgpu::RenderState) {
    let device = &render_state.device;
    if device.limits().max_texture_dimension_2d < ATLAS_SIDE {
        log::warn!("the GPU's textures are too small for the tile atlas: showing the overview");
        return;
    }
    let format = render_state.target_format;
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("histolens-tiles"),
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some("histolens-tiles-layout"),
        entries: &[
            wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Texture {
                    sample_type: wgpu::TextureSampleType::Float { filterable: true },
                    view_dimension: wgpu::TextureViewDimension::D2,
                    multisampled: false,
                },
                count: None,
            },
            wgpu::BindGroupLayoutEntry {
                binding: 1,
                visibility: wgpu::ShaderStages::FRAGMENT,
                ty: wgpu::BindingType::Sampler(wgpu::SamplerBindingType::Filtering),
                count: None,
            },
        ],
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some("histolens-tiles-pipeline-layout"),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
        label: Some("histolens-tiles-pipeline"),
        layout: Some(&pipeline_layout),
        vertex: wgpu::VertexState {
            module: &module,
            entry_point: Some("vs_main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            buffers: &[Some(wgpu::VertexBufferLayout {
                array_stride: QUAD_BYTES,
                step_mode: wgpu::VertexStepMode::Instance,
                attributes: &wgpu::vertex_attr_array![
                    0 => Float32x4, 1 => Float32x4, 2 => Float32x4
                ],
            })],
        },
        primitive: wgpu::PrimitiveState::default(),
        depth_stencil: None,
        multisample: wgpu::MultisampleState::default(),
        fragment: Some(wgpu::FragmentState {
            module: &module,
            entry_point: Some(if format.is_srgb() {
                "fs_main_srgb"
            } else {
                "fs_main"
            }),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            targets: &[Some(wgpu::ColorTargetState {
                format,
                blend: None,
                write_mask: wgpu::ColorWrites::ALL,
            })],
        }),
        multiview_mask: None,
        cache: None,
    });
    let texture = device.create_texture(&wgpu::TextureDescriptor {
        label: Some("histolens-tile-atlas"),
        size: wgpu::Extent3d {
            width: ATLAS_SIDE,
            height: ATLAS_SIDE,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: wgpu::TextureFormat::Rgba8Unorm,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    let sampler = |filter: wgpu::FilterMode| {
        device.create_sampler(&wgpu::SamplerDescriptor {
            label: Some("histolens-tiles-sampler"),
            mag_filter: filter,
            min_filter: filter,
            ..Default::default()
        })
    };
    let linear_sampler = sampler(wgpu::FilterMode::Linear);
    let gpu = AtlasGpu {
        pipeline,
        linear: bind_group(device, &layout, &texture, &linear_sampler),
        nearest: bind_group(
            device,
            &layout,
            &texture,
            &sampler(wgpu::FilterMode::Nearest),
        ),
        layout,
        linear_sampler,
        texture,
        overview: None,
        quads: quad_buffer(device, 64),
        counts: [0, 0],
        exact: false,
    };
    render_state.renderer.write().callback_resources.insert(gpu);
}

fn bind_group(
    device: &wgpu::Device,
    layout: &wgpu::BindGroupLayout,
    texture: &wgpu::Texture,
    sampler: &wgpu::Sampler,
) -> wgpu::BindGroup {
    let view = texture.create_view(&wgpu::TextureViewDescriptor::default());
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("histolens-tiles-bind-group"),
        layout,
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::TextureView(&view),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: wgpu::BindingResource::Sampler(sampler),
            },
        ],
    })
}

/// Writes `image` at `corner` of `texture`.
fn write(queue: &wgpu::Queue, texture: &wgpu::Texture, [x, y]: [u32; 2], image: &RgbaImage) {
    let (w, h) = image.dimensions();
    queue.write_texture(
        wgpu::TexelCopyTextureInfo {
            texture,
            mip_level: 0,
            origin: wgpu::Origin3d { x, y, z: 0 },
            aspect: wgpu::TextureAspect::All,
        },
        image.as_raw(),
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(4 * w),
            rows_per_image: Some(h),
        },
        wgpu::Extent3d {
            width: w,
            height: h,
            depth_or_array_layers: 1,
        },
    );
}

fn quad_buffer(device: &wgpu::Device, quads: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("histolens-tile-quads"),
        size: quads * QUAD_BYTES,
        usage: wgpu::BufferUsages::VERTEX | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

impl egui_wgpu::CallbackTrait for TilesCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        _screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(gpu) = resources.get_mut::<AtlasGpu>() else {
            return Vec::new();
        };
        let (uploads, overview) = {
            let mut shared = self.shared.lock();
            (std::mem::take(&mut shared.uploads), shared.overview.take())
        };
        for (corner, image) in &uploads {
            write(queue, &gpu.texture, *corner, image);
        }
        if let Some(image) = overview {
            let (width, height) = image.dimensions();
            let texture = device.create_texture(&wgpu::TextureDescriptor {
                label: Some("histolens-overview"),
                size: wgpu::Extent3d {
                    width: width.max(1),
                    height: height.max(1),
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::Rgba8Unorm,
                usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            });
            if width > 0 && height > 0 {
                write(queue, &texture, [0, 0], &image);
            }
            let group = bind_group(device, &gpu.layout, &texture, &gpu.linear_sampler);
            gpu.overview = Some((texture, group));
        }
        let counts = [self.tiles.len(), self.overview.len()].map(|b| b as u64 / QUAD_BYTES);
        let total = counts[0] + counts[1];
        if total > gpu.quads.size() / QUAD_BYTES {
            gpu.quads = quad_buffer(device, total.next_power_of_two());
        }
        if !self.tiles.is_empty() {
            queue.write_buffer(&gpu.quads, 0, &self.tiles);
        }
        if !self.overview.is_empty() {
            queue.write_buffer(&gpu.quads, self.tiles.len() as u64, &self.overview);
        }
        gpu.counts = counts.map(|c| c as u32);
        gpu.exact = self.exact;
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        let Some(gpu) = resources.get::<AtlasGpu>() else {
            return;
        };
        let [tiles, overview] = gpu.counts;
        render_pass.set_pipeline(&gpu.pipeline);
        render_pass.set_vertex_buffer(0, gpu.quads.slice(..));
        if tiles > 0 {
            let group = if gpu.exact { &gpu.nearest } else { &gpu.linear };
            render_pass.set_bind_group(0, group, &[]);
            render_pass.draw(0..6, 0..tiles);
        }
        if let (true, Some((_, group))) = (overview > 0, &gpu.overview) {
            render_pass.set_bind_group(0, group, &[]);
            render_pass.draw(0..6, tiles..tiles + overview);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(col: u32) -> TileKey {
        TileKey {
            level: 0,
            col,
            row: 0,
        }
    }

    #[test]
    fn slots_are_reused_least_recently_drawn_first_never_within_a_frame() {
        // 2048 px tiles: four slots.
        let mut atlas = TileAtlas::new(ATLAS_SIDE / 2, &RgbaImage::new(4, 4));
        atlas.begin_frame();
        let corners: Vec<[u32; 2]> = (0..4)
            .map(|c| atlas.place(key(c), 2048, 2048).unwrap())
            .collect();
        assert_eq!(corners, [[0, 0], [2048, 0], [0, 2048], [2048, 2048]]);
        // Every slot was drawn in this frame: a fifth tile waits.
        assert!(atlas.place(key(4), 2048, 2048).is_none());
        atlas.begin_frame();
        // Tiles 0, 2 and 3 drawn again; 1 is the least recently drawn and gives its slot up.
        for c in [0, 2, 3] {
            atlas.slots.get_mut(&key(c)).unwrap().used = atlas.frame;
        }
        assert_eq!(atlas.place(key(4), 100, 50), Some(corners[1]));
        assert!(!atlas.contains(key(1)) && atlas.contains(key(4)));
        assert_eq!(atlas.len(), 4);
        assert_eq!(atlas.used_bytes(), 3 * 2048 * 2048 * 4 + 100 * 50 * 4);
    }

    #[test]
    fn tiles_are_made_opaque_on_white() {
        let mut img = RgbaImage::new(3, 2);
        img.put_pixel(0, 0, image::Rgba([10, 20, 30, 255]));
        img.put_pixel(1, 0, image::Rgba([0, 0, 0, 0]));
        img.put_pixel(2, 0, image::Rgba([0, 100, 200, 128]));
        let out = opaque(&img, 2, 1);
        assert_eq!(out.dimensions(), (2, 1), "cut to the slot");
        assert_eq!(out.get_pixel(0, 0).0, [10, 20, 30, 255]);
        assert_eq!(out.get_pixel(1, 0).0, [255, 255, 255, 255]);
        let half = opaque(&img, 3, 1);
        assert_eq!(half.get_pixel(2, 0).0, [127, 177, 227, 255]);
    }

    #[test]
    fn shader_is_valid_wgsl() {
        use egui_wgpu::wgpu::naga;
        let module = naga::front::wgsl::parse_str(SHADER).expect("tiles.wgsl parses");
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .expect("tiles.wgsl validates");
    }
}
