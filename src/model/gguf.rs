//! GGUF, llama.cpp's checkpoint format (versions 2 and 3): header, metadata, tensor table, and
//! the block formats of the weight types seedance reads (F32, F16, BF16, Q8_0, Q4_0, Q4_1).
//!
//! The parser works on a byte slice (a memory-mapped file) and trusts nothing in it: every count
//! and length is checked against the bytes that are left before anything is allocated for it,
//! every tensor's data range against the file's end, every dimension product for overflow. A
//! bad file is an error naming the key or tensor and the byte offset, never a panic and never an
//! allocation larger than the file.

use std::collections::HashMap;
use std::fmt;

/// `GGUF` read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// Alignment of the tensor data when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nesting allowed for arrays of arrays (the format allows it; real files use one level).
const MAX_DEPTH: usize = 4;
/// Dimensions a tensor may have (ggml's GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;

/// Why a GGUF file was refused: what was being read, where, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufError {
    pub offset: usize,
    pub reason: String,
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.reason, self.offset)
    }
}

impl std::error::Error for GgufError {}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    /// An array of fixed-size scalars (ggml value type `elem`), kept as the file's bytes: an
    /// array costs what it occupies in the file, however it is typed.
    Scalars {
        elem: u32,
        data: Vec<u8>,
    },
    Strs(Vec<String>),
    /// An array of arrays.
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type that fits a u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self
                .as_u64()
                .map(|v| v as f64)
                .or_else(|| self.as_i64().map(|v| v as f64)),
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_strs(&self) -> Option<&[String]> {
        match self {
            Value::Strs(a) => Some(a),
            _ => None,
        }
    }

    /// An integer array (any integer element type), as i64s.
    pub fn as_ints(&self) -> Option<Vec<i64>> {
        let Value::Scalars { elem, data } = self else {
            return None;
        };
        let w = scalar_width(*elem)?;
        let ints = data.chunks_exact(w).map(|c| {
            let mut b = [0u8; 8];
            b[..w].copy_from_slice(c);
            match *elem {
                0 | 2 | 4 | 7 | 10 => u64::from_le_bytes(b) as i64,
                1 => i64::from(c[0] as i8),
                3 => i64::from(i16::from_le_bytes([c[0], c[1]])),
                5 => i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                _ => i64::from_le_bytes(b),
            }
        });
        matches!(*elem, 0..=5 | 7 | 10 | 11).then(|| ints.collect())
    }

    /// A float array (F32 or F64 elements), as f32s.
    pub fn as_floats(&self) -> Option<Vec<f32>> {
        match self {
            Value::Scalars { elem: 6, data } => Some(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            Value::Scalars { elem: 12, data } => Some(
                data.chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        f64::from_le_bytes(b) as f32
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Elements of any array.
    pub fn array_len(&self) -> Option<usize> {
        match self {
            Value::Scalars { elem, data } => Some(data.len() / scalar_width(*elem)?),
            Value::Strs(a) => Some(a.len()),
            Value::Array(a) => Some(a.len()),
            _ => None,
        }
    }
}

/// Bytes of one scalar of ggml value type `elem` (None: string, array, unknown).
fn scalar_width(elem: u32) -> Option<usize> {
    match elem {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// The tensor element types of ggml that a GGUF file may name. Only some can be read
/// ([`TensorType::supported`]); the others are known so their sizes can be checked and a
/// refusal can name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
}

impl TensorType {
    /// From ggml's type id.
    pub fn from_id(id: u32) -> Option<Self> {
        use TensorType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block).
    pub fn block(self) -> (u64, u64) {
        use TensorType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
        }
    }

    /// The types [`dequantize`] reads.
    pub fn supported(self) -> bool {
        use TensorType::*;
        matches!(self, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1)
    }

    pub fn name(self) -> &'static str {
        use TensorType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
        }
    }
}

/// One entry of the tensor table, checked against the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest (a row-major `(rows, cols)` matrix is `[cols, rows]`).
    pub dims: Vec<u64>,
    pub ty: TensorType,
    /// Absolute byte range of the data in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file (the tensor data stays in the caller's bytes).
#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub meta: HashMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
}

