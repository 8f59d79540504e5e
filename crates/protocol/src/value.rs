//! Building and reading [`Value`]s from natural Rust types, and printing
//! them the way Python's `repr` would, so that logs and the CLI read like a
//! Python session.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use bytes::Bytes;

use crate::error::ValueError;
use crate::pb::value::Kind;
use crate::pb::{Complex, Dict, DictEntry, NdArray, Null, Parameter, Value, ValueList};

impl Value {
    /// Python's `None`.
    pub fn none() -> Self {
        Kind::NullValue(Null {}).into()
    }

    /// A Python `bytes` object.
    pub fn bytes(data: impl Into<Vec<u8>>) -> Self {
        Kind::BytesValue(data.into()).into()
    }

    /// A Python `tuple`.
    pub fn tuple(items: impl IntoIterator<Item = Value>) -> Self {
        Kind::TupleValue(ValueList {
            items: items.into_iter().collect(),
        })
        .into()
    }

    /// A Python `list`.
    pub fn list(items: impl IntoIterator<Item = Value>) -> Self {
        Kind::ListValue(ValueList {
            items: items.into_iter().collect(),
        })
        .into()
    }

    /// A Python `dict` with keys of any kind, in the given order.
    pub fn dict(entries: impl IntoIterator<Item = (Value, Value)>) -> Self {
        Kind::DictValue(Dict {
            entries: entries
                .into_iter()
                .map(|(key, value)| DictEntry {
                    key: Some(key),
                    value: Some(value),
                })
                .collect(),
        })
        .into()
    }

    /// A Python `complex`.
    pub fn complex(real: f64, imag: f64) -> Self {
        Kind::ComplexValue(Complex {
            real: Some(real),
            imag: Some(imag),
        })
        .into()
    }

    /// A numpy array (`scalar = false`) or numpy scalar (`scalar = true`)
    /// with the given dtype string, shape and C-order data.
    pub fn ndarray(dtype: impl Into<String>, shape: Vec<u64>, data: Bytes, scalar: bool) -> Self {
        Kind::NdarrayValue(NdArray {
            dtype: dtype.into(),
            shape,
            data,
            scalar,
            shared: None,
        })
        .into()
    }

    /// An opaque pickled Python object.
    pub fn pickle(data: impl Into<Vec<u8>>) -> Self {
        Kind::PickleValue(data.into()).into()
    }

