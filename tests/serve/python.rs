//! Python clients against the server: the official `openai` package (base64 by default, and
//! floats) and schemathesis against `/openapi.json`. CI installs both (.ci/run) into
//! `.ci-venv`; under CI=1 a missing one is a failure, elsewhere a skip with a message.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{minilm, ok, run};
use crate::harness::{assert_same, floats, repo, sentences, task1, tiny, Server, ENGLISH};
use crate::predict::tiny_checkpoint;

/// A Python that can import `module`: $FETCH_ML_PYTHON, or .ci-venv's.
fn python_with(module: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("FETCH_ML_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([repo(".ci-venv/bin/python")])
        .collect();
    for py in &candidates {
        let found = Command::new(py)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return Some(py.clone());
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but no Python with {module} was found (tried {candidates:?}); .ci/run \
             installs it into .ci-venv"
        );
    }
    eprintln!("SKIPPED: no Python with {module} (tried {candidates:?}); see .ci/run");
    None
}

const OPENAI_SCRIPT: &str = r#"
import json, sys
import openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
texts = json.load(open(sys.argv[2]))
out = {}
r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
out["default"] = [list(map(float, d.embedding)) for d in r.data]
out["model"] = r.model
out["usage"] = r.usage.prompt_tokens
r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
out["float"] = [d.embedding for d in r.data]
out["index"] = [d.index for d in r.data]
try:
    client.embeddings.create(model="all-MiniLM-L6-v2", input=[])
    out["empty"] = None
except openai.APIStatusError as e:
    out["empty"] = [e.status_code, e.body["message"] if isinstance(e.body, dict) else str(e.body)]
json.dump(out, sys.stdout)
"#;

/// The official client, with its default (base64) and with floats, equals task 1 bit for bit
/// (int8); its errors arrive as its own exception with our message.
#[test]
fn the_official_openai_client_gets_task_1_vectors() {
    let Some(py) = python_with("openai") else {
        return;
    };
    let Some(model) = minilm() else { return };
    let texts = sentences(10, 17, ENGLISH);
    let want = task1(&model, &["--dtype", "int8"], &texts);
    let server = Server::start(&["--model", model.to_str().unwrap(), "--dtype", "int8"]);
    let d = tempfile::tempdir().unwrap();
    let (script, input) = (d.path().join("client.py"), d.path().join("texts.json"));
    std::fs::write(&script, OPENAI_SCRIPT).unwrap();
    std::fs::write(&input, serde_json::to_string(&texts).unwrap()).unwrap();
    let out = ok(&run(Command::new(&py)
        .arg(&script)
        .arg(&server.base)
        .arg(&input)));
    let v: Value = serde_json::from_str(&out).unwrap();
    for format in ["default", "float"] {
        let rows = v[format].as_array().unwrap();
        assert_eq!(rows.len(), texts.len());
        for (i, row) in rows.iter().enumerate() {
            assert_same(
                "int8",
                &floats(row),
                &want[i],
                &format!("openai client, {format}, {i}"),
            );
        }
    }
    assert_eq!(v["model"], "all-MiniLM-L6-v2");
    assert_eq!(
        v["index"],
        serde_json::json!((0..texts.len()).collect::<Vec<_>>())
    );
    assert!(v["usage"].as_u64().unwrap() > 0);
    assert_eq!(v["empty"][0], 422, "{}", v["empty"]);
    assert!(
        v["empty"][1].as_str().unwrap().contains("empty"),
        "{}",
        v["empty"]
    );
    // The client asked for base64 unless told otherwise: it reached the server as such.
    let m = server.get("/metrics").body;
    assert!(m.contains("route=\"/v1/embeddings\",status=\"200\""), "{m}");
}

/// schemathesis against /openapi.json (a tiny checkpoint, so every route answers 200 too):
/// no 5xx, every status, content type, header and body as described, bad data refused.
#[test]
fn schemathesis_finds_every_response_as_described() {
    let Some(py) = python_with("schemathesis") else {
        return;
    };
    let (d, model) = tiny();
    let ckpt = tiny_checkpoint(d.path(), &model);
    let server = Server::start(&["--checkpoint", ckpt.to_str().unwrap()]);
    let doc = server.get("/openapi.json").json();
    let paths: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    for p in [
        "/v1/embeddings",
        "/embed",
        "/predict",
        "/tokenize",
        "/health",
        "/info",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            paths.iter().any(|k| *k == p),
            "{p} is not described: {paths:?}"
        );
    }
    let st = st_command(&py, d.path());
    let o = run(Command::new(&st.0)
        .args(&st.1)
        .arg(server.url("/openapi.json"))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,negative_data_rejection,\
             unsupported_method",
            "--max-examples",
            "30",
            "--seed",
            "7",
            // One worker: Python 3.11's parser is not thread-safe under hypothesis.
            "--workers",
            "1",
            "--report-dir",
        ])
        .arg(d.path().join("report"))
        .current_dir(d.path()));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "schemathesis failed:\n{out}\n{}\nserver:\n{}",
        String::from_utf8_lossy(&o.stderr),
        server.log()
    );
    assert!(out.contains("passed"), "{out}");
    assert!(!server.log().contains("request failed"), "{}", server.log());
}

/// `schemathesis run` next to `py` (its console script), or through `python -m`.
fn st_command(py: &Path, _dir: &Path) -> (PathBuf, Vec<String>) {
    let script = py.with_file_name("schemathesis");
    if script.is_file() {
        (script, vec!["run".into()])
    } else {
        (
            py.to_path_buf(),
            vec!["-m".into(), "schemathesis.cli".into(), "run".into()],
        )
    }
}
