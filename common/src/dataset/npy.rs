//! NumPy `.npy` arrays read as a stream: the header (dtype, order, shape),
//! then rows converted to `f32` features or integer labels, so that a
//! dataset source never holds a whole array.
//!
//! Only what a dataset needs is accepted, and everything else is refused
//! with the file named: little-endian (or byte-order-free) integers and
//! floats in C order. Big-endian data and Fortran order are refused rather
//! than converted, so that a file is read the same way everywhere.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The first bytes of every `.npy` file.
pub const NPY_MAGIC: &[u8; 6] = b"\x93NUMPY";

/// An element type of an array, as its `descr` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Element {
    /// `u1`
    U8,
    /// `i1`
    I8,
    /// `u2`
    U16,
    /// `i2`
    I16,
    /// `u4`
    U32,
    /// `i4`
    I32,
    /// `u8`
    U64,
    /// `i8`
    I64,
    /// `f2`
    F16,
    /// `f4`
    F32,
    /// `f8`
    F64,
}

impl Element {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Element::U8 | Element::I8 => 1,
            Element::U16 | Element::I16 | Element::F16 => 2,
            Element::U32 | Element::I32 | Element::F32 => 4,
            Element::U64 | Element::I64 | Element::F64 => 8,
        }
    }

    /// NumPy's name for it (`float32`, `uint8`, ...).
    pub fn numpy_name(self) -> &'static str {
        match self {
            Element::U8 => "uint8",
            Element::I8 => "int8",
            Element::U16 => "uint16",
            Element::I16 => "int16",
            Element::U32 => "uint32",
            Element::I32 => "int32",
            Element::U64 => "uint64",
            Element::I64 => "int64",
            Element::F16 => "float16",
            Element::F32 => "float32",
            Element::F64 => "float64",
        }
    }

    /// The element of a type code without its byte-order character
    /// (`f4`, `u1`, ...).
    fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "u1" | "B" => Element::U8,
            "i1" | "b" => Element::I8,
            "u2" => Element::U16,
            "i2" => Element::I16,
            "u4" => Element::U32,
            "i4" => Element::I32,
            "u8" => Element::U64,
            "i8" => Element::I64,
            "f2" | "e" => Element::F16,
            "f4" | "f" => Element::F32,
            "f8" | "d" => Element::F64,
            _ => return None,
        })
    }

    /// Decodes one little-endian element as `f64` (exact for every type
    /// but 64-bit integers beyond 2^53, which no label reaches).
    fn decode(self, b: &[u8]) -> f64 {
        match self {
            Element::U8 => f64::from(b[0]),
            Element::I8 => f64::from(b[0] as i8),
            Element::U16 => f64::from(u16::from_le_bytes([b[0], b[1]])),
            Element::I16 => f64::from(i16::from_le_bytes([b[0], b[1]])),
            Element::U32 => f64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))),
            Element::I32 => f64::from(i32::from_le_bytes(b.try_into().expect("4 bytes"))),
            Element::U64 => u64::from_le_bytes(b.try_into().expect("8 bytes")) as f64,
            Element::I64 => i64::from_le_bytes(b.try_into().expect("8 bytes")) as f64,
            Element::F16 => f64::from(half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            Element::F32 => f64::from(f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            Element::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")),
        }
    }
}

/// What an array's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArrayHeader {
    /// The element type.
    pub element: Element,
    /// The shape, outermost first.
    pub shape: Vec<usize>,
}

impl ArrayHeader {
    /// Rows (the first dimension; 1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Elements per row (the product of the other dimensions).
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// An array being read row by row from its data.
pub struct ArrayReader {
    name: PathBuf,
    header: ArrayHeader,
    reader: Box<dyn Read + Send>,
    rows_left: usize,
}

impl ArrayReader {
    /// Reads an `.npy` header from `reader`; `name` (the file, or
    /// `file.npz/entry`) names it in errors.
    pub fn npy(name: &Path, mut reader: Box<dyn Read + Send>) -> Result<Self> {
        let header = read_npy_header(name, &mut reader)?;
        Ok(Self::raw(name, header, reader))
    }