    /// An integer of any size, given as two's complement big-endian bytes.
    /// Stored as `int_value` when it fits in 64 bits, so that every integer
    /// has one encoding.
    pub fn big_int(twos_complement_be: &[u8]) -> Self {
        let trimmed = trim_twos_complement(twos_complement_be);
        if trimmed.len() <= 8 {
            let fill = if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
                0xff
            } else {
                0
            };
            let mut buf = [fill; 8];
            buf[8 - trimmed.len()..].copy_from_slice(trimmed);
            Kind::IntValue(i64::from_be_bytes(buf)).into()
        } else {
            Kind::BigIntValue(trimmed.to_vec()).into()
        }
    }

    /// How deep this value nests, in protobuf messages as on the wire:
    /// 1 for a scalar, 2 for `None`, a complex or a numpy value, plus 2 per
    /// enclosing list or tuple and 3 per enclosing dict (see
    /// [`MAX_VALUE_DEPTH`](crate::MAX_VALUE_DEPTH), which the framing
    /// enforces). Walks the value without recursion, so any depth is safe.
    pub fn depth(&self) -> usize {
        let mut deepest = 0;
        let mut pending = vec![(self, 1)];
        while let Some((value, level)) = pending.pop() {
            let here = match &value.kind {
                None
                | Some(Kind::BoolValue(_))
                | Some(Kind::IntValue(_))
                | Some(Kind::BigIntValue(_))
                | Some(Kind::DoubleValue(_))
                | Some(Kind::StringValue(_))
                | Some(Kind::BytesValue(_))
                | Some(Kind::PickleValue(_)) => level,
                Some(Kind::NullValue(_))
                | Some(Kind::ComplexValue(_))
                | Some(Kind::NdarrayValue(_)) => level + 1,
                Some(Kind::ListValue(list)) | Some(Kind::TupleValue(list)) => {
                    pending.extend(list.items.iter().map(|item| (item, level + 2)));
                    level + 1
                }
                Some(Kind::DictValue(dict)) => {
                    for entry in &dict.entries {
                        pending.extend(entry.key.iter().map(|key| (key, level + 3)));
                        pending.extend(entry.value.iter().map(|value| (value, level + 3)));
                    }
                    if dict.entries.is_empty() {
                        level + 1
                    } else {
                        level + 2
                    }
                }
            };
            deepest = deepest.max(here);
        }
        deepest
    }

    /// The kind, or an error for a value that carries none.
    pub fn try_kind(&self) -> Result<&Kind, ValueError> {
        self.kind.as_ref().ok_or(ValueError::Empty)
    }

    /// True for Python's `None`.
    pub fn is_none(&self) -> bool {
        matches!(self.kind, Some(Kind::NullValue(_)))
    }

    /// The Python type name of this value, for error messages.
    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            None => "<empty>",
            Some(Kind::NullValue(_)) => "NoneType",
            Some(Kind::BoolValue(_)) => "bool",
            Some(Kind::IntValue(_)) | Some(Kind::BigIntValue(_)) => "int",
            Some(Kind::DoubleValue(_)) => "float",
            Some(Kind::StringValue(_)) => "str",
            Some(Kind::BytesValue(_)) => "bytes",
            Some(Kind::ListValue(_)) => "list",
            Some(Kind::TupleValue(_)) => "tuple",
            Some(Kind::DictValue(_)) => "dict",
            Some(Kind::ComplexValue(_)) => "complex",
            Some(Kind::NdarrayValue(a)) if a.scalar => "numpy scalar",
            Some(Kind::NdarrayValue(_)) => "numpy.ndarray",
            Some(Kind::PickleValue(_)) => "pickled object",
        }
    }

    fn mismatch(&self, expected: &'static str) -> ValueError {
        ValueError::Type {
            expected,
            found: self.type_name(),
        }
    }
}

/// Drops redundant leading sign bytes of a two's complement number.
fn trim_twos_complement(bytes: &[u8]) -> &[u8] {
    let mut start = 0;
    while start + 1 < bytes.len() {
        let (b, next) = (bytes[start], bytes[start + 1]);
        let redundant = (b == 0 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0);
        if !redundant {
            break;
        }
        start += 1;
    }
    &bytes[start..]
}

impl From<Kind> for Value {
    fn from(kind: Kind) -> Self {
        Value { kind: Some(kind) }
    }
}

impl From<()> for Value {
    fn from(_: ()) -> Self {
        Value::none()
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Kind::BoolValue(v).into()
    }
}

macro_rules! from_small_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Kind::IntValue(i64::from(v)).into()
            }
        }
    )*};
}
from_small_int!(i8, i16, i32, i64, u8, u16, u32);

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::from(i128::from(v))
    }
}

impl From<i128> for Value {
    fn from(v: i128) -> Self {
        Value::big_int(&v.to_be_bytes())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Kind::DoubleValue(v).into()
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Kind::StringValue(v.to_owned()).into()
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Kind::StringValue(v).into()
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or_else(Value::none, Into::into)
    }
}

impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Self {
        Value::list(v.into_iter().map(Into::into))
    }
}

impl<K: Into<Value>, V: Into<Value>> From<BTreeMap<K, V>> for Value {
    fn from(map: BTreeMap<K, V>) -> Self {
        Value::dict(map.into_iter().map(|(k, v)| (k.into(), v.into())))
    }
}

impl<K: Into<Value>, V: Into<Value>, S> From<HashMap<K, V, S>> for Value {
    fn from(map: HashMap<K, V, S>) -> Self {
        Value::dict(map.into_iter().map(|(k, v)| (k.into(), v.into())))
    }
}

impl TryFrom<&Value> for bool {
    type Error = ValueError;
    fn try_from(v: &Value) -> Result<Self, ValueError> {
        match v.try_kind()? {
            Kind::BoolValue(b) => Ok(*b),
            _ => Err(v.mismatch("bool")),
        }
    }
}

