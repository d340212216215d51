//! Helpers over a model's variables: finiteness checks, detached copies, trainable subsets.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

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

/// Sets the variable `name` (no-op when the model has none of that name).
pub fn set(vars: &VarMap, name: &str, value: &Tensor) -> Result<()> {
    if let Some(v) = locked(vars)?.get(name) {
        v.set(value)?;
    }
    Ok(())
}
