//! The JSON check: plain functions, unit-tested on the host.

/// Returns the JSON text to pass on, or why `text` is not one JSON value.
pub fn check(text: &str, strip_fences: bool) -> Result<String, String> {
    let trimmed = text.trim();
    let body = if strip_fences {
        unfence(trimmed)
    } else {
        trimmed
    };
    serde_json::from_str::<serde_json::Value>(body)
        .map(|_| body.to_owned())
        .map_err(|e| e.to_string())
}

/// The inside of a ```/```json fence around the whole text, else the text itself.
fn unfence(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    let Some(rest) = rest.strip_suffix("```") else {
        return text;
    };
    let rest = rest.strip_prefix("json").unwrap_or(rest);
    rest.trim()
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn accepts_json() {
        assert_eq!(
            check(" {\"a\": [1, 2]} ", true).as_deref(),
            Ok("{\"a\": [1, 2]}")
        );
        assert_eq!(
            check("```json\n{\"ok\":true}\n```", true).as_deref(),
            Ok("{\"ok\":true}")
        );
    }

    #[test]
    fn refuses_what_is_not_json() {
        for bad in ["Sure! {\"a\": 1}", "{\"a\": 1", "", "{\"a\": 1} trailing"] {
            let err = check(bad, true).expect_err(bad);
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(check("```json\n{\"ok\":true}\n```", false).is_err());
    }
}
