//! Python's `json.dumps`, as HF's `tojson` filter calls it: key order kept (or sorted), Python's
//! separators and indentation, Python's float repr, `ensure_ascii` optional.

use std::fmt::Write;

use serde_json::Value as Json;

pub(super) struct Style {
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

pub(super) fn dumps(v: &Json, style: &Style) -> String {
    let mut out = String::new();
    write_value(v, style, 0, &mut out);
    out
}

fn newline(style: &Style, depth: usize, out: &mut String) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

fn write_value(v: &Json, style: &Style, depth: usize, out: &mut String) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => write_number(n, out),
        Json::String(s) => write_str(s, style.ensure_ascii, out),
        Json::Array(items) if items.is_empty() => out.push_str("[]"),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(style, depth + 1, out);
                write_value(item, style, depth + 1, out);
            }
            newline(style, depth, out);
            out.push(']');
        }
        Json::Object(map) if map.is_empty() => out.push_str("{}"),
        Json::Object(map) => {
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(style, depth + 1, out);
                write_str(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_value(item, style, depth + 1, out);
            }
            newline(style, depth, out);
            out.push('}');
        }
    }
}

fn write_number(n: &serde_json::Number, out: &mut String) {
    if n.is_f64() {
        if let Some(f) = n.as_f64() {
            write_float(f, out);
            return;
        }
    }
    let _ = write!(out, "{n}");
}

/// Python's `float.__repr__`: shortest round-trip digits, exponent form when the decimal
/// exponent is below -4 or at least 16 (`1e-05`, `1e+16`), else positional with `.0`.
fn write_float(f: f64, out: &mut String) {
    if f.is_nan() {
        out.push_str("NaN");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
        return;
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        out.push_str(&s);
        if !s.contains('.') {
            out.push_str(".0");
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(out, "{mantissa}e{sign}{:02}", exp.abs());
    }
}

fn write_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_like_python() {
        let cases = [
            (1e20, "1e+20"),
            (1e-5, "1e-05"),
            (0.1, "0.1"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (1e16, "1e+16"),
            (1.5e15, "1500000000000000.0"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
        ];
        for (f, want) in cases {
            let mut s = String::new();
            write_float(f, &mut s);
            assert_eq!(s, want);
        }
    }
}
