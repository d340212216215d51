//! The channel-blocked inference path (crate `histolens-kernels`) as candle operations.
//!
//! A blocked activation is a 5-d CPU tensor (N, ⌈C/L⌉, H, W, L), L = the kernels' vector width, with
//! zero padding channels; its true channel count is not in the shape, so the code that leaves the
//! layout passes it. Blocked tensors live only inside a backbone's forward pass in evaluation with
//! constant weights (see `Backbone::forward_low` and its siblings): what a backbone returns is NCHW.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};
use histolens_kernels::KernelError;
pub use histolens_kernels::{Act, ConvSpec, Input, Isa, PackedConv, Pad};

use super::cpu_conv::{Activation, f32_slice};

/// The instruction set of the blocked kernels on this CPU (`HISTOLENS_BLOCKED=off` disables them).
pub fn isa() -> Option<Isa> {
    Isa::detect()
}

/// Whether `x` may enter the blocked path: an f32 CPU tensor that tracks no gradient, on a CPU with
/// the kernels.
pub fn applies(x: &Tensor) -> bool {
    isa().is_some() && x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && !x.track_op()
}

/// Whether `x` is in the blocked layout.
pub fn is_blocked(x: &Tensor) -> bool {
    x.rank() == 5
}

/// Runs `f` on a thread of the current rayon pool (directly when already on one): a pass over many
/// small parallel kernels then has its sequential glue on a worker too, instead of a caller thread
/// that would wait, be woken and compete with the workers for the cores at every kernel.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Height and width of an NCHW or blocked activation.
pub fn spatial(x: &Tensor) -> Result<(usize, usize)> {
    match x.dims() {
        [_, _, h, w] | [_, _, h, w, _] => Ok((*h, *w)),
        d => bail!("expected an (N, C, H, W) activation, got shape {d:?}"),
    }
}

impl From<Activation> for Act {
    fn from(a: Activation) -> Act {
        match a {
            Activation::Identity => Act::Identity,
            Activation::Relu => Act::Relu,
            Activation::Relu6 => Act::Relu6,
        }
    }
}

enum Op {
    ToBlocked(Isa),
    ToNchw(Isa, usize),
    AvgPool(Isa, usize),
    MaxPool {
        isa: Isa,
        kernel: usize,
        stride: usize,
        pad: usize,
    },
    Conv(Arc<PackedConv>, Pad, Act),
}

pub(crate) fn kernel_err(e: histolens_kernels::KernelError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `len` floats filled by `write`, a kernel that writes every float of its argument when it
/// returns Ok (no zero-fill first).
pub(crate) fn kernel_output(
    len: usize,
    write: impl FnOnce(&mut [MaybeUninit<f32>]) -> std::result::Result<(), KernelError>,
) -> Result<Vec<f32>> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    write(&mut out.spare_capacity_mut()[..len]).map_err(kernel_err)?;
    // SAFETY: the kernel returned Ok, so it wrote all `len` floats.
    unsafe { out.set_len(len) };
    Ok(out)
}

