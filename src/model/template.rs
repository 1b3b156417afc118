//! Chat templates, rendered with minijinja the way `transformers`' `apply_chat_template` renders
//! them with Jinja2: `trim_blocks` and `lstrip_blocks` on, `raise_exception`, HF's `tojson`
//! (`ensure_ascii=False`, `indent`, `separators`, `sort_keys`), `strftime_now`, Python string
//! and dict methods (`.strip()`, `.startswith()`, `.split()`, `.get()`, `.items()` via
//! minijinja-contrib's pycompat), and the context HF passes: `messages`, `tools`, `documents`,
//! `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...) and extra
//! keyword arguments (`date_string`, `enable_thinking`, ...).
//!
//! A template is compiled once per model and rendered per request; every failure is a
//! [`TemplateError`], which the HTTP/WS layer answers with a 400.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value as Json;

use super::tokenizer::Tokenizer;

mod json;
mod time;

const NAME: &str = "chat_template";

/// Why a chat template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("the model has no chat template")]
    Missing,
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// The template called `raise_exception(message)`.
    #[error("{0}")]
    Raised(String),
    #[error("chat template failed: {0}")]
    Render(String),
}

/// The special tokens a template sees, as strings (absent ones are undefined, as in HF).
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// What one rendering gets besides the template.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions<'a> {
    /// Append the header that starts the assistant's turn.
    pub add_generation_prompt: bool,
    /// OpenAI-style tool definitions (`None` renders as `none`, as HF passes it).
    pub tools: Option<&'a Json>,
    /// RAG documents, for the templates that use them.
    pub documents: Option<&'a Json>,
    /// Further keyword arguments (an object), e.g. `{"date_string": "26 Jul 2024"}`.
    pub extra: Option<&'a serde_json::Map<String, Json>>,
}

/// A compiled chat template plus the special tokens it renders with.
pub struct ChatTemplate {
    env: Environment<'static>,
    tokens: SpecialTokens,
}

impl ChatTemplate {
    /// Compiles `source`; `clock` gives the Unix time `strftime_now` formats (UTC).
    pub fn with_clock(
        source: &str,
        tokens: SpecialTokens,
        clock: fn() -> i64,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| TemplateError::Compile(e.to_string()))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(python_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_function(
            "strftime_now",
            move |fmt: String| -> Result<String, Error> {
                time::strftime(&fmt, clock())
                    .map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
            },
        );
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        Ok(Self { env, tokens })
    }

    /// Compiles `source` with the system clock.
    pub fn new(source: &str, tokens: SpecialTokens) -> Result<Self, TemplateError> {
        Self::with_clock(source, tokens, time::unix_now)
    }

    /// The tokenizer's template called `name` (`None`: the default one).
    pub fn from_tokenizer(tok: &Tokenizer, name: Option<&str>) -> Result<Self, TemplateError> {
        let source = tok.chat_template(name).ok_or(TemplateError::Missing)?;
        Self::new(source, special_tokens(tok))
    }

