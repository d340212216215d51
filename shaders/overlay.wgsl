// Heatmap overlay: one value per grid cell (the selected class's probability, negative where no result
// is known) coloured by a colormap and blended over the slide. Drawn through an egui-wgpu paint callback
// whose viewport is the part of the canvas the grid covers; the fragment's framebuffer position picks
// the cell (nearest: cells are cells).
//
// The colormaps are the very polynomials of src/util/colormap.rs (same coefficients, same clamping), so
// that the window and the exported PNG agree; a unit test in src/gui/overlay.rs checks this.

struct Params {
    // Framebuffer position (physical pixels) of the top-left corner of cell `first`.
    corner: vec2<f32>,
    // Size of a cell in physical pixels.
    cell_px: vec2<f32>,
    // The cell at `corner` (column, row).
    first: vec2<i32>,
    // Columns and rows of the grid (the texture's size).
    size: vec2<i32>,
    // 0 viridis, 1 magma, 2 diverging (Colormap::shader_index).
    colormap: u32,
    opacity: f32,
    // Values below it are transparent.
    threshold: f32,
    // 1 when the target is an sRGB format (the blend then happens on linear values).
    srgb_target: u32,
};

// A read-only storage buffer where the device has them (see `PARAMS_BINDING` in src/gui/overlay.rs:
// lavapipe compiles a new shader variant for every new set of values of a uniform buffer that steers
// branches, and never frees them); a uniform buffer elsewhere (WebGL-class devices).
@group(0) @binding(0) var<PARAMS_SPACE> params: Params;
@group(0) @binding(1) var values: texture_2d<f32>;

// A triangle covering the whole viewport.
@vertex
fn vs_main(@builtin(vertex_index) i: u32) -> @builtin(position) vec4<f32> {
    let x = f32((i << 1u) & 2u);
    let y = f32(i & 2u);
    return vec4<f32>(x * 2.0 - 1.0, 1.0 - y * 2.0, 0.0, 1.0);
}

const VIRIDIS = array<vec3<f32>, 7>(
    vec3<f32>(0.27772733, 0.0054073445, 0.3340998),
    vec3<f32>(0.10509304, 1.4046135, 1.3845902),
    vec3<f32>(-0.33086183, 0.21484756, 0.09509516),
    vec3<f32>(-4.6342306, -5.799101, -19.332441),
    vec3<f32>(6.22827, 14.179933, 56.69055),
    vec3<f32>(4.776385, -13.745145, -65.35303),
    vec3<f32>(-5.435456, 4.6458526, 26.312435),
);

const MAGMA = array<vec3<f32>, 7>(
    vec3<f32>(-0.002136485, -0.00074965505, -0.005386128),
    vec3<f32>(0.25166054, 0.6775232, 2.4940266),
    vec3<f32>(8.353717, -3.5777194, 0.3144679),
    vec3<f32>(-27.668733, 14.264731, -13.649213),
    vec3<f32>(52.17614, -27.943606, 12.944169),
    vec3<f32>(-50.768524, 29.046583, 4.234153),
    vec3<f32>(18.655705, -11.489774, -5.6019615),
);

// Horner: c0 + t(c1 + t(c2 + …)), each channel clamped to [0, 1].
fn poly(coeffs: array<vec3<f32>, 7>, t: f32) -> vec3<f32> {
    var c = coeffs;
    var acc = vec3<f32>(0.0);
    for (var k = 6; k >= 0; k--) {
        acc = acc * t + c[k];
    }
    return clamp(acc, vec3<f32>(0.0), vec3<f32>(1.0));
}

// Blue (0) through white (0.5) to red (1).
fn diverging(t: f32) -> vec3<f32> {
    let blue = vec3<f32>(0.230, 0.299, 0.754);
    let white = vec3<f32>(0.865, 0.865, 0.865);
    let red = vec3<f32>(0.706, 0.016, 0.150);
    if t < 0.5 {
        return mix(blue, white, t * 2.0);
    }
    return mix(white, red, (t - 0.5) * 2.0);
}

// sRGB-encoded colour of `t` in [0, 1].
fn colormap(index: u32, t_in: f32) -> vec3<f32> {
    let t = clamp(t_in, 0.0, 1.0);
    var rgb: vec3<f32>;
    switch index {
        case 1u: {
            rgb = poly(MAGMA, t);
        }
        case 2u: {
            rgb = diverging(t);
        }
        default: {
            rgb = poly(VIRIDIS, t);
        }
    }
    return rgb;
}

fn srgb_to_linear(c: vec3<f32>) -> vec3<f32> {
    let lo = c / 12.92;
    let hi = pow((c + 0.055) / 1.055, vec3<f32>(2.4));
    return select(hi, lo, c <= vec3<f32>(0.04045));
}

@fragment
fn fs_main(@builtin(position) pos: vec4<f32>) -> @location(0) vec4<f32> {
    let rel = floor((pos.xy - params.corner) / params.cell_px);
    let cell = params.first + vec2<i32>(rel);
    if any(cell < vec2<i32>(0)) || any(cell >= params.size) {
        discard;
    }
    let v = textureLoad(values, cell, 0).r;
    // Negative: no result (not computed yet, or background); below the threshold: hidden.
    if v < 0.0 || v < params.threshold {
        discard;
    }
    var rgb = colormap(params.colormap, v);
    if params.srgb_target != 0u {
        rgb = srgb_to_linear(rgb);
    }
    // Premultiplied, like egui's own output.
    return vec4<f32>(rgb * params.opacity, params.opacity);
}
