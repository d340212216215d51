// Slide tiles: one instanced quad per tile, sampled from the tile atlas (src/gui/tile_atlas.rs).
// The atlas holds the tiles' sRGB bytes in a non-sRGB texture and tiles are opaque, so that a fragment
// is one texture read and one write: no decoding, no tint, no blending (software renderers pay for each).

struct Quad {
    // Corners on the callback's viewport, in normalised device coordinates.
    @location(0) dst: vec4<f32>,
    // The matching atlas coordinates (u0, v0, u1, v1).
    @location(1) uv: vec4<f32>,
    // Atlas coordinates the sampling stays inside: the tile's slot inset by half a texel, so that
    // filtering never reads a neighbouring slot.
    @location(2) bounds: vec4<f32>,
};

struct Varyings {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
    @location(1) @interpolate(flat) bounds: vec4<f32>,
};

@group(0) @binding(0) var atlas: texture_2d<f32>;
@group(0) @binding(1) var atlas_sampler: sampler;

@vertex
fn vs_main(@builtin(vertex_index) i: u32, quad: Quad) -> Varyings {
    // Two triangles: (0, 0) (1, 0) (0, 1) and (0, 1) (1, 0) (1, 1).
    var corners = array<vec2<f32>, 6>(
        vec2<f32>(0.0, 0.0), vec2<f32>(1.0, 0.0), vec2<f32>(0.0, 1.0),
        vec2<f32>(0.0, 1.0), vec2<f32>(1.0, 0.0), vec2<f32>(1.0, 1.0),
    );
    let c = corners[i];
    var out: Varyings;
    out.position = vec4<f32>(mix(quad.dst.xy, quad.dst.zw, c), 0.0, 1.0);
    out.uv = mix(quad.uv.xy, quad.uv.zw, c);
    out.bounds = quad.bounds;
    return out;
}

fn sample_tile(v: Varyings) -> vec3<f32> {
    let uv = clamp(v.uv, v.bounds.xy, v.bounds.zw);
    return textureSampleLevel(atlas, atlas_sampler, uv, 0.0).rgb;
}

// A framebuffer that stores what it is given (egui's usual target): the bytes as they are.
@fragment
fn fs_main(v: Varyings) -> @location(0) vec4<f32> {
    return vec4<f32>(sample_tile(v), 1.0);
}

// An sRGB framebuffer encodes on write: decode first.
@fragment
fn fs_main_srgb(v: Varyings) -> @location(0) vec4<f32> {
    let c = sample_tile(v);
    let lo = c / 12.92;
    let hi = pow((c + 0.055) / 1.055, vec3<f32>(2.4));
    return vec4<f32>(select(hi, lo, c <= vec3<f32>(0.04045)), 1.0);
}
