//! Python literals on the command line (`--param a=1`, `--param vis='x.ms'`),
//! read the way `ast.literal_eval` reads them: None, True, False, ints of
//! any size (decimal, 0x, 0o, 0b, underscores), floats (with inf and nan
//! as `float('inf')`-style names `inf`/`nan`), complex (`1+2j`), strings
//! and bytes with escapes, and lists, tuples, dicts and sets... of these.

use casa_node_protocol::pb::Value;
use thiserror::Error;

/// A string that is not a Python literal.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("not a Python literal at column {column}: {message}")]
pub struct LiteralError {
    /// 1-based column of the problem.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// Parses one Python literal.
pub fn parse(text: &str) -> Result<Value, LiteralError> {
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
    };
    let value = p.value(0)?;
    p.skip_space();
    if p.pos < p.chars.len() {
        return Err(p.error("unexpected text after the value"));
    }
    Ok(value)
}

const MAX_DEPTH: usize = 64;

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn error(&self, message: &str) -> LiteralError {
        LiteralError {
            column: self.pos + 1,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, LiteralError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.skip_space();
        let Some(c) = self.peek() else {
            return Err(self.error("a value is missing"));
        };
        match c {
            '[' => {
                self.pos += 1;
                let items = self.items(']', depth)?.0;
                Ok(Value::list(items))
            }
            '(' => {
                self.pos += 1;
                let (items, trailing_comma) = self.items(')', depth)?;
                if items.len() == 1 && !trailing_comma {
                    Ok(items.into_iter().next().expect("one item"))
                } else {
                    Ok(Value::tuple(items))
                }
            }
            '{' => {
                self.pos += 1;
                self.dict(depth)
            }
            '\'' | '"' => self.string(false),
            _ if c.is_ascii_digit() || c == '.' || c == '-' || c == '+' => self.number(),
            _ if c.is_alphabetic() || c == '_' => {
                let start = self.pos;
                while self.peek().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    self.pos += 1;
                }
                let word: String = self.chars[start..self.pos].iter().collect();
                match word.as_str() {
                    "None" => Ok(Value::none()),
                    "True" => Ok(true.into()),
                    "False" => Ok(false.into()),
                    "inf" => Ok(f64::INFINITY.into()),
                    "nan" => Ok(f64::NAN.into()),
                    "b" | "B" if matches!(self.peek(), Some('\'' | '"')) => self.string(true),
                    _ => {
                        self.pos = start;
                        Err(self.error(&format!("{word} is a name, not a literal; quote strings")))
                    }
                }
            }
            _ => Err(self.error(&format!("unexpected {c:?}"))),
        }
    }

    /// Items up to `close`; also whether a comma ended the list.
    fn items(&mut self, close: char, depth: usize) -> Result<(Vec<Value>, bool), LiteralError> {
        let mut items = Vec::new();
        let mut trailing_comma = false;
        loop {
            if self.eat(close) {
                return Ok((items, trailing_comma));
            }
            items.push(self.value(depth + 1)?);
            trailing_comma = self.eat(',');
            if !trailing_comma {
                if self.eat(close) {
                    return Ok((items, false));
                }
                return Err(self.error(&format!("expected ',' or {close:?}")));
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Result<Value, LiteralError> {
        let mut entries = Vec::new();
        loop {
            if self.eat('}') {
                return Ok(Value::dict(entries));
            }
            let key = self.value(depth + 1)?;
            if !self.eat(':') {
                return Err(self.error("expected ':' after a dict key (sets are not supported)"));
            }
            let value = self.value(depth + 1)?;
            entries.push((key, value));
            if !self.eat(',') {
                if self.eat('}') {
                    return Ok(Value::dict(entries));
                }
                return Err(self.error("expected ',' or '}'"));
            }
        }
    }

    fn string(&mut self, bytes: bool) -> Result<Value, LiteralError> {
        let quote = self.peek().expect("called at a quote");
        let triple = self.chars.get(self.pos..self.pos + 3) == Some(&[quote, quote, quote]);
        self.pos += if triple { 3 } else { 1 };
        let mut out: Vec<u32> = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("unterminated string"));
            };
            if c == quote {
                if !triple {
                    self.pos += 1;
                    break;
                }
                if self.chars.get(self.pos..self.pos + 3) == Some(&[quote, quote, quote]) {
                    self.pos += 3;
                    break;
                }
            }
            if c == '\n' && !triple {
                return Err(self.error("unterminated string"));
            }
            self.pos += 1;
            if c != '\\' {
                if bytes && !c.is_ascii() {
                    return Err(self.error("bytes literals hold ASCII characters only"));
                }
                out.push(c as u32);
                continue;
            }
            let Some(e) = self.peek() else {
                return Err(self.error("unterminated escape"));
            };
            self.pos += 1;
            let code = match e {
                'n' => 10,
                't' => 9,
                'r' => 13,
                '0'..='7' => {
                    let mut v = e.to_digit(8).expect("octal digit");
                    for _ in 0..2 {
                        match self.peek().and_then(|d| d.to_digit(8)) {
                            Some(d) => {
                                v = v * 8 + d;
                                self.pos += 1;
                            }
                            None => break,
                        }
                    }
                    v
                }
                'x' => self.hex_escape(2)?,
                'u' if !bytes => self.hex_escape(4)?,
                'U' if !bytes => self.hex_escape(8)?,
                'a' => 7,
                'b' => 8,
                'f' => 12,
                'v' => 11,
                '\n' => continue,
                '\\' | '\'' | '"' => e as u32,
                other => {
                    out.push('\\' as u32);
                    other as u32
                }
            };
            out.push(code);
        }
        if bytes {
            let data: Result<Vec<u8>, _> = out.into_iter().map(u8::try_from).collect();
            return data
                .map(Value::bytes)
                .map_err(|_| self.error("byte value out of range"));
        }
        let text: Option<String> = out.into_iter().map(char::from_u32).collect();
        text.map(Value::from)
            .ok_or_else(|| self.error("invalid character escape"))
    }

    fn hex_escape(&mut self, digits: usize) -> Result<u32, LiteralError> {
        let end = self.pos + digits;
        let text: String = self
            .chars
            .get(self.pos..end)
            .unwrap_or_default()
            .iter()
            .collect();
        if text.len() != digits {
            return Err(self.error("truncated escape"));
        }
        let value = u32::from_str_radix(&text, 16).map_err(|_| self.error("invalid hex escape"))?;
        self.pos = end;
        Ok(value)
    }

    /// A number, possibly signed, possibly complex (`1+2j`, `3j`).
    fn number(&mut self) -> Result<Value, LiteralError> {
        let first = self.real()?;
        self.skip_space();
        match (first, self.peek()) {
            (Number::Imag(im), _) => Ok(Value::complex(0.0, im)),
            (real, Some(sign @ ('+' | '-'))) => {
                let save = self.pos;
                self.pos += 1;
                self.skip_space();
                match self.real() {
                    Ok(Number::Imag(im)) => {
                        let im = if sign == '-' { -im } else { im };
                        Ok(Value::complex(real.as_f64(), im))
                    }
                    _ => {
                        self.pos = save;
                        Err(self.error("only a complex number may add or subtract"))
                    }
                }
            }
            (Number::Int(i), _) => Ok(i),
            (Number::Float(f), _) => Ok(f.into()),
        }
    }

    fn real(&mut self) -> Result<Number, LiteralError> {
        let start = self.pos;
        let mut negative = false;
        while let Some(c @ ('+' | '-')) = self.peek() {
            negative ^= c == '-';
            self.pos += 1;
            self.skip_space();
        }
        let body_start = self.pos;
        while self.peek().is_some_and(|c| {
            c.is_ascii_alphanumeric()
                || c == '.'
                || c == '_'
                || ((c == '+' || c == '-')
                    && matches!(self.chars.get(self.pos.wrapping_sub(1)), Some('e' | 'E'))
                    && !self.hex_body(body_start))
        }) {
            self.pos += 1;
        }
        let body: String = self.chars[body_start..self.pos]
            .iter()
            .filter(|&&c| c != '_')
            .collect();
        let fail = |p: &mut Parser| {
            p.pos = start;
            Err(p.error("invalid number"))
        };
        if body.is_empty() {
            return fail(self);
        }
        let sign = if negative { -1.0 } else { 1.0 };
        if let Some(im) = body.strip_suffix(['j', 'J']) {
            return match im.parse::<f64>() {
                Ok(v) if !im.is_empty() && !im.starts_with(['i', 'n', 'I', 'N']) => {
                    Ok(Number::Imag(sign * v))
                }
                _ => fail(self),
            };
        }
        let lower = body.to_ascii_lowercase();
        let radix = match lower.get(..2) {
            Some("0x") => Some(16),
            Some("0o") => Some(8),
            Some("0b") => Some(2),
            _ => None,
        };
        if let Some(radix) = radix {
            return match parse_big(&lower[2..], radix, negative) {
                Some(v) => Ok(Number::Int(v)),
                None => fail(self),
            };
        }
        if lower.bytes().all(|b| b.is_ascii_digit()) {
            if lower.len() > 1 && lower.starts_with('0') && lower.bytes().any(|b| b != b'0') {
                return fail(self);
            }
            return match parse_big(&lower, 10, negative) {
                Some(v) => Ok(Number::Int(v)),
                None => fail(self),
            };
        }
        if lower.starts_with(['i', 'n']) {
            return fail(self);
        }
        match lower.parse::<f64>() {
            Ok(v) => Ok(Number::Float(sign * v)),
            Err(_) => fail(self),
        }
    }

    fn hex_body(&self, start: usize) -> bool {
        matches!(self.chars.get(start..start + 2), Some(['0', 'x' | 'X']))
    }
}

