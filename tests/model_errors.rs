//! A bad checkpoint fails with one line naming the file and the tensor or field.

use seedance::backend::cpu::CpuBackend;
use seedance::model::transformer::Transformer;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn copy_to_tmp(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!(
        "seedance-model-errors-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    match Transformer::load(dir, Box::new(CpuBackend::new(1))) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn missing_file() {
    let d = copy_to_tmp("llama", "missing");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.safetensors") && !e.contains('\n'), "{e}");
}

#[test]
fn truncated_file() {
    let d = copy_to_tmp("llama", "trunc");
    let p = d.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn missing_shard_and_wrong_shape() {
    let d = copy_to_tmp("llama-sharded", "shard");
    std::fs::remove_file(d.join("model-00002-of-00005.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("model-00002-of-00005.safetensors"), "{e}");
    let d = copy_to_tmp("llama", "shape");
    edit_config(&d, |v| v["intermediate_size"] = 100.into());
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("gate_proj.weight") && e.contains("[96, 64]"),
        "{e}"
    );
}

#[test]
fn missing_tensor_field_and_arch() {
    let d = copy_to_tmp("llama", "tensor");
    edit_config(&d, |v| v["tie_word_embeddings"] = false.into());
    let d2 = copy_to_tmp("qwen2", "tied");
    edit_config(&d2, |v| v["tie_word_embeddings"] = false.into());
    let e = load_err(&d2);
    assert!(
        e.contains("lm_head.weight") && e.contains("model.safetensors"),
        "{e}"
    );
    edit_config(&d, |v| {
        v.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("num_hidden_layers"),
        "{e}"
    );
    edit_config(&d, |v| {
        v["architectures"] = serde_json::json!(["FalconForCausalLM"])
    });
    let e = load_err(&d);
    assert!(e.contains("FalconForCausalLM"), "{e}");
}