/// A new storage of `shape` filled by `write`, as [`kernel_output`].
fn written_by(
    shape: Shape,
    write: impl FnOnce(&mut [MaybeUninit<f32>]) -> std::result::Result<(), KernelError>,
) -> Result<(CpuStorage, Shape)> {
    let out = kernel_output(shape.elem_count(), write)?;
    Ok((CpuStorage::F32(out), shape))
}

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        match self {
            Op::ToBlocked(_) => "histolens-to-blocked",
            Op::ToNchw(..) => "histolens-to-nchw",
            Op::AvgPool(..) => "histolens-blocked-avg-pool",
            Op::MaxPool { .. } => "histolens-blocked-max-pool",
            Op::Conv(..) => "histolens-blocked-conv",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "blocked input")?;
        let dims = l.dims();
        let blocked_dims = |isa: Isa| -> Result<(usize, usize, usize, usize)> {
            match *dims {
                [n, cb, h, w, lanes] if lanes == isa.lanes() => Ok((n, cb, h, w)),
                _ => bail!(
                    "expected a blocked activation of {} lanes, got {dims:?}",
                    isa.lanes()
                ),
            }
        };
        let (out, shape): (Vec<f32>, Shape) = match self {
            Op::ToBlocked(isa) => {
                let (n, c, h, w) = l.shape().dims4()?;
                let cb = c.div_ceil(isa.lanes());
                let out = kernel_output(n * cb * h * w * isa.lanes(), |out| {
                    histolens_kernels::to_blocked(*isa, x, (n, c, h, w), out)
                })?;
                (out, (n, cb, h, w, isa.lanes()).into())
            }
            Op::ToNchw(isa, c) => {
                let (n, _, h, w) = blocked_dims(*isa)?;
                let out = kernel_output(n * c * h * w, |out| {
                    histolens_kernels::to_nchw(*isa, x, (n, *c, h, w), out)
                })?;
                (out, (n, *c, h, w).into())
            }
            Op::AvgPool(isa, c) => {
                let (n, _, h, w) = blocked_dims(*isa)?;
                let mut out = vec![0f32; n * c];
                histolens_kernels::global_avg_pool(*isa, x, (n, *c, h, w), &mut out)
                    .map_err(kernel_err)?;
                (out, (n, *c).into())
            }
            Op::MaxPool {
                isa,
                kernel,
                stride,
                pad,
            } => {
                let (n, cb, h, w) = blocked_dims(*isa)?;
                let len = |side: usize| (side + 2 * pad).saturating_sub(*kernel) / stride + 1;
                let mut out = vec![0f32; n * cb * len(h) * len(w) * isa.lanes()];
                let c = cb * isa.lanes();
                let (ho, wo) = histolens_kernels::max_pool(
                    *isa,
                    x,
                    (n, c, h, w),
                    *kernel,
                    *stride,
                    *pad,
                    &mut out,
                )
                .map_err(kernel_err)?;
                (out, (n, cb, ho, wo, isa.lanes()).into())
            }
            Op::Conv(p, pad, act) => {
                let isa = p.isa();
                let (n, h, w) = match (p.input(), dims) {
                    (Input::Nchw, &[n, _, h, w]) => (n, h, w),
                    (Input::Blocked, &[n, _, h, w, lanes]) if lanes == isa.lanes() => (n, h, w),
                    _ => bail!(
                        "blocked convolution: input of shape {dims:?} for {:?} input",
                        p.input()
                    ),
                };
                let (ho, wo) = p.output_size(h, w, *pad).map_err(kernel_err)?;
                let cbo = p.spec().cout.div_ceil(isa.lanes());
                let shape: Shape = (n, cbo, ho, wo, isa.lanes()).into();
                return written_by(shape, |o| p.run(x, (n, h, w), *pad, *act, None, o));
            }
        };
        Ok((CpuStorage::F32(out), shape))
    }
}

fn apply(x: &Tensor, op: impl CustomOp1) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// NCHW → blocked (a blocked `x` is returned as it is).
pub fn to_blocked(x: &Tensor) -> Result<Tensor> {
    match isa() {
        Some(isa) if !is_blocked(x) => apply(x, Op::ToBlocked(isa)),
        _ => Ok(x.clone()),
    }
}

/// Blocked → NCHW with `channels` channels (an NCHW `x` is returned as it is).
pub fn to_nchw(x: &Tensor, channels: usize) -> Result<Tensor> {
    match isa() {
        Some(isa) if is_blocked(x) => apply(x, Op::ToNchw(isa, channels)),
        _ => Ok(x.clone()),
    }
}

/// Mean over the pixels of a blocked activation: (N, `channels`).
pub fn global_avg_pool(x: &Tensor, channels: usize) -> Result<Tensor> {
    let Some(isa) = isa() else {
        bail!("blocked average pool without the blocked kernels")
    };
    apply(x, Op::AvgPool(isa, channels))
}

/// Max pooling of a blocked activation (symmetric padding that never wins).
pub fn max_pool(x: &Tensor, kernel: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let Some(isa) = isa() else {
        bail!("blocked max pool without the blocked kernels")
    };
    apply(
        x,
        Op::MaxPool {
            isa,
            kernel,
            stride,
            pad,
        },
    )
}

