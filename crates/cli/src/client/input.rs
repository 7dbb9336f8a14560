//! `-f FILE|DIR|-` inputs: reads them, joins them into one request body, and maps the
//! server's document numbers back to `FILE: document K`.
//!
//! The server numbers documents from 1 across the whole body, counting them the way
//! `biplane_api::parse_documents` splits text: YAML is cut at lines that are `---` (or start
//! with `--- `), empty documents are skipped, and a `kind: List` counts as its items; JSON is
//! an object, an array of objects, or a `List`. The client counts each file's documents the
//! same way, so that document N of the body is document K of some file.
//!
//! One input is sent verbatim (so the server's line numbers are the file's). Several inputs
//! are joined as one YAML stream: each YAML file after a `---` line; each JSON file as one
//! `---` document per item (JSON is YAML), so a JSON file's items keep their numbers but its
//! line numbers do not. In a YAML file, "document starts at line N" is rewritten to the file's
//! own line; line/column positions inside a YAML parser message stay relative to the
//! document as the server saw it (best effort).

use std::io::Read as _;
use std::path::Path;

use serde_json::Value;

use super::Failure;

/// One input, read.
#[derive(Debug, Clone)]
pub struct Source {
    /// The path as given, `path/inside/dir.yaml`, or `STDIN`.
    pub label: String,
    pub text: String,
}

/// Reads every `-f` argument: a file, every `*.yaml`/`*.yml`/`*.json` of a directory
/// (sorted, not recursive), or `-` for standard input (at most once).
pub fn read(args: &[String]) -> Result<Vec<Source>, Failure> {
    let mut out = Vec::new();
    let mut stdin_used = false;
    for arg in args {
        if arg == "-" {
            if stdin_used {
                return Err(Failure::Usage("-f - (standard input) given twice".into()));
            }
            stdin_used = true;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
            out.push(Source {
                label: "STDIN".into(),
                text,
            });
            continue;
        }
        let path = Path::new(arg);
        let meta = std::fs::metadata(path)
            .map_err(|e| Failure::Usage(format!("the path {arg:?} cannot be read: {e}")))?;
        if meta.is_dir() {
            let files = dir_files(path)?;
            if files.is_empty() {
                return Err(Failure::Usage(format!(
                    "no .yaml, .yml or .json files in the directory {arg:?}"
                )));
            }
            for f in files {
                out.push(read_file(&f)?);
            }
        } else {
            out.push(read_file(path)?);
        }
    }
    Ok(out)
}

fn dir_files(dir: &Path) -> Result<Vec<std::path::PathBuf>, Failure> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Failure::Usage(format!("cannot list {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| Failure::Usage(format!("cannot list {}: {e}", dir.display())))?;
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "yaml" | "yml" | "json"));
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Source, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Failure::Usage(format!("{} is not UTF-8 text", path.display())))?;
    Ok(Source {
        label: path.display().to_string(),
        text,
    })
}

/// Where one input's documents are in the joined body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub label: String,
    /// 0-based index (in the body) of the input's first document.
    pub first: usize,
    pub count: usize,
    /// For inputs sent as written: how many body lines come before the input's first line.
    pub line_offset: Option<usize>,
}

/// A request body made of every input, and how to find an input's document in it.
#[derive(Debug, Clone)]
pub struct Payload {
    pub body: String,
    pub content_type: &'static str,
    pub spans: Vec<Span>,
}