    /// Renders `messages` (a JSON array of `{role, content}`, content a string or a list of
    /// `{type: "text", text}` parts, plus whatever else the template reads).
    pub fn render(
        &self,
        messages: &Json,
        opts: &RenderOptions<'_>,
    ) -> Result<String, TemplateError> {
        let tpl = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        let mut ctx = serde_json::Map::new();
        if let Some(extra) = opts.extra {
            ctx.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("tools".into(), opts.tools.cloned().unwrap_or(Json::Null));
        ctx.insert(
            "documents".into(),
            opts.documents.cloned().unwrap_or(Json::Null),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(opts.add_generation_prompt),
        );
        let t = &self.tokens;
        for (k, v) in [
            ("bos_token", &t.bos_token),
            ("eos_token", &t.eos_token),
            ("pad_token", &t.pad_token),
            ("unk_token", &t.unk_token),
        ] {
            if let Some(v) = v {
                ctx.insert(k.into(), Json::String(v.clone()));
            }
        }
        tpl.render(Value::from(minijinja::value::Serde(Json::Object(ctx))))
            .map_err(|e| classify(&e))
    }
}

/// The tokens a tokenizer's config names.
pub fn special_tokens(tok: &Tokenizer) -> SpecialTokens {
    SpecialTokens {
        bos_token: tok.bos_token().map(str::to_string),
        eos_token: tok.eos_token().map(str::to_string),
        pad_token: tok.pad_token().map(str::to_string),
        unk_token: tok.unk_token().map(str::to_string),
    }
}

/// Prints values the way Jinja2 prints Python objects where minijinja differs: `None`,
/// `True`, `False` (an assistant turn with `content: null` renders "None" in HF).
fn python_formatter(
    out: &mut minijinja::Output,
    state: &mut minijinja::State,
    value: &Value,
) -> Result<(), Error> {
    let word = if value.is_none() {
        "None"
    } else if value.kind() == minijinja::value::ValueKind::Bool {
        if value.is_true() {
            "True"
        } else {
            "False"
        }
    } else {
        return minijinja::escape_formatter(out, state, value);
    };
    out.write_str(word).map_err(Error::from)
}

/// Marker on errors raised by `raise_exception`, so they reach the client verbatim.
const RAISED: &str = "\u{1}raised:";

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_i64() {
            Some(n) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            None => v.as_str().map(str::to_string),
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "separators must be a pair",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let style = json::Style {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    Ok(Value::from(json::dumps(&json, &style)))
}

fn classify(e: &Error) -> TemplateError {
    if let Some(detail) = e.detail() {
        if let Some(msg) = detail.strip_prefix(RAISED) {
            return TemplateError::Raised(msg.to_string());
        }
    }
    TemplateError::Render(describe(e))
}

/// The error with its line, and the causes beneath it (one line).
fn describe(e: &Error) -> String {
    let mut s = match (e.detail(), e.line()) {
        (Some(d), Some(l)) => format!("{}: {d} (line {l})", e.kind()),
        (Some(d), None) => format!("{}: {d}", e.kind()),
        (None, Some(l)) => format!("{} (line {l})", e.kind()),
        (None, None) => e.kind().to_string(),
    };
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string().replace(RAISED, ""));
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, msgs: Json) -> Result<String, TemplateError> {
        let t = ChatTemplate::with_clock(src, SpecialTokens::default(), || 1_721_952_000)?;
        t.render(&msgs, &RenderOptions::default())
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let e = render(
            "{{ raise_exception('bad role ' + messages[0].role) }}",
            json!([{"role": "x"}]),
        );
        assert_eq!(e, Err(TemplateError::Raised("bad role x".into())));
    }

    #[test]
    fn strftime_now_uses_the_clock() {
        let out = render("{{ strftime_now('%d %b %Y %H:%M') }}", json!([]));
        assert_eq!(out.as_deref(), Ok("26 Jul 2024 00:00"));
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let msgs = json!([{"b": 1, "a": [1.0, "é\n\"", null, true], "c": {}}]);
        let out = render("{{ messages[0] | tojson }}", msgs.clone());
        assert_eq!(
            out.as_deref(),
            Ok(r#"{"b": 1, "a": [1.0, "é\n\"", null, true], "c": {}}"#)
        );
        let out = render(
            "{{ messages[0] | tojson(indent=2, sort_keys=true) }}",
            msgs.clone(),
        );
        assert_eq!(
            out.as_deref(),
            Ok("{\n  \"a\": [\n    1.0,\n    \"é\\n\\\"\",\n    null,\n    true\n  ],\n  \"b\": 1,\n  \"c\": {}\n}")
        );
        let out = render(
            "{{ messages[0].a | tojson(ensure_ascii=true, separators=[',', ':']) }}",
            msgs,
        );
        assert_eq!(out.as_deref(), Ok(r#"[1.0,"\u00e9\n\"",null,true]"#));
    }

    #[test]
    fn python_methods_and_whitespace_control() {
        let src = "{% for m in messages %}\n  {{ m.content.strip().upper() }}\n  {% if m.content.startswith(' a') %}yes{% endif %}\n{% endfor %}";
        let out = render(src, json!([{"content": " ab "}]));
        assert_eq!(out.as_deref(), Ok("  AB\nyes"));
    }

    #[test]
    fn none_and_booleans_print_like_jinja2() {
        let src = "{{ messages[0].content }}|{{ messages[0].x }}|{{ true }}|{{ 1 == 2 }}|{{ messages | length }}";
        let out = render(src, json!([{"content": null, "x": true}]));
        assert_eq!(out.as_deref(), Ok("None|True|True|False|1"));
    }

    #[test]
    fn compile_errors_are_reported() {
        assert!(matches!(
            ChatTemplate::new("{% if %}", SpecialTokens::default()),
            Err(TemplateError::Compile(_))
        ));
    }
}
