//! The providers' API descriptions (`deploy/contracts/`) as a check: every call the relay
//! makes answering back or checking who is on call must be one they describe, with the auth,
//! headers, parameters and body they require; and the answers they describe parse.

use serde_json::{Value, json};
use wiremock::Request;

use super::*;

pub fn spec(name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("deploy/contracts").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Checks one request against an OpenAPI excerpt: a described path and method, the
/// security scheme's header, every required header and query parameter (enums, integers,
/// booleans, date-times, emails; `name[]` arrays repeated), path parameters of their type,
/// no undescribed query parameter, and the JSON body against the request schema.
/// Parameters may be `$ref`s into `components/parameters`, on the operation or its path.
pub fn check_contract(spec: &Value, req: &Request) -> Result<(), String> {
    let segments: Vec<String> = req
        .url
        .path_segments()
        .map(|s| {
            s.map(|x| {
                percent_encoding::percent_decode_str(x)
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .collect()
        })
        .unwrap_or_default();
    let mut found = None;
    for (template, item) in spec["paths"].as_object().unwrap() {
        let parts: Vec<&str> = template.trim_start_matches('/').split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut params = Vec::new();
        let matched = parts.iter().zip(&segments).all(|(p, s)| {
            if p.starts_with('{') {
                params.push((
                    p.trim_matches(|c| c == '{' || c == '}').to_owned(),
                    s.clone(),
                ));
                true
            } else {
                p == s
            }
        });
        if matched {
            found = Some((template.clone(), item, params));
            break;
        }
    }
    let (template, item, params) =
        found.ok_or_else(|| format!("no path in the contract matches {}", req.url.path()))?;
    let op = &item[req.method.as_str().to_lowercase()];
    if op.is_null() {
        return Err(format!("{template}: no {} operation", req.method));
    }
    let security = op["security"]
        .as_array()
        .or(spec["security"].as_array())
        .cloned()
        .unwrap_or_default();
    for sec in &security {
        for (name, _) in sec.as_object().unwrap() {
            let scheme = &spec["components"]["securitySchemes"][name];
            match scheme["type"].as_str() {
                Some("http") => {
                    if !header(req, "authorization").starts_with("Bearer ") {
                        return Err(format!("{template}: no bearer Authorization"));
                    }
                }
                Some("apiKey") => {
                    let h = scheme["name"].as_str().unwrap();
                    if header(req, h).is_empty() {
                        return Err(format!("{template}: no {h} header"));
                    }
                }
                other => return Err(format!("unknown security scheme {other:?}")),
            }
        }
    }
    let resolve = |p: &Value| -> Value {
        match p["$ref"].as_str() {
            Some(r) => {
                let pointer = r.trim_start_matches('#');
                spec.pointer(pointer)
                    .cloned()
                    .unwrap_or_else(|| panic!("unresolved {r}"))
            }
            None => p.clone(),
        }
    };
    let query: Vec<(String, String)> = req.url.query_pairs().into_owned().collect();
    let declared: Vec<Value> = item["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(op["parameters"].as_array().into_iter().flatten())
        .map(resolve)
        .collect();
    for p in &declared {
        let name = p["name"].as_str().unwrap();
        let schema = &p["schema"];
        let values: Vec<String> = match p["in"].as_str().unwrap() {
            "header" => req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::to_owned)
                .collect(),
            "query" => query
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect(),
            "path" => params
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect(),
            _ => Vec::new(),
        };
        if values.is_empty() {
            if p["required"].as_bool() == Some(true) {
                return Err(format!("{template}: missing required {} `{name}`", p["in"]));
            }
            continue;
        }
        let array = schema["type"] == "array";
        if !array && values.len() > 1 {
            return Err(format!(
                "{template}: `{name}` is given {} times",
                values.len()
            ));
        }
        let schema = if array { &schema["items"] } else { schema };
        for value in &values {
            check_value(&template, name, schema, value)?;
        }
    }
    for (k, _) in &query {
        if !declared
            .iter()
            .any(|p| p["in"] == "query" && p["name"] == k.as_str())
        {
            return Err(format!(
                "{template}: query parameter `{k}` is not described"
            ));
        }
    }
    let schema = &op["requestBody"]["content"]["application/json"]["schema"];
    if !schema.is_null() {
        if !header(req, "content-type").starts_with("application/json") {
            return Err(format!("{template}: body is not sent as application/json"));
        }
        let instance: Value = serde_json::from_slice(&req.body)
            .map_err(|e| format!("{template}: body is not JSON: {e}"))?;
        let validator = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| e.to_string())
            .collect();
        if !errors.is_empty() {
            return Err(format!("{template}: body {instance}: {errors:?}"));
        }
    } else if !req.body.is_empty() {
        return Err(format!("{template}: a body where none is described"));
    }
    Ok(())
}

/// One parameter value against its (scalar) schema.
fn check_value(template: &str, name: &str, schema: &Value, value: &str) -> Result<(), String> {
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.iter().any(|a| a.as_str() == Some(value))
    {
        return Err(format!(
            "{template}: `{name}` = `{value}` is not one of {allowed:?}"
        ));
    }
    let ok = match (schema["type"].as_str(), schema["format"].as_str()) {
        (Some("integer"), _) => value.parse::<i64>().is_ok(),
        (Some("boolean"), _) => matches!(value, "true" | "false"),
        (_, Some("date-time")) => humantime::parse_rfc3339(value).is_ok(),
        (_, Some("email")) => value.contains('@'),
        _ => true,
    };
    if !ok {
        return Err(format!(
            "{template}: `{name}` = `{value}` is not a valid {} {}",
            schema["type"].as_str().unwrap_or("value"),
            schema["format"].as_str().unwrap_or("")
        ));
    }
    Ok(())
}

/// OpenAPI 3.0's `nullable: true` in JSON Schema's words: `null` is allowed beside the type.
fn nullable_to_json_schema(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for child in map.values_mut() {
                nullable_to_json_schema(child);
            }
            if map.remove("nullable") == Some(Value::Bool(true)) {
                match map.get("type").cloned() {
                    Some(Value::String(t)) => {
                        map.insert("type".into(), json!([t, "null"]));
                    }
                    _ => {
                        let inner = Value::Object(std::mem::take(map));
                        map.insert("anyOf".into(), json!([inner, { "type": "null" }]));
                    }
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(nullable_to_json_schema),
        _ => {}
    }
}

/// Checks a fake's answer against the response the excerpt describes for `status`, so the
/// fakes answer in the shapes the real APIs do.
pub fn check_response(spec: &Value, template: &str, verb: &str, status: u16, body: &Value) {
    let response = &spec["paths"][template][verb]["responses"][status.to_string()];
    assert!(
        response.is_object(),
        "{template}: no {status} response described"
    );
    let schema = &response["content"]["application/json"]["schema"];
    if schema.is_null() {
        return;
    }
    let mut root = json!({ "components": spec["components"].clone() });
    for (k, v) in schema.as_object().unwrap() {
        root[k] = v.clone();
    }
    nullable_to_json_schema(&mut root);
    let validator = jsonschema::validator_for(&root).unwrap();
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{template} {status}: {body}: {errors:?}");
}

pub fn conforms(spec_file: &str, calls: &[Request]) {
    let spec = spec(spec_file);
    for c in calls {
        if let Err(e) = check_contract(&spec, c) {
            panic!("{spec_file}: {e}");
        }
    }
}