impl TryFrom<&Value> for i64 {
    type Error = ValueError;
    fn try_from(v: &Value) -> Result<Self, ValueError> {
        match v.try_kind()? {
            Kind::IntValue(i) => Ok(*i),
            Kind::BigIntValue(_) => Err(ValueError::IntOutOfRange),
            _ => Err(v.mismatch("int")),
        }
    }
}

impl TryFrom<&Value> for i128 {
    type Error = ValueError;
    fn try_from(v: &Value) -> Result<Self, ValueError> {
        match v.try_kind()? {
            Kind::IntValue(i) => Ok(i128::from(*i)),
            Kind::BigIntValue(b) if b.len() <= 16 => {
                let fill = if b.first().is_some_and(|x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut buf = [fill; 16];
                buf[16 - b.len()..].copy_from_slice(b);
                Ok(i128::from_be_bytes(buf))
            }
            Kind::BigIntValue(_) => Err(ValueError::IntOutOfRange),
            _ => Err(v.mismatch("int")),
        }
    }
}

impl TryFrom<&Value> for f64 {
    type Error = ValueError;
    /// Python floats, and ints as Python's `float()` would take them when
    /// exact.
    fn try_from(v: &Value) -> Result<Self, ValueError> {
        match v.try_kind()? {
            Kind::DoubleValue(d) => Ok(*d),
            Kind::IntValue(i) if i.unsigned_abs() <= 1 << 53 => Ok(*i as f64),
            _ => Err(v.mismatch("float")),
        }
    }
}

impl TryFrom<&Value> for String {
    type Error = ValueError;
    fn try_from(v: &Value) -> Result<Self, ValueError> {
        match v.try_kind()? {
            Kind::StringValue(s) => Ok(s.clone()),
            _ => Err(v.mismatch("str")),
        }
    }
}

impl TryFrom<&Value> for Vec<u8> {
    type Error = ValueError;
    /// Python `bytes`.
    fn try_from(v: &Value) -> Result<Self, ValueError> {
        match v.try_kind()? {
            Kind::BytesValue(b) => Ok(b.clone()),
            _ => Err(v.mismatch("bytes")),
        }
    }
}

impl TryFrom<&Value> for Vec<Value> {
    type Error = ValueError;
    /// The items of a Python list or tuple.
    fn try_from(v: &Value) -> Result<Self, ValueError> {
        match v.try_kind()? {
            Kind::ListValue(l) | Kind::TupleValue(l) => Ok(l.items.clone()),
            _ => Err(v.mismatch("list or tuple")),
        }
    }
}

impl TryFrom<&Value> for Vec<(Value, Value)> {
    type Error = ValueError;
    /// The entries of a Python dict, in order.
    fn try_from(v: &Value) -> Result<Self, ValueError> {
        match v.try_kind()? {
            Kind::DictValue(d) => d
                .entries
                .iter()
                .map(|e| match (&e.key, &e.value) {
                    (Some(k), Some(v)) => Ok((k.clone(), v.clone())),
                    _ => Err(ValueError::IncompleteEntry),
                })
                .collect(),
            _ => Err(v.mismatch("dict")),
        }
    }
}

impl Parameter {
    /// A parameter binding `name` to `value`.
    pub fn new(name: impl Into<String>, value: impl Into<Value>) -> Self {
        Parameter {
            name: name.into(),
            value: Some(value.into()),
        }
    }
}

/// Prints a value as Python's `repr` would (numpy arrays and pickled objects
/// in a short descriptive form).
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(kind) = &self.kind else {
            return f.write_str("<empty value>");
        };
        match kind {
            Kind::NullValue(_) => f.write_str("None"),
            Kind::BoolValue(true) => f.write_str("True"),
            Kind::BoolValue(false) => f.write_str("False"),
            Kind::IntValue(i) => write!(f, "{i}"),
            Kind::BigIntValue(b) => write_big_int(f, b),
            Kind::DoubleValue(d) => write_float(f, *d),
            Kind::StringValue(s) => write_str_repr(f, s),
            Kind::BytesValue(b) => write_bytes_repr(f, b),
            Kind::ListValue(l) => write_items(f, "[", &l.items, "]", false),
            Kind::TupleValue(l) => write_items(f, "(", &l.items, ")", l.items.len() == 1),
            Kind::DictValue(d) => {
                f.write_str("{")?;
                for (i, e) in d.entries.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write_optional(f, &e.key)?;
                    f.write_str(": ")?;
                    write_optional(f, &e.value)?;
                }
                f.write_str("}")
            }
            Kind::ComplexValue(c) => write_complex(f, c),
            Kind::NdarrayValue(a) if a.shared.is_some() => {
                let shared = a.shared.as_ref().expect("matched");
                write!(
                    f,
                    "array(dtype='{}', shape={:?}, <{} bytes in shared memory {:?}>)",
                    a.dtype, a.shape, shared.length, shared.name
                )
            }
            Kind::NdarrayValue(a) if a.scalar => {
                write!(f, "numpy.{}(<{} bytes>)", a.dtype, a.data.len())
            }
            Kind::NdarrayValue(a) => write!(
                f,
                "array(dtype='{}', shape={:?}, <{} bytes>)",
                a.dtype,
                a.shape,
                a.data.len()
            ),
            Kind::PickleValue(p) => write!(f, "<pickled object, {} bytes>", p.len()),
        }
    }
}