impl Payload {
    /// Joins the inputs (see the module docs).
    pub fn new(sources: &[Source]) -> Payload {
        if let [only] = sources {
            let json = looks_json(&only.text);
            return Payload {
                body: only.text.clone(),
                content_type: if json {
                    "application/json"
                } else {
                    "application/yaml"
                },
                spans: vec![Span {
                    label: only.label.clone(),
                    first: 0,
                    count: count_documents(&only.text),
                    line_offset: Some(0),
                }],
            };
        }
        let mut body = String::new();
        let mut spans = Vec::new();
        let mut first = 0;
        for s in sources {
            let items = looks_json(&s.text)
                .then(|| serde_json::from_str::<Value>(strip_bom(&s.text).trim()).ok())
                .flatten()
                .map(json_items);
            let span = match items {
                Some(items) => {
                    for item in &items {
                        body.push_str("---\n");
                        body.push_str(&item.to_string());
                        body.push('\n');
                    }
                    Span {
                        label: s.label.clone(),
                        first,
                        count: items.len(),
                        line_offset: None,
                    }
                }
                None => {
                    body.push_str("---\n");
                    let offset = body.lines().count();
                    body.push_str(strip_bom(&s.text));
                    if !body.ends_with('\n') {
                        body.push('\n');
                    }
                    Span {
                        label: s.label.clone(),
                        first,
                        count: count_yaml(&s.text),
                        line_offset: Some(offset),
                    }
                }
            };
            first += span.count;
            spans.push(span);
        }
        Payload {
            body,
            content_type: "application/yaml",
            spans,
        }
    }

    /// How many documents the client counted in all the inputs.
    pub fn total(&self) -> usize {
        self.spans.iter().map(|s| s.count).sum()
    }

    /// Maps the server's 1-based document number to `(input label, 1-based number in it)`.
    pub fn locate(&self, document: usize) -> Option<(&Span, usize)> {
        let index = document.checked_sub(1)?;
        self.spans
            .iter()
            .find(|s| index >= s.first && index < s.first + s.count)
            .map(|s| (s, index - s.first + 1))
    }

    /// `FILE: document K` for the server's document N (`document N` if the count is off).
    pub fn describe(&self, document: usize) -> String {
        match self.locate(document) {
            Some((span, k)) => format!("{}: document {k}", span.label),
            None => format!("document {document}"),
        }
    }

    /// Rewrites "document starts at line N" in a server message to the input's own line.
    pub fn localize(&self, document: usize, message: &str) -> String {
        const MARK: &str = "document starts at line ";
        let Some(offset) = self.locate(document).and_then(|(s, _)| s.line_offset) else {
            return message.to_owned();
        };
        let Some(at) = message.find(MARK) else {
            return message.to_owned();
        };
        let digits_at = at + MARK.len();
        let digits: String = message[digits_at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let Ok(line) = digits.parse::<usize>() else {
            return message.to_owned();
        };
        let local = line.saturating_sub(offset).max(1);
        format!(
            "{}{local}{}",
            &message[..digits_at],
            &message[digits_at + digits.len()..]
        )
    }
}

fn strip_bom(text: &str) -> &str {
    text.trim_start_matches('\u{feff}')
}

/// Whether the server will read the text as JSON first (it starts with `{` or `[`).
fn looks_json(text: &str) -> bool {
    let t = strip_bom(text).trim_start();
    t.starts_with('{') || t.starts_with('[')
}

/// How many documents the server will count in one input sent as written.
pub fn count_documents(text: &str) -> usize {
    if looks_json(text) {
        match serde_json::from_str::<Value>(strip_bom(text).trim()) {
            Ok(v) => return json_items(v).len(),
            // `{apiVersion: v1, ...}` is YAML flow style: the server reads it as YAML when every
            // document parses that way, else it reports one JSON error.
            Err(_) => {
                let chunks = yaml_chunks(text);
                let all_yaml = chunks
                    .iter()
                    .filter(|c| !yaml_is_empty(c))
                    .all(|c| parse_yaml(c).is_some());
                return if all_yaml { count_yaml(text) } else { 1 };
            }
        }
    }
    count_yaml(text)
}

/// The documents of a JSON value: array items, `List` items, minus nulls.
fn json_items(v: Value) -> Vec<Value> {
    let mut out = Vec::new();
    match v {
        Value::Array(items) => {
            for item in items {
                expand(item, &mut out);
            }
        }
        other => expand(other, &mut out),
    }
    out
}

fn expand(v: Value, out: &mut Vec<Value>) {
    if let Some(items) = list_items(&v) {
        out.extend(items.iter().filter(|i| !i.is_null()).cloned());
    } else if !v.is_null() {
        out.push(v);
    }
}

/// The items of a `{"kind": "List", "apiVersion": "v1"?, "items": [...]}`.
fn list_items(v: &Value) -> Option<&Vec<Value>> {
    let map = v.as_object()?;
    if map.get("kind").and_then(Value::as_str) != Some("List") {
        return None;
    }
    if map
        .get("apiVersion")
        .is_some_and(|a| a.as_str() != Some("v1"))
    {
        return None;
    }
    map.get("items")?.as_array()
}

/// YAML documents: non-empty chunks, a `List` counting as its non-null items, a chunk the
/// parser refuses as one (erroneous) document.
fn count_yaml(text: &str) -> usize {
    yaml_chunks(text)
        .into_iter()
        .filter(|c| !yaml_is_empty(c))
        .map(|c| match parse_yaml(c) {
            Some(Value::Null) => 0,
            Some(v) => match list_items(&v) {
                Some(items) => items.iter().filter(|i| !i.is_null()).count(),
                None => 1,
            },
            None => 1,
        })
        .sum()
}

/// Cuts YAML at document-marker lines (`---`, `--- ...`), each marker staying with the
/// document it starts.
fn yaml_chunks(text: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if marker && offset > start {
            chunks.push(&text[start..offset]);
            start = offset;
        }
        offset += line.len();
    }
    if start < text.len() {
        chunks.push(&text[start..]);
    }
    chunks
}

