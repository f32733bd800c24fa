//! The front-matter block at the top of a `.txt` note:
//!
//! ```text
//! ---
//! patient_ref: PAT-100234
//! document_date: 2026-02-14
//! ---
//! <note text>
//! ```
//!
//! Only `patient_ref`, `document_date` and `source_ref` are used; other keys
//! are ignored. The text is everything after the closing `---` line (that
//! line's own newline excluded), byte for byte, so annotation offsets returned
//! by the API match the file. LF and CRLF files are both accepted.

use std::fmt;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct FrontMatter<'a> {
    pub patient_ref: Option<&'a str>,
    pub document_date: Option<&'a str>,
    pub source_ref: Option<&'a str>,
    pub text: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontMatterError {
    /// The file does not start with a `---` line.
    Missing,
    /// No closing `---` line.
    Unterminated,
    /// A line inside the block that is not `key: value` (1-based file line).
    MalformedLine(usize),
}

impl fmt::Display for FrontMatterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("missing front matter (the file must start with a `---` line)"),
            Self::Unterminated => f.write_str("front matter has no closing `---` line"),
            Self::MalformedLine(n) => {
                write!(f, "front matter line {n} is not `key: value` (is the closing `---` missing?)")
            }
        }
    }
}

impl std::error::Error for FrontMatterError {}

pub fn parse(content: &str) -> Result<FrontMatter<'_>, FrontMatterError> {
    let content = content.strip_prefix('\u{feff}').unwrap_or(content);
    let mut lines = content.split_inclusive('\n');
    let mut offset = match lines.next() {
        Some(first) if is_delimiter(first) => first.len(),
        _ => return Err(FrontMatterError::Missing),
    };
    let mut fm = FrontMatter::default();
    for (index, line) in lines.enumerate() {
        offset += line.len();
        if is_delimiter(line) {
            fm.text = &content[offset..];
            return Ok(fm);
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(':').ok_or(FrontMatterError::MalformedLine(index + 2))?;
        let value = unquote(value.trim());
        match key.trim() {
            "patient_ref" => fm.patient_ref = Some(value),
            "document_date" => fm.document_date = Some(value),
            "source_ref" => fm.source_ref = Some(value),
            _ => {}
        }
    }
    Err(FrontMatterError::Unterminated)
}

fn is_delimiter(line: &str) -> bool {
    line.trim_end() == "---"
}

/// `"PAT-1"` and `'PAT-1'` mean `PAT-1`, as they would in YAML.
fn unquote(value: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(quote).and_then(|v| v.strip_suffix(quote)) {
            return inner;
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let file = "---\npatient_ref: PAT-100234\ndocument_date: 2026-02-14\ndocument_type: discharge_summary\n---\nPatient admitted.\nSecond line.\n";
        let fm = parse(file).unwrap();
        assert_eq!(fm.patient_ref, Some("PAT-100234"));
        assert_eq!(fm.document_date, Some("2026-02-14"));
        assert_eq!(fm.source_ref, None);
        assert_eq!(fm.text, "Patient admitted.\nSecond line.\n");
    }

    #[test]
    fn parses_crlf_files_and_keeps_the_text_bytes() {
        let file = "---\r\npatient_ref: PAT-1\r\ndocument_date: 2026-02-14\r\n---\r\nLine one.\r\nLine two.";
        let fm = parse(file).unwrap();
        assert_eq!(fm.patient_ref, Some("PAT-1"));
        assert_eq!(fm.document_date, Some("2026-02-14"));
        assert_eq!(fm.text, "Line one.\r\nLine two.");
    }

    #[test]
    fn strips_a_bom_quotes_comments_and_blank_lines() {
        let file = "\u{feff}---\n# exported by EHR\n\npatient_ref: \"PAT-2\"\nsource_ref: 'ehr/42'\n---\ntext";
        let fm = parse(file).unwrap();
        assert_eq!(fm.patient_ref, Some("PAT-2"));
        assert_eq!(fm.source_ref, Some("ehr/42"));
        assert_eq!(fm.text, "text");
    }

    #[test]
    fn value_may_contain_colons() {
        let fm = parse("---\npatient_ref: urn:pat:7\n---\nx").unwrap();
        assert_eq!(fm.patient_ref, Some("urn:pat:7"));
    }

    #[test]
    fn missing_front_matter_is_an_error() {
        assert_eq!(parse("Just a note.\n"), Err(FrontMatterError::Missing));
        assert_eq!(parse(""), Err(FrontMatterError::Missing));
        assert_eq!(parse("\n---\npatient_ref: P\n---\nx"), Err(FrontMatterError::Missing));
    }

    #[test]
    fn unterminated_and_malformed_blocks_are_errors() {
        assert_eq!(parse("---\npatient_ref: P\nnote: no end"), Err(FrontMatterError::Unterminated));
        assert_eq!(parse("---\npatient_ref: P\nnot a pair\n---\nx"), Err(FrontMatterError::MalformedLine(3)));
    }

    #[test]
    fn text_may_be_empty() {
        assert_eq!(parse("---\npatient_ref: P\n---").unwrap().text, "");
        assert_eq!(parse("---\r\npatient_ref: P\r\n---\r\n").unwrap().text, "");
    }

    #[test]
    fn error_messages_do_not_echo_content() {
        let err = parse("---\nPAT-SECRET\n---\nx").unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
    }
}
