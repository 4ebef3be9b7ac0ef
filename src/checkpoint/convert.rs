//! Bytes and dtypes: the safetensors dtype of each Burn dtype and back, and the little-endian
//! values of float tensors widened for the arithmetic and rounded once for the output.

use burn::tensor::{BoolStore, DType, TensorData};
use half::{bf16, f16};
use safetensors::tensor::Dtype;

/// The Burn dtype of a safetensors dtype; `None` for those Burn has no type for (fp8, fp4, …).
pub(super) fn from_safetensors(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::BOOL => DType::Bool(BoolStore::Native),
        Dtype::U8 => DType::U8,
        Dtype::I8 => DType::I8,
        Dtype::U16 => DType::U16,
        Dtype::I16 => DType::I16,
        Dtype::U32 => DType::U32,
        Dtype::I32 => DType::I32,
        Dtype::U64 => DType::U64,
        Dtype::I64 => DType::I64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

/// The safetensors dtype with the same bytes; `None` where there is none (quantized tensors,
/// booleans stored as `u32`).
pub(super) fn to_safetensors(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::Bool(BoolStore::Native | BoolStore::U8) => Dtype::BOOL,
        DType::U8 => Dtype::U8,
        DType::I8 => Dtype::I8,
        DType::U16 => Dtype::U16,
        DType::I16 => Dtype::I16,
        DType::U32 => Dtype::U32,
        DType::I32 => Dtype::I32,
        DType::U64 => Dtype::U64,
        DType::I64 => Dtype::I64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 | DType::Flex32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::Bool(BoolStore::U32) | DType::QFloat(_) => return None,
    })
}

/// A short name for a dtype, as printed in plans and listings.
pub(super) fn label(dtype: DType) -> String {
    match dtype {
        DType::Bool(_) => "BOOL".into(),
        DType::QFloat(_) => "QFloat".into(),
        other => format!("{other:?}"),
    }
}

/// Little-endian values of a float tensor, widened to f32.
pub(super) fn to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 | DType::Flex32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        // Narrowed once; only used when A is not f64 (the output is A's dtype, or f32/f16/bf16).
        DType::F64 => to_f64(dtype, bytes).into_iter().map(|v| v as f32).collect(),
        other => unreachable!("not a float dtype: {other:?}"),
    }
}

/// Whether values stored as `dtype` change when rounded to `to` before a merge (a mergekit
/// recipe's `dtype`): `to` is f16 or bf16 and not the stored dtype.
pub(super) fn rounds(dtype: DType, to: Option<DType>) -> bool {
    matches!(to, Some(DType::F16 | DType::BF16)) && to != Some(dtype)
}

/// Rounds f32 values to `to` (f16 or bf16), kept in f32.
pub(super) fn round_to(values: &mut [f32], to: Option<DType>) {
    match to {
        Some(DType::F16) => values
            .iter_mut()
            .for_each(|v| *v = f16::from_f32(*v).to_f32()),
        Some(DType::BF16) => values
            .iter_mut()
            .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
        _ => {}
    }
}

/// A float tensor's values as f32, rounded to `round` first where [`rounds`] says so: the
/// stored bytes themselves for an f32 tensor on a little-endian host when they lie on a 4-byte
/// boundary (the format does not promise it) and nothing is rounded, otherwise widened (or
/// narrowed, from f64) into `scratch`, which keeps its memory for the next tensor.
pub(super) fn f32_values<'a>(
    dtype: DType,
    bytes: &'a [u8],
    scratch: &'a mut Vec<f32>,
    round: Option<DType>,
) -> &'a [f32] {
    let round = round.filter(|_| rounds(dtype, round));
    if round.is_none()
        && matches!(dtype, DType::F32 | DType::Flex32)
        && cfg!(target_endian = "little")
        && let Ok(values) = bytemuck::try_cast_slice::<u8, f32>(bytes)
    {
        return values;
    }
    scratch.clear();
    match dtype {
        DType::F32 | DType::Flex32 => scratch.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::F16 => scratch.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        DType::BF16 => scratch.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        DType::F64 => scratch.extend(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32),
        ),
        other => unreachable!("not a float dtype: {other:?}"),
    }
    round_to(scratch, round);
    scratch
}

