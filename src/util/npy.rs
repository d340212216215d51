//! NumPy `.npy` files (format 1.0) of little-endian f32 arrays, for exports that scripts read back.

/// The bytes of a C-ordered f32 array of `shape`; `data` must hold the product of `shape` values.
pub fn f32_npy(shape: &[usize], data: impl IntoIterator<Item = f32>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(10 + header.len() + n * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_data_follows() {
        let npy = f32_npy(&[2, 3], (0..6).map(|i| i as f32));
        let hl = u16::from_le_bytes([npy[8], npy[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0);
        assert!(
            std::str::from_utf8(&npy[10..10 + hl])
                .unwrap()
                .contains("'shape': (2, 3)")
        );
        assert_eq!(npy.len(), 10 + hl + 24);
        assert_eq!(
            f32::from_le_bytes(npy[10 + hl + 20..].try_into().unwrap()),
            5.0
        );
        let one = f32_npy(&[4], [0.0; 4]);
        let hl = u16::from_le_bytes([one[8], one[9]]) as usize;
        assert!(
            std::str::from_utf8(&one[10..10 + hl])
                .unwrap()
                .contains("'shape': (4,)")
        );
    }
}