impl Gguf {
    /// Parses the header, metadata and tensor table of `bytes`, the whole file.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader { b: bytes, at: 0 };
        let magic = r.u32("magic")?;
        if magic != MAGIC {
            return Err(r.err(0, "not a GGUF file (bad magic)".into()));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(r.err(
                4,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each metadata entry takes at least 12 bytes (key length + type), each tensor 24.
        r.room(n_kv, 12, "metadata count")?;
        r.room(n_tensors, 24, "tensor count")?;
        let mut meta = HashMap::new();
        for _ in 0..n_kv {
            let at = r.at;
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let v = r.value(ty, &key, 0)?;
            if meta.insert(key.clone(), v).is_some() {
                return Err(r.err(at, format!("metadata key `{key}` appears twice")));
            }
        }
        let alignment = match meta.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(r.err(
                        0,
                        format!("general.alignment {v:?} is not a power of two up to 1 MiB"),
                    ))
                }
            },
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let at = r.at;
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(r.err(
                    at,
                    format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let id = r.u32("tensor type")?;
            let ty = TensorType::from_id(id)
                .ok_or_else(|| r.err(at, format!("tensor `{name}` has unknown type id {id}")))?;
            let offset = r.u64("tensor offset")?;
            raw.push((at, name, dims, ty, offset));
        }
        let data_start = align(r.at as u64, alignment);
        let file_len = bytes.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut names = HashMap::with_capacity(raw.len());
        for (at, name, dims, ty, offset) in raw {
            let fail = |reason: String| GgufError { offset: at, reason };
            if names.insert(name.clone(), ()).is_some() {
                return Err(fail(format!("tensor `{name}` appears twice")));
            }
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    fail(format!(
                        "tensor `{name}` has dimensions {dims:?} (zero or overflowing)"
                    ))
                })?;
            let (per_block, block_bytes) = ty.block();
            if dims[0] % per_block != 0 {
                return Err(fail(format!(
                    "tensor `{name}`: its first dimension {} is not a multiple of the {} block of {per_block}",
                    dims[0],
                    ty.name()
                )));
            }
            if offset % alignment != 0 {
                return Err(fail(format!(
                    "tensor `{name}`: data offset {offset} is not aligned to {alignment}"
                )));
            }
            let len = (elements / per_block)
                .checked_mul(block_bytes)
                .ok_or_else(|| fail(format!("tensor `{name}` is too large")))?;
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => tensors.push(TensorInfo {
                    name,
                    dims,
                    ty,
                    start: s as usize,
                    len: len as usize,
                }),
                _ => {
                    return Err(fail(format!(
                        "tensor `{name}`: data at offset {offset} ({len} bytes) runs past the end of the file ({file_len} bytes; data starts at {data_start})"
                    )))
                }
            }
        }
        Ok(Gguf {
            version,
            meta,
            tensors,
            alignment,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a).saturating_mul(a)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn err(&self, offset: usize, reason: String) -> GgufError {
        GgufError { offset, reason }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], GgufError> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.at..end];
                self.at = end;
                Ok(s)
            }
            _ => Err(self.err(
                self.at,
                format!("file ends inside {what} (needs {n} more bytes)"),
            )),
        }
    }

    /// Refuses a count whose elements (at least `min` bytes each) cannot fit in what is left.
    fn room(&self, count: u64, min: u64, what: &str) -> Result<(), GgufError> {
        let left = (self.b.len() - self.at) as u64;
        if count.saturating_mul(min) > left {
            return Err(self.err(
                self.at,
                format!("{what} {count} cannot fit in the {left} bytes that are left"),
            ));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let at = self.at;
        let n = self.u64(what)?;
        self.room(n, 1, what)?;
        let s = self.take(n as usize, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err(at, format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = key;
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(self.err(
                        self.at - 1,
                        format!("`{key}`: bool byte {b} (0 or 1 expected)"),
                    ))
                }
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                let at = self.at;
                if depth >= MAX_DEPTH {
                    return Err(self.err(at, format!("`{key}`: arrays nested too deep")));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                if let Some(w) = scalar_width(elem) {
                    self.room(n, w as u64, what)?;
                    let data = self.take(n as usize * w, what)?.to_vec();
                    if elem == 7 && data.iter().any(|&b| b > 1) {
                        return Err(
                            self.err(at, format!("`{key}`: bool array with a byte not 0 or 1"))
                        );
                    }
                    return Ok(Value::Scalars { elem, data });
                }
                match elem {
                    8 => {
                        self.room(n, 8, what)?;
                        let mut v = Vec::with_capacity(n as usize);
                        for _ in 0..n {
                            v.push(self.string(what)?);
                        }
                        Value::Strs(v)
                    }
                    9 => {
                        self.room(n, 12, what)?;
                        let mut v = Vec::with_capacity(n as usize);
                        for _ in 0..n {
                            v.push(self.value(elem, key, depth + 1)?);
                        }
                        Value::Array(v)
                    }
                    t => {
                        return Err(self.err(at, format!("`{key}`: unknown array element type {t}")))
                    }
                }
            }
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(self.err(self.at - 4, format!("`{key}`: unknown metadata type {t}"))),
        })
    }
}

