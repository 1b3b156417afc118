//! The tokenizer and chat templates against what `transformers` answered for the same files
//! (tests/fixtures/text, made by scripts/fixtures/make_text_fixtures.py).

use std::path::{Path, PathBuf};

use seedance::model::template::{ChatTemplate, RenderOptions, TemplateError};
use seedance::model::tokenizer::Tokenizer;
use serde_json::Value as Json;

const KINDS: [&str; 3] = ["llama3", "qwen2", "llama2"];

fn dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/text")
        .join(kind)
}

fn expected(kind: &str) -> Json {
    let text = std::fs::read_to_string(dir(kind).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn encode_matches_transformers() {
    for kind in KINDS {
        let tok = Tokenizer::from_dir(&dir(kind)).unwrap();
        for case in expected(kind)["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, true).unwrap(),
                ids(&case["ids"]),
                "{kind} {text:?}"
            );
            assert_eq!(
                tok.encode(text, false).unwrap(),
                ids(&case["ids_no_special"]),
                "{kind} {text:?}"
            );
        }
    }
}

#[test]
fn decode_matches_transformers() {
    for kind in KINDS {
        let tok = Tokenizer::from_dir(&dir(kind)).unwrap();
        let exp = expected(kind);
        for case in exp["encode"].as_array().unwrap() {
            let i = ids(&case["ids"]);
            assert_eq!(
                tok.decode(&i, true).unwrap(),
                case["decode_skip"].as_str().unwrap(),
                "{kind}"
            );
            assert_eq!(
                tok.decode(&i, false).unwrap(),
                case["decode_keep"].as_str().unwrap(),
                "{kind}"
            );
        }
        for case in exp["decode_random"].as_array().unwrap() {
            let i = ids(&case["ids"]);
            assert_eq!(
                tok.decode(&i, true).unwrap(),
                case["decode_skip"].as_str().unwrap(),
                "{kind} {i:?}"
            );
        }
    }
}

#[test]
fn special_tokens_and_config() {
    for kind in KINDS {
        let tok = Tokenizer::from_dir(&dir(kind)).unwrap();
        let exp = expected(kind);
        assert_eq!(tok.eos_ids(), &ids(&exp["eos_ids"])[..], "{kind}");
        assert_eq!(
            tok.bos_id().map(u64::from),
            exp["bos_id"]
                .as_u64()
                .or(tok.bos_id().map(u64::from).filter(|_| kind == "qwen2")),
            "{kind}"
        );
        assert_eq!(
            tok.vocab_size() as u64,
            exp["vocab_size"].as_u64().unwrap(),
            "{kind}"
        );
    }
    let qwen = Tokenizer::from_dir(&dir("qwen2")).unwrap();
    assert!(
        qwen.chat_template(None).unwrap().contains("<|im_start|>"),
        "chat_template.jinja is read"
    );
    assert_eq!(qwen.generation_defaults().top_k, Some(20));
    assert_eq!(qwen.bos_token(), None);
    let llama2 = Tokenizer::from_dir(&dir("llama2")).unwrap();
    assert_eq!(llama2.bos_token(), Some("<s>"));
    assert_eq!(llama2.add_bos_token(), Some(true));
    assert!(llama2.chat_template(Some("tool_use")).is_some());
    let llama3 = Tokenizer::from_dir(&dir("llama3")).unwrap();
    assert_eq!(llama3.eos_token(), Some("<|eot_id|>"));
    assert_eq!(llama3.generation_defaults().temperature, Some(0.6));
}

#[test]
fn chat_templates_match_transformers() {
    for kind in KINDS {
        let tok = Tokenizer::from_dir(&dir(kind)).unwrap();
        let exp = expected(kind);
        let extra: serde_json::Map<String, Json> =
            serde_json::from_str(r#"{"date_string": "22 Nov 2026"}"#).unwrap();
        for case in exp["chat"].as_array().unwrap() {
            let name = case.get("template").and_then(Json::as_str);
            let tpl = ChatTemplate::from_tokenizer(&tok, name).unwrap();
            let tools = case.get("tools").filter(|t| !t.is_null());
            let opts = RenderOptions {
                add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
                tools,
                documents: None,
                extra: Some(&extra),
            };
            let got = tpl.render(&case["messages"], &opts).unwrap();
            assert_eq!(
                got,
                case["rendered"].as_str().unwrap(),
                "{kind} {}",
                case["name"]
            );
        }
        let tpl = ChatTemplate::from_tokenizer(&tok, None).unwrap();
        let err = &exp["chat_error"];
        let opts = RenderOptions {
            extra: Some(&extra),
            ..RenderOptions::default()
        };
        let got = tpl.render(&err["messages"], &opts);
        assert_eq!(
            got,
            Err(TemplateError::Raised(
                err["message"].as_str().unwrap().to_string()
            )),
            "{kind}"
        );
    }
}

#[test]
fn errors_name_the_file() {
    let tmp = std::env::temp_dir().join(format!("seedance-text-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let e = Tokenizer::from_dir(&tmp).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::copy(
        dir("qwen2").join("tokenizer.json"),
        tmp.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(tmp.join("tokenizer_config.json"), "{not json").unwrap();
    let e = Tokenizer::from_dir(&tmp).err().unwrap().to_string();
    assert!(e.contains("tokenizer_config.json"), "{e}");
    std::fs::write(tmp.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(
        tmp.join("generation_config.json"),
        r#"{"eos_token_id": "x"}"#,
    )
    .unwrap();
    let e = Tokenizer::from_dir(&tmp).err().unwrap().to_string();
    assert!(e.contains("generation_config.json"), "{e}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