/// Merged f32 values rounded once to `dtype` (f32, f16 or bf16), as little-endian bytes: the
/// values themselves for f32 on a little-endian host, otherwise encoded into `scratch`, which
/// keeps its memory for the next tensor. `None` when one of them is not finite there.
pub(super) fn encode_f32<'a>(
    dtype: DType,
    values: &'a [f32],
    scratch: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    if matches!(dtype, DType::F32 | DType::Flex32) && cfg!(target_endian = "little") {
        return values
            .iter()
            .all(|v| v.is_finite())
            .then(|| bytemuck::cast_slice(values));
    }
    scratch.clear();
    scratch.reserve(values.len() * dtype.size());
    match dtype {
        DType::F32 | DType::Flex32 => {
            for v in values {
                v.is_finite().then_some(())?;
                scratch.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for v in values {
                let h = f16::from_f32(*v);
                h.is_finite().then_some(())?;
                scratch.extend_from_slice(&h.to_le_bytes());
            }
        }
        DType::BF16 => {
            for v in values {
                let h = bf16::from_f32(*v);
                h.is_finite().then_some(())?;
                scratch.extend_from_slice(&h.to_le_bytes());
            }
        }
        other => unreachable!("not an f32-computed dtype: {other:?}"),
    }
    Some(scratch)
}

/// Little-endian values of a float tensor, widened to f64.
pub(super) fn to_f64(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        other => to_f32(other, bytes).into_iter().map(f64::from).collect(),
    }
}

/// The merged values rounded once to `dtype`; `None` when one of them is not finite there.
pub(super) fn encode(dtype: DType, data: &TensorData) -> Option<Vec<u8>> {
    let n = data.num_elements();
    let mut out = Vec::with_capacity(n * dtype.size());
    match dtype {
        DType::F64 => {
            for v in data.iter::<f64>() {
                v.is_finite().then_some(())?;
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::F32 | DType::Flex32 => {
            for v in data.iter::<f32>() {
                v.is_finite().then_some(())?;
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for v in data.iter::<f32>() {
                let h = f16::from_f32(v);
                h.is_finite().then_some(())?;
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        DType::BF16 => {
            for v in data.iter::<f32>() {
                let h = bf16::from_f32(v);
                h.is_finite().then_some(())?;
                out.extend_from_slice(&h.to_le_bytes());
            }
        }
        other => unreachable!("not a float dtype: {other:?}"),
    }
    Some(out)
}

/// A float tensor's bytes in another float dtype, each value rounded once (from its exact f64
/// value). NaNs and infinities pass through as they are, as they do when a merge at `t = 0` or
/// `t = 1` returns an input; `None` when a finite value does not fit `to` (f16 overflows above
/// 65504).
pub(super) fn convert(from: DType, bytes: &[u8], to: DType) -> Option<Vec<u8>> {
    if from == to {
        return Some(bytes.to_vec());
    }
    let mut out = Vec::with_capacity(bytes.len() / from.size() * to.size());
    for v in to_f64(from, bytes) {
        let fits = match to {
            DType::F64 => {
                out.extend_from_slice(&v.to_le_bytes());
                true
            }
            DType::F32 | DType::Flex32 => {
                let x = v as f32;
                out.extend_from_slice(&x.to_le_bytes());
                x.is_finite()
            }
            DType::F16 => {
                let x = f16::from_f64(v);
                out.extend_from_slice(&x.to_le_bytes());
                x.is_finite()
            }
            DType::BF16 => {
                let x = bf16::from_f64(v);
                out.extend_from_slice(&x.to_le_bytes());
                x.is_finite()
            }
            other => unreachable!("not a float dtype: {other:?}"),
        };
        (fits || !v.is_finite()).then_some(())?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn conversions_round_once_and_keep_non_finite_inputs() {
        let input = f32_bytes(&[1.0, -0.0, f32::NAN, f32::INFINITY, 1.0 + f32::EPSILON]);
        // Same dtype: the bytes, -0.0 and NaN payloads included.
        assert_eq!(convert(DType::F32, &input, DType::F32).unwrap(), input);
        let half = convert(DType::F32, &input, DType::F16).unwrap();
        let back: Vec<f16> = half
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(back[0], f16::ONE);
        assert!(back[1].is_sign_negative() && back[1] == f16::ZERO);
        assert!(back[2].is_nan());
        assert_eq!(back[3], f16::INFINITY);
        assert_eq!(back[4], f16::ONE); // 1 + 2^-23 rounds to 1 in f16
        // A finite value that overflows f16 is refused; bf16 holds it.
        let big = f32_bytes(&[70000.0]);
        assert!(convert(DType::F32, &big, DType::F16).is_none());
        assert!(convert(DType::F32, &big, DType::BF16).is_some());
        // f64 narrowed once: 1e300 does not fit f32.
        let wide: Vec<u8> = [0.1f64, 1e300]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(convert(DType::F64, &wide, DType::F32).is_none());
        let one = convert(DType::F64, &wide[..8], DType::F32).unwrap();
        assert_eq!(one, 0.1f32.to_le_bytes());
    }
}