/// Dequantizes `n` elements of type `ty` from `data` (exactly their blocks) into `out`.
/// Errors on an unsupported type or a length mismatch.
pub fn dequantize(ty: TensorType, data: &[u8], out: &mut [f32]) -> Result<(), String> {
    let (per_block, block_bytes) = ty.block();
    let (per_block, block_bytes) = (per_block as usize, block_bytes as usize);
    let n = out.len();
    if !n.is_multiple_of(per_block) || data.len() != n / per_block * block_bytes {
        return Err(format!(
            "{} data of {} bytes does not hold {n} elements",
            ty.name(),
            data.len()
        ));
    }
    let f16_at = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        TensorType::F32 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        TensorType::F16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        TensorType::BF16 => {
            for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        TensorType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..]) {
                    *x = f32::from(q as i8) * d;
                }
            }
        }
        TensorType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..].iter().enumerate() {
                    o[j] = (f32::from(q & 0x0f) - 8.0) * d;
                    o[j + 16] = (f32::from(q >> 4) - 8.0) * d;
                }
            }
        }
        TensorType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(32).zip(data.chunks_exact(20)) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, &q) in b[4..].iter().enumerate() {
                    o[j] = f32::from(q & 0x0f) * d + m;
                    o[j + 16] = f32::from(q >> 4) * d + m;
                }
            }
        }
        other => {
            return Err(format!(
                "tensor type {} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1 are)",
                other.name()
            ))
        }
    }
    Ok(())
}