/// `act(conv(x) + bias)` with packed weights and zero padding `pad`; `x` in the layout the
/// convolution was packed for, the output blocked.
pub fn conv(x: &Tensor, packed: &Arc<PackedConv>, pad: Pad, act: Activation) -> Result<Tensor> {
    apply(x, Op::Conv(packed.clone(), pad, act.into()))
}

/// `act(conv(x) + bias + residual)`: a convolution that ends a residual block, with the addition
/// fused into its last pass over the output (no separate sweep over the sum).
struct ConvAdd(Arc<PackedConv>, Pad, Act);

impl CustomOp2 for ConvAdd {
    fn name(&self) -> &'static str {
        "histolens-blocked-conv-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ConvAdd(p, pad, act) = self;
        let x = f32_slice(xs, xl, "blocked input")?;
        let r = f32_slice(rs, rl, "residual")?;
        let isa = p.isa();
        let (n, h, w) = match xl.dims() {
            &[n, _, h, w, lanes] if lanes == isa.lanes() && p.input() == Input::Blocked => {
                (n, h, w)
            }
            d => bail!(
                "blocked convolution: input of shape {d:?} for {:?} input",
                p.input()
            ),
        };
        let (ho, wo) = p.output_size(h, w, *pad).map_err(kernel_err)?;
        let shape: Shape = (n, p.spec().cout.div_ceil(isa.lanes()), ho, wo, isa.lanes()).into();
        if rl.shape() != &shape {
            bail!(
                "blocked residual of shape {:?} for an output of {:?}",
                rl.dims(),
                shape.dims()
            )
        }
        written_by(shape, |o| p.run(x, (n, h, w), *pad, *act, Some(r), o))
    }
}

/// `act(conv(x) + bias + residual)` with packed weights, all blocked.
pub fn conv_add(
    x: &Tensor,
    residual: &Tensor,
    packed: &Arc<PackedConv>,
    pad: Pad,
    act: Activation,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &residual.contiguous()?,
        &ConvAdd(packed.clone(), pad, act.into()),
    )
}

/// A whole inverted-residual block in one kernel call (see `histolens_kernels::inverted_residual`);
/// its input is also its residual.
struct InvertedResidual {
    expand: Option<(Arc<PackedConv>, Act)>,
    depthwise: (Arc<PackedConv>, Pad, Act),
    project: (Arc<PackedConv>, Act),
    residual: bool,
}

impl CustomOp1 for InvertedResidual {
    fn name(&self) -> &'static str {
        "histolens-blocked-inverted-residual"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "blocked input")?;
        let (d, pad, act_dw) = &self.depthwise;
        let (p, act_project) = &self.project;
        let isa = d.isa();
        let (n, h, w) = match l.dims() {
            &[n, _, h, w, lanes] if lanes == isa.lanes() => (n, h, w),
            dims => bail!("inverted-residual block: input of shape {dims:?}"),
        };
        let (ho, wo) = d.output_size(h, w, *pad).map_err(kernel_err)?;
        let shape: Shape = (n, p.spec().cout.div_ceil(isa.lanes()), ho, wo, isa.lanes()).into();
        let act_expand = self.expand.as_ref().map_or(Act::Identity, |e| e.1);
        written_by(shape, |o| {
            histolens_kernels::inverted_residual(
                self.expand.as_ref().map(|e| &*e.0),
                d,
                p,
                x,
                (n, h, w),
                *pad,
                [act_expand, *act_dw, *act_project],
                self.residual,
                o,
            )
        })
    }
}

/// `act_p(project(act_dw(depthwise(act_e(expand(x))))))`, plus `x` where `residual`: a whole
/// inverted-residual block, all blocked, its expanded activation never written whole.
pub fn inverted_residual(
    x: &Tensor,
    expand: Option<(&Arc<PackedConv>, Act)>,
    (depthwise, pad, act_dw): (&Arc<PackedConv>, Pad, Act),
    (project, act_project): (&Arc<PackedConv>, Act),
    residual: bool,
) -> Result<Tensor> {
    apply(
        x,
        InvertedResidual {
            expand: expand.map(|(e, a)| (e.clone(), a)),
            depthwise: (depthwise.clone(), pad, act_dw),
            project: (project.clone(), act_project),
            residual,
        },
    )
}
