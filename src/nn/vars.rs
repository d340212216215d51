//! Helpers over a model's variables: finiteness checks, detached copies, trainable subsets.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

fn locked(vars: &VarMap) -> Result<std::sync::MutexGuard<'_, HashMap<String, Var>>> {
    vars.data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("variable map poisoned".into()))
}

/// Whether every variable holds only finite values.
pub fn all_finite(vars: &VarMap) -> Result<bool> {
    for v in locked(vars)?.values() {
        let s = v
            .as_tensor()
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if !s.is_finite() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Detached copies of the variables under `prefix`, as a VarBuilder rooted at that prefix: a model built
/// on it tracks no gradient and runs the fast CPU path (a frozen backbone).
pub fn detached(vars: &VarMap, prefix: &str, device: &Device) -> Result<VarBuilder<'static>> {
    let map: HashMap<String, Tensor> = locked(vars)?
        .iter()
        .filter_map(|(n, v)| {
            n.strip_prefix(prefix)
                .map(|rest| (rest.to_string(), v.as_tensor().detach()))
        })
        .collect();
    Ok(VarBuilder::from_tensors(map, DType::F32, device))
}

/// The variables whose names pass `keep`, in name order (so optimiser state lines up across runs).
pub fn selected(vars: &VarMap, keep: impl Fn(&str) -> bool) -> Result<Vec<Var>> {
    let data = locked(vars)?;
    let mut named: Vec<(&String, &Var)> = data.iter().filter(|(n, _)| keep(n)).collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    Ok(named.into_iter().map(|(_, v)| v.clone()).collect())
}

/// A 64-bit FNV-1a fingerprint of the names and values of the variables under `prefix`: what a
/// cache of a frozen model's outputs is keyed on.
pub fn fingerprint(vars: &VarMap, prefix: &str) -> Result<u64> {
    fingerprint_where(vars, |n| n.starts_with(prefix))
}

/// A hash of the names and values of the variables whose names pass `keep`.
pub fn fingerprint_where(vars: &VarMap, keep: impl Fn(&str) -> bool) -> Result<u64> {
    let data = locked(vars)?;
    let mut named: Vec<(&String, &Var)> = data.iter().filter(|(n, _)| keep(n)).collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = crate::util::fs::Fnv::default();
    for (name, var) in named {
        h.write(name.as_bytes());
        let values: Vec<f32> = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        for v in values {
            h.write(&v.to_le_bytes());
        }
    }
    Ok(h.finish())
}

/// Sets the variable `name` (no-op when the model has none of that name).
pub fn set(vars: &VarMap, name: &str, value: &Tensor) -> Result<()> {
    if let Some(v) = locked(vars)?.get(name) {
        v.set(value)?;
    }
    Ok(())
}

/// Re-draws the variables from a generator seeded with `seed`, so that a model built from scratch is
/// reproducible (candle cannot seed its CPU generator). The draws follow candle-nn's own initial
/// distributions: weights Kaiming normal over their fan-in, biases uniform in ±1/√fan-in; everything else (BatchNorm scales, shifts and running statistics) keeps its
/// constant initial value.
pub fn reseed(vars: &VarMap, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let data = locked(vars)?;
    let mut named: Vec<(&String, &Var)> = data.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    for (name, var) in &named {
        let t = var.as_tensor();
        let dims = t.dims().to_vec();
        let value = if dims.len() >= 2 {
            randn_seeded(
                &dims,
                (2.0 / fan_in(&dims) as f64).sqrt(),
                rng.random(),
                t.device(),
            )?
        } else {
            // A convolution's or linear layer's bias: its weight, beside it, has two dimensions or more.
            let weight = format!("{}weight", name.trim_end_matches("bias"));
            match data.get(&weight).map(|w| w.as_tensor().dims().to_vec()) {
                Some(w) if name.ends_with("bias") && w.len() >= 2 => {
                    let bound = 1.0 / (fan_in(&w) as f64).sqrt();
                    let values: Vec<f32> = (0..t.elem_count())
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect();
                    Tensor::from_vec(values, dims, t.device())?
                }
                _ => continue,
            }
        };
        var.set(&value.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

/// Inputs per output unit of a weight laid out as (out, in, kernel…).
fn fan_in(dims: &[usize]) -> usize {
    dims[1..].iter().product::<usize>().max(1)
}

/// A tensor of normal values with standard deviation `std`, the same for the same seed.
pub fn randn_seeded(dims: &[usize], std: f64, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            // Box–Muller; 1 − u keeps the logarithm finite.
            let (u, v): (f64, f64) = (rng.random(), rng.random());
            (std * (-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    Tensor::from_vec(values, dims, device)
}