fn write_optional(f: &mut fmt::Formatter<'_>, v: &Option<Value>) -> fmt::Result {
    match v {
        Some(v) => write!(f, "{v}"),
        None => f.write_str("<missing>"),
    }
}

fn write_items(
    f: &mut fmt::Formatter<'_>,
    open: &str,
    items: &[Value],
    close: &str,
    trailing_comma: bool,
) -> fmt::Result {
    f.write_str(open)?;
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{item}")?;
    }
    if trailing_comma {
        f.write_str(",")?;
    }
    f.write_str(close)
}

fn write_float(f: &mut fmt::Formatter<'_>, d: f64) -> fmt::Result {
    if d.is_nan() {
        return f.write_str("nan");
    }
    if d.is_infinite() {
        return f.write_str(if d > 0.0 { "inf" } else { "-inf" });
    }
    // Python's repr: shortest round-trip digits, with an exponent outside
    // 1e-4 <= |d| < 1e16, and a ".0" on integral values.
    let magnitude = d.abs();
    if magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude) {
        let text = format!("{d:e}");
        let (mantissa, exponent) = text.split_once('e').expect("{:e} has an exponent");
        let (sign, digits) = match exponent.strip_prefix('-') {
            Some(digits) => ('-', digits),
            None => ('+', exponent),
        };
        return write!(f, "{mantissa}e{sign}{digits:0>2}");
    }
    if d == d.trunc() {
        write!(f, "{d:.1}")
    } else {
        write!(f, "{d}")
    }
}

/// A float as Python prints it inside a complex: no ".0" on integral
/// values.
fn write_complex_part(f: &mut fmt::Formatter<'_>, d: f64) -> fmt::Result {
    if d.is_finite() && d == d.trunc() && d.abs() < 1e16 {
        write!(f, "{d}")
    } else {
        write_float(f, d)
    }
}

fn write_complex(f: &mut fmt::Formatter<'_>, c: &Complex) -> fmt::Result {
    let (real, imag) = (c.real.unwrap_or(0.0), c.imag.unwrap_or(0.0));
    if real == 0.0 && real.is_sign_positive() {
        write_complex_part(f, imag)?;
        return f.write_str("j");
    }
    f.write_str("(")?;
    write_complex_part(f, real)?;
    if !imag.is_sign_negative() || imag.is_nan() {
        f.write_str("+")?;
    }
    write_complex_part(f, imag)?;
    f.write_str("j)")
}

fn write_str_repr(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    write!(f, "{quote}")?;
    for c in s.chars() {
        match c {
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if c == quote => write!(f, "\\{c}")?,
            c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(f, "\\x{:02x}", c as u32)?,
            c => write!(f, "{c}")?,
        }
    }
    write!(f, "{quote}")
}

fn write_bytes_repr(f: &mut fmt::Formatter<'_>, b: &[u8]) -> fmt::Result {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        b'"'
    } else {
        b'\''
    };
    write!(f, "b{}", quote as char)?;
    for &c in b {
        match c {
            b'\\' => f.write_str("\\\\")?,
            b'\n' => f.write_str("\\n")?,
            b'\r' => f.write_str("\\r")?,
            b'\t' => f.write_str("\\t")?,
            c if c == quote => write!(f, "\\{}", c as char)?,
            0x20..=0x7e => write!(f, "{}", c as char)?,
            c => write!(f, "\\x{c:02x}")?,
        }
    }
    write!(f, "{}", quote as char)
}

