//! Unit tests of the data readers.
use super::*;

fn load_str(ext: &str, content: &[u8]) -> Result<Dataset> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("data.{ext}"));
    std::fs::write(&path, content).unwrap();
    Dataset::load(&DataSource::File(path))
}

fn err(ext: &str, content: &[u8]) -> String {
    format!("{:#}", load_str(ext, content).expect_err("should fail"))
}

#[test]
fn jsonl_rows_and_partial_labels() {
    let d = load_str(
        "jsonl",
        br#"{"text": "a", "class": "x", "sentiment": "pos"}

{"text": "b", "class": null, "sentiment": "neg"}
{"text": "c", "class": "y", "sentiment": ""}
{"text": "d", "class": "x"}
"#,
    )
    .unwrap();
    assert_eq!(d.examples.len(), 4);
    assert_eq!(d.examples[1].labels, [None, Some("neg".into())]);
    assert_eq!(d.examples[2].labels, [Some("y".into()), None]);
    assert_eq!(d.examples[3].line, 5);
    assert_eq!(
        d.label_sets(),
        [
            vec!["x".to_string(), "y".into()],
            vec!["neg".to_string(), "pos".into()]
        ]
    );
}

#[test]
fn a_numeric_label_is_the_text_of_its_value() {
    let d = load_str(
        "jsonl",
        br#"{"text": "a", "class": 1, "sentiment": 2.50}
{"text": "b", "class": "1", "sentiment": 2.5}
{"text": "c", "class": 1.0, "sentiment": "2.5"}
{"text": "d", "class": 1e0, "sentiment": -3}
"#,
    )
    .unwrap();
    assert_eq!(
        d.label_sets(),
        [vec!["1".to_string()], vec!["-3".to_string(), "2.5".into()]]
    );
}

#[test]
fn csv_rows_quotes_and_column_order() {
    let d = load_str("csv", b"sentiment,text,class,extra\npos,\"hello, world\",x,1\n,\"multi\nline\",y,2\nneg,plain,,3\n").unwrap();
    assert_eq!(d.examples.len(), 3);
    assert_eq!(d.examples[0].text, "hello, world");
    assert_eq!(d.examples[1].text, "multi\nline");
    assert_eq!(d.examples[1].labels, [Some("y".into()), None]);
    assert_eq!(d.examples[2].labels, [None, Some("neg".into())]);
    assert_eq!(d.examples[2].line, 5);
}

#[test]
fn malformed_inputs_name_file_and_line() {
    let e = err(
        "jsonl",
        b"{\"text\": \"a\", \"class\": \"x\"}\n{\"text\": \"b\", \"class\": \n",
    );
    assert!(
        e.contains("data.jsonl, line 2") && e.contains("not valid JSON"),
        "{e}"
    );
    let e = err(
        "jsonl",
        b"{\"text\": \"a\", \"class\": \"x\"}\n{\"text\": \"b\xff\", \"class\": \"x\"}\n",
    );
    assert!(e.contains("line 2") && e.contains("UTF-8"), "{e}");
    let e = err("csv", b"text,class,sentiment\na,x,p\nb\xfe,x,p\n");
    assert!(e.contains("data.csv, line 3") && e.contains("UTF-8"), "{e}");
    let e = err("csv", b"text,class\na,x\n");
    assert!(
        e.contains("line 1") && e.contains("'sentiment' column"),
        "{e}"
    );
    let e = err("csv", b"text,class,sentiment\na,x,p\nb,x\n");
    assert!(e.contains("line 3") && e.contains("malformed CSV"), "{e}");
    let e = err("jsonl", b"");
    assert!(e.contains("no rows"), "{e}");
    let e = err("csv", b"text,class,sentiment\n");
    assert!(e.contains("no rows"), "{e}");
    let e = err(
        "jsonl",
        b"{\"text\": \"a\", \"class\": \"x\"}\n{\"text\": \"b\"}\n",
    );
    assert!(e.contains("line 2") && e.contains("neither"), "{e}");
    let e = err("jsonl", b"{\"class\": \"x\"}\n");
    assert!(e.contains("line 1") && e.contains("no text"), "{e}");
    let e = err("jsonl", b"{\"text\": \"  \", \"class\": \"x\"}\n");
    assert!(e.contains("no text"), "{e}");
    let e = err("jsonl", b"[1, 2]\n");
    assert!(e.contains("expected a JSON object"), "{e}");
    let e = err("txt", b"a\n");
    assert!(e.contains(".txt") && e.contains(".jsonl"), "{e}");
}

#[test]
fn unknown_eval_label_names_label_and_line() {
    let train = load_str(
        "jsonl",
        b"{\"text\": \"a\", \"class\": \"x\", \"sentiment\": \"p\"}\n",
    )
    .unwrap();
    let eval = load_str(
        "jsonl",
        b"{\"text\": \"a\", \"class\": \"x\"}\n{\"text\": \"b\", \"sentiment\": \"q\"}\n",
    )
    .unwrap();
    let e = format!("{:#}", eval.label_ids(&train.label_sets()).unwrap_err());
    assert!(
        e.contains("line 2") && e.contains("sentiment label 'q'") && e.contains("known: p"),
        "{e}"
    );
}

#[test]
fn shipped_data_is_valid_balanced_and_disjoint() {
    let train = Dataset::load(&DataSource::default_train()).unwrap();
    let eval = Dataset::load(&DataSource::default_eval()).unwrap();
    assert!(train.examples.len() >= 800 && eval.examples.len() >= 200);
    let sets = train.label_sets();
    assert!((4..=6).contains(&sets[0].len()), "{:?}", sets[0]);
    assert_eq!(sets[1], ["negative", "neutral", "positive"]);
    eval.label_ids(&sets).unwrap();
    let train_texts: BTreeSet<&str> = train.examples.iter().map(|e| e.text.as_str()).collect();
    assert!(eval
        .examples
        .iter()
        .all(|e| !train_texts.contains(e.text.as_str())));
    for (t, set) in sets.iter().enumerate() {
        for l in set {
            let n = train
                .examples
                .iter()
                .filter(|e| e.labels[t].as_ref() == Some(l))
                .count();
            let share = n as f64 / train.examples.len() as f64;
            assert!(
                (share - 1.0 / set.len() as f64).abs() < 0.05,
                "{l}: {share}"
            );
        }
    }
}