    /// An array whose data (little-endian, C order) starts at `reader`.
    pub fn raw(name: &Path, header: ArrayHeader, reader: Box<dyn Read + Send>) -> Self {
        ArrayReader {
            name: name.to_path_buf(),
            rows_left: header.rows(),
            header,
            reader,
        }
    }

    /// Its header.
    pub fn header(&self) -> &ArrayHeader {
        &self.header
    }

    /// The next at most `rows` rows, every element as `f64`; empty at
    /// the end. A file that ends early is an error naming its shape.
    pub fn next_rows(&mut self, rows: usize) -> Result<Vec<f64>> {
        let rows = rows.min(self.rows_left);
        let size = self.header.element.size();
        let mut bytes = vec![0u8; rows * self.header.row_len() * size];
        let filled = super::stream::read_full(&mut self.reader, &mut bytes)
            .map_err(|e| Error::format(&self.name, format!("cannot read: {e}")))?;
        if filled < bytes.len() {
            return Err(Error::format(
                &self.name,
                format!(
                    "truncated: shape {:?} of {} needs more data than the file holds",
                    self.header.shape,
                    self.header.element.numpy_name()
                ),
            ));
        }
        self.rows_left -= rows;
        let element = self.header.element;
        Ok(bytes
            .chunks_exact(size)
            .map(|b| element.decode(b))
            .collect())
    }
}

/// Parses the magic, version and header dictionary of an `.npy` stream.
fn read_npy_header(name: &Path, reader: &mut dyn Read) -> Result<ArrayHeader> {
    let bad = |reason: String| Error::format(name, reason);
    let mut prefix = [0u8; 8];
    reader
        .read_exact(&mut prefix)
        .map_err(|_| bad("not an .npy file: too short for its header".into()))?;
    if &prefix[..6] != NPY_MAGIC {
        return Err(bad("not an .npy file (no \\x93NUMPY magic)".into()));
    }
    let len = match prefix[6] {
        1 => {
            let mut b = [0u8; 2];
            reader
                .read_exact(&mut b)
                .map_err(|_| bad("truncated header".into()))?;
            usize::from(u16::from_le_bytes(b))
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            reader
                .read_exact(&mut b)
                .map_err(|_| bad("truncated header".into()))?;
            u32::from_le_bytes(b) as usize
        }
        v => return Err(bad(format!(".npy format version {v} is not 1, 2 or 3"))),
    };
    if len > 1 << 20 {
        return Err(bad(format!("header of {len} bytes is implausibly long")));
    }
    let mut dict = vec![0u8; len];
    reader
        .read_exact(&mut dict)
        .map_err(|_| bad("truncated header".into()))?;
    let dict = String::from_utf8(dict).map_err(|_| bad("header is not text".into()))?;
    parse_header_dict(&dict).map_err(bad)
}

/// Parses `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
fn parse_header_dict(dict: &str) -> std::result::Result<ArrayHeader, String> {
    let value_of = |key: &str| -> std::result::Result<&str, String> {
        let at = dict
            .find(&format!("'{key}'"))
            .ok_or_else(|| format!("header has no {key:?}: {dict:?}"))?;
        let rest = dict[at + key.len() + 2..].trim_start();
        rest.strip_prefix(':')
            .map(str::trim_start)
            .ok_or_else(|| format!("header's {key:?} has no value: {dict:?}"))
    };
    let descr = value_of("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split_once('\''))
        .map(|(d, _)| d)
        .ok_or_else(|| {
            format!(
                "structured dtypes are not supported (descr {descr:.40}...); save a plain array"
            )
        })?;
    let (order, code) = descr.split_at(descr.len().min(1));
    let element = Element::from_code(code)
        .ok_or_else(|| format!("dtype {descr:?} is not an integer or float type"))?;
    match order {
        "<" | "|" | "=" => {}
        ">" => {
            return Err(format!(
                "big-endian dtype {descr:?} is not supported; save it little-endian \
                 (array.astype(array.dtype.newbyteorder('<')))"
            ))
        }
        _ => return Err(format!("dtype {descr:?} has no byte order")),
    }
    let fortran = value_of("fortran_order")?;
    if fortran.starts_with("True") {
        return Err(
            "Fortran-order arrays are not supported; save it in C order (np.ascontiguousarray)"
                .into(),
        );
    }
    if !fortran.starts_with("False") {
        return Err(format!("fortran_order is neither True nor False: {dict:?}"));
    }
    let shape = value_of("shape")?;
    let shape = shape
        .strip_prefix('(')
        .and_then(|s| s.split_once(')'))
        .map(|(s, _)| s)
        .ok_or_else(|| format!("shape is not a tuple: {dict:?}"))?;
    let shape = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| format!("shape is not a tuple of sizes: {dict:?}"))?;
    Ok(ArrayHeader { element, shape })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `.npy` file (version 1) of `descr`, `shape` and raw `data`.
    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let fortran = if fortran { "True" } else { "False" };
        let mut dict =
            format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
        while (10 + dict.len() + 1) % 64 != 0 {
            dict.push(' ');
        }
        dict.push('\n');
        let mut bytes = NPY_MAGIC.to_vec();
        bytes.extend([1, 0]);
        bytes.extend((dict.len() as u16).to_le_bytes());
        bytes.extend(dict.as_bytes());
        bytes.extend(data);
        bytes
    }