/// Prints a two's complement big-endian integer in decimal.
fn write_big_int(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    // Magnitude as big-endian bytes.
    let mut magnitude: Vec<u8> = if negative {
        let mut m: Vec<u8> = bytes.iter().map(|b| !b).collect();
        for byte in m.iter_mut().rev() {
            let (sum, carry) = byte.overflowing_add(1);
            *byte = sum;
            if !carry {
                break;
            }
        }
        m
    } else {
        bytes.to_vec()
    };
    // Repeated division by 10^19 gives decimal chunks, least significant first.
    const CHUNK: u64 = 10_000_000_000_000_000_000;
    let mut chunks = Vec::new();
    while magnitude.iter().any(|&b| b != 0) {
        let mut rem: u128 = 0;
        for byte in magnitude.iter_mut() {
            let cur = (rem << 8) | u128::from(*byte);
            *byte = (cur / u128::from(CHUNK)) as u8;
            rem = cur % u128::from(CHUNK);
        }
        chunks.push(rem as u64);
    }
    if negative {
        f.write_str("-")?;
    }
    match chunks.split_last() {
        None => f.write_str("0"),
        Some((top, rest)) => {
            write!(f, "{top}")?;
            for chunk in rest.iter().rev() {
                write!(f, "{chunk:019}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_8_ints_take_the_small_form_when_they_fit() {
        assert_eq!(Value::from(5u64).kind, Some(Kind::IntValue(5)));
        assert_eq!(Value::from(-1i128).kind, Some(Kind::IntValue(-1)));
        assert_eq!(
            Value::from(u64::MAX).kind,
            Some(Kind::BigIntValue(vec![
                0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ]))
        );
        assert_eq!(
            Value::big_int(&[0xff, 0xff, 0x80]).kind,
            Some(Kind::IntValue(-128))
        );
    }

    #[test]
    fn rule_8_big_ints_round_trip_through_i128() {
        for n in [i128::MIN, i128::MAX, 1 << 64, -(1 << 64) - 7, 0, -1, 42] {
            assert_eq!(i128::try_from(&Value::from(n)).unwrap(), n);
        }
    }

    #[test]
    fn big_ints_print_in_decimal() {
        assert_eq!(Value::from(i128::MAX).to_string(), i128::MAX.to_string());
        assert_eq!(Value::from(i128::MIN).to_string(), i128::MIN.to_string());
        assert_eq!(Value::from(u64::MAX).to_string(), "18446744073709551615");
    }

    #[test]
    fn display_reads_like_python_repr() {
        let v = Value::dict([
            (Value::from("a"), Value::from(1)),
            (
                Value::tuple([Value::from(1)]),
                Value::list([Value::from(f64::NAN), Value::from(2.0)]),
            ),
            (Value::from(3), Value::complex(1.0, -2.0)),
            (Value::none(), Value::bytes(b"x'\n".to_vec())),
        ]);
        assert_eq!(
            v.to_string(),
            r#"{'a': 1, (1,): [nan, 2.0], 3: (1-2j), None: b"x'\n"}"#
        );
        assert_eq!(Value::complex(0.0, 1.5).to_string(), "1.5j");
        assert_eq!(Value::complex(1.0, -0.0).to_string(), "(1-0j)");
        assert_eq!(Value::from(1e16).to_string(), "1e+16");
        assert_eq!(Value::from(1.5e-5).to_string(), "1.5e-05");
        assert_eq!(Value::from(-2.5e300).to_string(), "-2.5e+300");
        assert_eq!(Value::from(0.0001).to_string(), "0.0001");
        assert_eq!(Value::from(-0.0).to_string(), "-0.0");
        assert_eq!(Value::from(false).to_string(), "False");
    }

    #[test]
    fn reading_the_wrong_type_names_both_types() {
        let err = i64::try_from(&Value::from("x")).unwrap_err();
        assert_eq!(err.to_string(), "expected int, found str");
        assert_eq!(
            bool::try_from(&Value::default()).unwrap_err(),
            ValueError::Empty
        );
    }
}
