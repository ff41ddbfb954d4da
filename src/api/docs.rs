//! The OpenAPI document as served (`/openapi.json`, and inside the UI at `/docs`), finished from
//! what poem-openapi generates:
//!
//! - descriptions are CommonMark, which the UI renders as HTML: a `<kind>` outside a code span
//!   is a tag there and vanishes (`sensors/<kind>` showed as "sensors/"), so `<` and `>` outside
//!   code spans become `&lt;` and `&gt;`, which every CommonMark reader turns back into the
//!   characters;
//! - the document goes into the UI page inside a `<script>`, so `<`, `>` and `&` in it are
//!   written as JSON escapes (`\u003c`), which parse to the same document and cannot end the
//!   script;
//! - without `--api-keys`, every guarded operation also lists the empty security requirement:
//!   a key is then optional, and the document says so;
//! - the methods of each path, for the `Allow` header of a 405.

use serde_json::Value;

/// The document, the UI page that embeds it, and what each path answers to.
#[derive(Debug)]
pub struct Document {
    pub spec: String,
    pub ui: String,
    routes: Vec<(Vec<Option<String>>, String)>,
}

impl Document {
    /// `raw` is poem-openapi's document, `raw_ui` its UI page with `raw` inside.
    pub fn new(raw: &str, raw_ui: &str, keys_required: bool) -> Self {
        let mut spec: Value = serde_json::from_str(raw).unwrap_or(Value::Null);
        escape_descriptions(&mut spec);
        let mut routes = Vec::new();
        if let Some(paths) = spec.get_mut("paths").and_then(Value::as_object_mut) {
            for (path, item) in paths.iter_mut() {
                let Some(item) = item.as_object_mut() else {
                    continue;
                };
                let mut methods: Vec<String> = Vec::new();
                for (method, operation) in item.iter_mut() {
                    methods.push(method.to_ascii_uppercase());
                    if method == "get" {
                        methods.push("HEAD".to_owned());
                    }
                    if keys_required {
                        continue;
                    }
                    if let Some(security) =
                        operation.get_mut("security").and_then(Value::as_array_mut)
                    {
                        security.push(Value::Object(serde_json::Map::new()));
                    }
                }
                routes.push((template(path), methods.join(", ")));
            }
        }
        let spec = serde_json::to_string_pretty(&spec).unwrap_or_else(|_| raw.to_owned());
        let ui = raw_ui.replacen(raw, &script_safe(&spec), 1);
        Self { spec, ui, routes }
    }

    /// The methods a path answers to (`GET, HEAD`), when it is a path of the document.
    pub fn allowed(&self, path: &str) -> Option<&str> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        self.routes
            .iter()
            .find(|(template, _)| {
                template.len() == segments.len()
                    && template
                        .iter()
                        .zip(&segments)
                        .all(|(t, s)| t.as_deref().is_none_or(|t| t == *s))
            })
            .map(|(_, methods)| methods.as_str())
    }
}

/// A path template's segments; `None` for a `{parameter}`.
fn template(path: &str) -> Vec<Option<String>> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| (!s.starts_with('{')).then(|| s.to_owned()))
        .collect()
}

fn escape_descriptions(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    Value::String(text) if key == "description" => *text = escape_markdown(text),
                    other => escape_descriptions(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(escape_descriptions),
        _ => {}
    }
}

/// `<` and `>` outside code spans as character references, so CommonMark shows them as text.
pub fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_code = false;
    for c in text.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                out.push(c);
            }
            '<' if !in_code => out.push_str("&lt;"),
            '>' if !in_code => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON that may stand inside an HTML `<script>`: the same value, without `<`, `>` or `&`.
fn script_safe(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn angle_brackets_survive_markdown_outside_code_spans() {
        assert_eq!(
            escape_markdown("to sensors/<kind>; see `sensors/<kind>` & <b>"),
            "to sensors/&lt;kind&gt;; see `sensors/<kind>` & &lt;b&gt;"
        );
    }

    #[test]
    fn the_document_is_finished_and_stays_the_same_json_inside_the_page() {
        let raw = r#"{"info":{"description":"a <kind>"},"paths":{"/s/{id}/r":{"delete":{"security":[{"ApiKey":[]}],"description":"</script>"}},"/h":{"get":{}}}}"#;
        let ui = format!("<script>let spec = {raw};</script>");
        let open = Document::new(raw, &ui, false);
        let spec: Value = serde_json::from_str(&open.spec).unwrap();
        assert_eq!(spec["info"]["description"], "a &lt;kind&gt;");
        assert_eq!(
            spec["paths"]["/s/{id}/r"]["delete"]["security"],
            serde_json::json!([{"ApiKey": []}, {}])
        );
        assert!(!open.ui.contains("</script>\""), "{}", open.ui);
        let inner = &open.ui["<script>let spec = ".len()..open.ui.len() - ";</script>".len()];
        assert_eq!(serde_json::from_str::<Value>(inner).unwrap(), spec);
        assert_eq!(open.allowed("/s/x/r"), Some("DELETE"));
        assert_eq!(open.allowed("/h"), Some("GET, HEAD"));
        assert_eq!(open.allowed("/s/x"), None);
        let closed = Document::new(raw, &ui, true);
        let spec: Value = serde_json::from_str(&closed.spec).unwrap();
        assert_eq!(
            spec["paths"]["/s/{id}/r"]["delete"]["security"],
            serde_json::json!([{"ApiKey": []}])
        );
    }
}