fn yaml_is_empty(chunk: &str) -> bool {
    chunk.lines().all(|l| {
        let t = l.trim();
        let t = t.strip_prefix("---").map(str::trim_start).unwrap_or(t);
        t.is_empty() || t.starts_with('#') || t == "..."
    })
}

fn parse_yaml(chunk: &str) -> Option<Value> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options::<Value>(chunk, options).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    fn src(label: &str, text: &str) -> Source {
        Source {
            label: label.into(),
            text: text.into(),
        }
    }

    const TWO: &str =
        "apiVersion: v1\nkind: A\n---\n# only a comment\n---\napiVersion: v1\nkind: B\n";

    #[test]
    fn yaml_counts_like_the_server() {
        assert_eq!(count_documents(""), 0);
        assert_eq!(count_documents("---\n---\n# c\n...\n"), 0);
        assert_eq!(count_documents(TWO), 2);
        // A `---` inside a block scalar is not a marker; `----` is not one either.
        assert_eq!(count_documents("a: |\n  ---\n  x\n----: 1\n"), 1);
        // A chunk that does not parse is one (erroneous) document.
        assert_eq!(count_documents("a: [\n---\nb: 1\n"), 2);
        // Lists count as their items; `null` documents count as nothing.
        assert_eq!(
            count_documents(
                "kind: List\napiVersion: v1\nitems:\n- {a: 1}\n- null\n- {b: 2}\n---\nnull\n"
            ),
            2
        );
        // A list of another apiVersion is a document of its own.
        assert_eq!(
            count_documents("kind: List\napiVersion: x/v1\nitems: [1, 2]\n"),
            1
        );
    }

    #[test]
    fn json_counts_like_the_server() {
        assert_eq!(count_documents("{\"kind\": \"A\"}"), 1);
        assert_eq!(
            count_documents("[{\"kind\": \"A\"}, null, {\"kind\": \"B\"}]"),
            2
        );
        assert_eq!(
            count_documents("{\"kind\":\"List\",\"items\":[{\"a\":1},{\"b\":2},{\"c\":3}]}"),
            3
        );
        // Flow-style YAML that is not JSON is read as YAML.
        assert_eq!(count_documents("{kind: A}\n---\n{kind: B}\n"), 2);
        // Broken JSON (and not YAML either) is one error.
        assert_eq!(count_documents("{\"kind\": "), 1);
    }

    #[test]
    fn one_input_is_sent_verbatim() {
        let p = Payload::new(&[src("a.yaml", TWO)]);
        assert_eq!(p.body, TWO);
        assert_eq!(p.content_type, "application/yaml");
        assert_eq!(p.total(), 2);
        assert_eq!(p.describe(2), "a.yaml: document 2");
        assert_eq!(p.describe(3), "document 3");
        assert_eq!(p.describe(0), "document 0");
        let j = Payload::new(&[src("a.json", "[{\"kind\": \"A\"}]")]);
        assert_eq!(j.content_type, "application/json");
        assert_eq!(
            p.localize(1, "invalid YAML (document starts at line 3): x"),
            "invalid YAML (document starts at line 3): x"
        );
    }

    #[test]
    fn several_inputs_map_back_to_files() {
        let p = Payload::new(&[
            src("a.yaml", TWO),
            src(
                "b.json",
                "[{\"kind\":\"C\",\"s\":\"é \\\" \\n\"}, {\"kind\":\"List\",\"items\":[{\"kind\":\"D\"},{\"kind\":\"E\"}]}]",
            ),
            src("c.yml", "kind: F\n---\nkind: G"),
        ]);
        assert_eq!(p.total(), 2 + 3 + 2);
        assert_eq!(count_documents(&p.body), p.total(), "{}", p.body);
        let want = [
            "a.yaml: document 1",
            "a.yaml: document 2",
            "b.json: document 1",
            "b.json: document 2",
            "b.json: document 3",
            "c.yml: document 1",
            "c.yml: document 2",
        ];
        for (i, w) in want.iter().enumerate() {
            assert_eq!(p.describe(i + 1), *w);
        }
        assert_eq!(p.describe(8), "document 8");
        // The JSON items arrive intact as YAML documents.
        let docs: Vec<Value> = yaml_chunks(&p.body)
            .into_iter()
            .filter(|c| !yaml_is_empty(c))
            .map(|c| parse_yaml(c).unwrap())
            .collect();
        assert_eq!(docs[2]["s"], "é \" \n");
        assert_eq!(docs[6]["kind"], "G");
        // Line numbers of the YAML inputs are their own: c.yml's second document starts at
        // its line 2, whatever came before it in the body.
        let body_line = p.body.lines().position(|l| l == "kind: G").unwrap(); // 0-based
        let msg = format!("invalid YAML (document starts at line {body_line}): bad");
        assert_eq!(
            p.localize(7, &msg),
            "invalid YAML (document starts at line 2): bad"
        );
        // The first document of a file starts at the joining marker: line 1.
        let first = p.body.lines().position(|l| l == "kind: F").unwrap();
        let msg = format!("(document starts at line {first})");
        assert_eq!(p.localize(6, &msg), "(document starts at line 1)");
        // JSON inputs have no line mapping.
        assert_eq!(
            p.localize(3, "document starts at line 9"),
            "document starts at line 9"
        );
    }

    #[test]
    fn directories_are_read_sorted_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("b.yml", "kind: B\n"),
            ("a.yaml", "kind: A\n"),
            ("c.JSON", "{}"),
            ("notes.txt", "x"),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let arg = dir.path().to_str().unwrap().to_owned();
        let got = read(std::slice::from_ref(&arg)).unwrap();
        let names: Vec<String> = got
            .iter()
            .map(|s| {
                Path::new(&s.label)
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(names, ["a.yaml", "b.yml", "c.JSON"]);
        let empty = tempfile::tempdir().unwrap();
        let err = read(&[empty.path().to_str().unwrap().to_owned()]).unwrap_err();
        assert!(err.to_string().contains("no .yaml"), "{err}");
        let err = read(&["/nonexistent/x.yaml".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.yaml"), "{err}");
    }
}