    fn reader(bytes: Vec<u8>) -> Result<ArrayReader> {
        ArrayReader::npy(Path::new("a.npy"), Box::new(std::io::Cursor::new(bytes)))
    }

    #[test]
    fn rows_come_back_in_order_and_converted() {
        let data: Vec<u8> = [1.5f32, -2.0, 3.25, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut r = reader(npy("<f4", false, "(3, 2)", &data)).unwrap();
        assert_eq!(r.header().shape, vec![3, 2]);
        assert_eq!(r.next_rows(2).unwrap(), vec![1.5, -2.0, 3.25, 4.0]);
        assert_eq!(r.next_rows(2).unwrap(), vec![5.0, 6.0]);
        assert!(r.next_rows(2).unwrap().is_empty());

        let labels: Vec<u8> = [-1i64, 7].iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut r = reader(npy("<i8", false, "(2,)", &labels)).unwrap();
        assert_eq!(r.next_rows(5).unwrap(), vec![-1.0, 7.0]);
    }

    #[test]
    fn unsupported_layouts_are_refused_with_the_fix() {
        let e = |bytes| reader(bytes).err().expect("refused").to_string();
        let big = e(npy(">f4", false, "(1,)", &[0; 4]));
        assert!(big.contains("a.npy") && big.contains("big-endian"), "{big}");
        let fortran = e(npy("<f4", true, "(2, 2)", &[0; 16]));
        assert!(
            fortran.contains("Fortran") && fortran.contains("ascontiguousarray"),
            "{fortran}"
        );
        let strings = e(npy("<U5", false, "(1,)", &[0; 20]));
        assert!(strings.contains("\"<U5\""), "{strings}");
        let structured = e(npy_structured());
        assert!(structured.contains("structured"), "{structured}");
        let not_npy = e(b"PK\x03\x04 not an npy at all".to_vec());
        assert!(not_npy.contains("magic"), "{not_npy}");
    }

    fn npy_structured() -> Vec<u8> {
        let dict = "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }\n";
        let mut bytes = NPY_MAGIC.to_vec();
        bytes.extend([1, 0]);
        bytes.extend((dict.len() as u16).to_le_bytes());
        bytes.extend(dict.as_bytes());
        bytes
    }

    #[test]
    fn a_truncated_file_names_its_shape() {
        let mut r = reader(npy("<f4", false, "(4, 2)", &[0; 20])).unwrap();
        let e = r.next_rows(4).unwrap_err().to_string();
        assert!(
            e.contains("truncated") && e.contains("[4, 2]") && e.contains("a.npy"),
            "{e}"
        );
    }
}
