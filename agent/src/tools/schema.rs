//! Checking a tool's arguments against its JSON-schema parameters before it runs.
//!
//! The subset tools here declare: `type` (object, string, integer, number, boolean, array),
//! `properties`, `required`, `additionalProperties: false`, `enum`, `minLength`/`maxLength`,
//! `minimum`/`maximum`, `items`, `maxItems`. Keywords outside it are ignored, as a validator
//! must for forward compatibility. Errors name the argument and say what was expected.

use serde_json::Value;

pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, value, "")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn at(path: &str) -> String {
    if path.is_empty() { "the arguments".into() } else { format!("argument `{path}`") }
}

fn check(schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let fits = actual == expected || (expected == "number" && actual == "integer");
        if !fits {
            return Err(format!("{} must be of type {expected}, not {actual}", at(path)));
        }
    }
    if let Some(choices) = schema.get("enum").and_then(Value::as_array)
        && !choices.contains(value)
    {
        let list: Vec<String> = choices.iter().map(Value::to_string).collect();
        return Err(format!("{} must be one of {}", at(path), list.join(", ")));
    }
    match value {
        Value::String(s) => {
            let n = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && n > max
            {
                return Err(format!("{} is {n} characters long; at most {max} are accepted", at(path)));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && n < min
            {
                return Err(format!("{} must have at least {min} characters", at(path)));
            }
        }
        Value::Number(num) => {
            let x = num.as_f64().unwrap_or(f64::NAN);
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && (x < min || x.is_nan())
            {
                return Err(format!("{} must be at least {min}", at(path)));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && (x > max || x.is_nan())
            {
                return Err(format!("{} must be at most {max}", at(path)));
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                return Err(format!("{} has {} items; at most {max} are accepted", at(path), items.len()));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{i}]"))?;
                }
            }
        }
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for name in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(name) {
                        return Err(format!("argument `{}` is required", join(path, name)));
                    }
                }
            }
            for (name, v) in map {
                match props.and_then(|p| p.get(name)) {
                    Some(s) => check(s, v, &join(path, name))?,
                    None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                        let known: Vec<&str> =
                            props.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                        return Err(format!(
                            "argument `{}` is not known; the arguments are: {}",
                            join(path, name),
                            known.join(", ")
                        ));
                    }
                    None => {}
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
    Ok(())
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "maxLength": 10},
                "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                "mode": {"type": "string", "enum": ["a", "b"]},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}
            },
            "required": ["path"],
            "additionalProperties": false
        })
    }

    #[test]
    fn accepts_valid_arguments() {
        validate(&schema(), &json!({"path": "x", "limit": 3, "mode": "a", "tags": ["t"]})).expect("valid");
    }

    #[test]
    fn each_violation_is_named() {
        let cases = [
            (json!([]), "must be of type object"),
            (json!({}), "`path` is required"),
            (json!({"path": 3}), "`path` must be of type string"),
            (json!({"path": "01234567890"}), "at most 10"),
            (json!({"path": "x", "limit": 0}), "at least 1"),
            (json!({"path": "x", "limit": 1.5}), "of type integer"),
            (json!({"path": "x", "mode": "c"}), "one of"),
            (json!({"path": "x", "tags": ["a", "b", "c"]}), "at most 2"),
            (json!({"path": "x", "tags": [1]}), "`tags[0]`"),
            (json!({"path": "x", "extra": 1}), "`extra` is not known"),
        ];
        for (args, expect) in cases {
            let e = validate(&schema(), &args).expect_err("invalid");
            assert!(e.contains(expect), "{args}: {e}");
        }
    }
}