/// Writes GGUF files (version 3): the test fixtures' writer, and the reader's property tests.
pub mod write {
    use super::{align, Value, DEFAULT_ALIGNMENT};

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn type_id(v: &Value) -> u32 {
        match v {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Scalars { .. } | Value::Strs(_) | Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U8(x) => out.push(*x),
            Value::I8(x) => out.push(*x as u8),
            Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            Value::Bool(b) => out.push(u8::from(*b)),
            Value::Str(s) => string(out, s),
            Value::Scalars { elem, data } => {
                let w = super::scalar_width(*elem).unwrap_or(1);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&((data.len() / w) as u64).to_le_bytes());
                out.extend_from_slice(data);
            }
            Value::Strs(a) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    string(out, x);
                }
            }
            Value::Array(a) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    value(out, x);
                }
            }
        }
    }

    /// A tensor to write: name, ggml dims, ggml type id, raw data.
    pub struct Tensor<'a> {
        pub name: &'a str,
        pub dims: &'a [u64],
        pub type_id: u32,
        pub data: &'a [u8],
    }

    /// A whole GGUF v3 file with the default alignment.
    pub fn file(meta: &[(&str, Value)], tensors: &[Tensor<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            string(&mut out, k);
            out.extend_from_slice(&type_id(v).to_le_bytes());
            value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            string(&mut out, t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len() as u64, DEFAULT_ALIGNMENT);
        }
        let start = align(out.len() as u64, DEFAULT_ALIGNMENT) as usize;
        out.resize(start, 0);
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend_from_slice(t.data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::{file, Tensor};
    use super::*;
    use half::f16;

    fn small() -> Vec<u8> {
        let f32s: Vec<u8> = [1.0f32, -2.0, 0.5, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut q8 = f16::from_f32(0.5).to_le_bytes().to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        file(
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("llama.block_count", Value::U32(2)),
                (
                    "tokenizer.ggml.tokens",
                    Value::Strs(vec!["a".into(), "b".into()]),
                ),
                (
                    "tokenizer.ggml.token_type",
                    Value::Scalars {
                        elem: 5,
                        data: [1i32, -3].iter().flat_map(|x| x.to_le_bytes()).collect(),
                    },
                ),
            ],
            &[
                Tensor {
                    name: "v",
                    dims: &[4],
                    type_id: 0,
                    data: &f32s,
                },
                Tensor {
                    name: "q",
                    dims: &[32],
                    type_id: 8,
                    data: &q8,
                },
            ],
        )
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let b = small();
        let g = Gguf::parse(&b).expect("parse");
        assert_eq!(g.version, 3);
        assert_eq!(
            g.get("general.architecture").and_then(Value::as_str),
            Some("llama")
        );
        assert_eq!(g.get("llama.block_count").and_then(Value::as_u64), Some(2));
        let toks = g
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_strs)
            .expect("tokens");
        assert_eq!(toks, ["a", "b"]);
        let types = g.get("tokenizer.ggml.token_type").and_then(Value::as_ints);
        assert_eq!(types, Some(vec![1, -3]));
        let v = g.tensor("v").expect("v");
        let mut out = vec![0f32; 4];
        dequantize(v.ty, &b[v.start..v.start + v.len], &mut out).expect("f32");
        assert_eq!(out, [1.0, -2.0, 0.5, 4.0]);
        let q = g.tensor("q").expect("q");
        assert_eq!(q.start % 32, 0);
        let mut out = vec![0f32; 32];
        dequantize(q.ty, &b[q.start..q.start + q.len], &mut out).expect("q8");
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);
    }

    #[test]
    fn q4_blocks_put_low_nibbles_first() {
        // d = 2, m = -1; byte j holds element j (low nibble) and j + 16 (high nibble).
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = vec![0f32; 32];
        dequantize(TensorType::Q4_1, &b, &mut out).expect("q4_1");
        assert_eq!(out[0], -1.0);
        assert_eq!(out[15], 29.0);
        assert_eq!(out[16], 29.0);
        assert_eq!(out[31], -1.0);
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..16u8).map(|j| j | (j << 4)));
        dequantize(TensorType::Q4_0, &b, &mut out).expect("q4_0");
        assert_eq!(out[0], -4.0);
        assert_eq!(out[15], 3.5);
        assert_eq!(out[16], -4.0);
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let b = small();
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(Gguf::parse(&bad).unwrap_err().reason.contains("bad magic"));
        let mut v1 = b.clone();
        v1[4] = 1;
        assert!(Gguf::parse(&v1).unwrap_err().reason.contains("version 1"));
        let cut = &b[..b.len() - 3];
        let e = Gguf::parse(cut).unwrap_err();
        assert!(
            e.reason.contains("tensor `q`") && e.reason.contains("past the end"),
            "{e}"
        );
        // An absurd tensor count is refused before anything is allocated for it.
        let mut huge = b.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Gguf::parse(&huge)
            .unwrap_err()
            .reason
            .contains("tensor count"));
        let unsupported = TensorType::Q4K;
        let e = dequantize(unsupported, &[0; 144], &mut [0f32; 256]).unwrap_err();
        assert!(e.contains("Q4_K is not supported"), "{e}");
    }
}