enum Number {
    Int(Value),
    Float(f64),
    Imag(f64),
}

impl Number {
    fn as_f64(&self) -> f64 {
        match self {
            Number::Int(v) => f64::try_from(v).unwrap_or(f64::NAN),
            Number::Float(f) | Number::Imag(f) => *f,
        }
    }
}

/// Parses digits of any length in `radix` into an int `Value`.
fn parse_big(digits: &str, radix: u32, negative: bool) -> Option<Value> {
    if digits.is_empty() {
        return None;
    }
    // Magnitude as little-endian base-256 limbs.
    let mut limbs: Vec<u8> = vec![0];
    for c in digits.chars() {
        let mut carry = c.to_digit(radix)?;
        for limb in limbs.iter_mut() {
            let v = u32::from(*limb) * radix + carry;
            *limb = (v & 0xff) as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            limbs.push((carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    // Two's complement, big-endian, with room for the sign bit.
    limbs.push(0);
    if negative {
        let mut carry = 1u16;
        for limb in limbs.iter_mut() {
            let v = u16::from(!*limb) + carry;
            *limb = (v & 0xff) as u8;
            carry = v >> 8;
        }
    }
    limbs.reverse();
    Some(Value::big_int(&limbs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repr(text: &str) -> String {
        parse(text).unwrap().to_string()
    }

    #[test]
    fn literals_read_as_python_reads_them() {
        for (text, expected) in [
            ("1", "1"),
            ("-42", "-42"),
            ("1_000", "1000"),
            ("0x_ff", "255"),
            ("-0b101", "-5"),
            ("2.5", "2.5"),
            ("-1e3", "-1000.0"),
            (".5", "0.5"),
            ("1e-5", "1e-05"),
            ("inf", "inf"),
            ("nan", "nan"),
            ("3j", "3j"),
            ("1+2j", "(1+2j)"),
            ("1.5 - 2j", "(1.5-2j)"),
            ("None", "None"),
            ("True", "True"),
            ("'x.ms'", "'x.ms'"),
            ("\"it's\"", "\"it's\""),
            ("'a\\nb\\x41\\u00e9'", "'a\\nbAé'"),
            ("b'\\x00ab'", "b'\\x00ab'"),
            ("[1, 'a', [None]]", "[1, 'a', [None]]"),
            ("(1,)", "(1,)"),
            ("(1)", "1"),
            ("()", "()"),
            ("{'vis': 'x.ms', 1: (2, 3)}", "{'vis': 'x.ms', 1: (2, 3)}"),
            ("[1, 2,]", "[1, 2]"),
        ] {
            assert_eq!(repr(text), expected, "{text}");
        }
    }

    #[test]
    fn rule_8_big_ints_keep_every_digit() {
        assert_eq!(
            repr("123456789012345678901234567890"),
            "123456789012345678901234567890"
        );
        assert_eq!(
            repr("-340282366920938463463374607431768211456"),
            "-340282366920938463463374607431768211456"
        );
        assert_eq!(repr("9223372036854775807"), "9223372036854775807");
        assert_eq!(repr("-9223372036854775808"), "-9223372036854775808");
        assert_eq!(repr("9223372036854775808"), "9223372036854775808");
    }

    #[test]
    fn names_and_garbage_are_clear_errors() {
        let e = parse("flagdata").unwrap_err();
        assert!(e.message.contains("quote strings"), "{e}");
        for bad in [
            "", "[1, 2", "'open", "1 2", "{1}", "01", "0x", "1+", "--", "a+b", "{'a' 1}",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse(&deep).is_err());
    }
}
