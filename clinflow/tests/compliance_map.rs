//! docs/compliance.md names, for each checklist item, the tests and controls
//! that cover it. This holds the map to the code: every reference in it
//! names something that exists (a Rust test, a Python unittest method, a
//! promtool-tested alert, a CI script, a documented section), every row names
//! at least one test or control, the summary line counts the rows as they
//! are, and every seed item is there, quoted verbatim (checked against
//! `../shared/seeds` when that folder is beside the workspace). The syntax of
//! the references is the document's "References" table.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAP: &str = "docs/compliance.md";

/// Rows per seed list: seed 000's HIPAA and GDPR sub-items, seed 004's core
/// requirements, PHI-handling measures, best practices, settings, conclusion.
const SEED_ROWS: [(&str, usize); 7] =
    [("000.H", 12), ("000.G", 14), ("004.R", 6), ("004.P", 5), ("004.B", 20), ("004.S", 4), ("004.C", 5)];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// One reference of the map: its kind (`test`, `pytest`, …), what it names,
/// and the line it is on.
#[derive(Debug, Clone)]
struct Reference {
    kind: String,
    target: String,
    line: usize,
}

impl Reference {
    fn automated(&self) -> bool {
        matches!(self.kind.as_str(), "test" | "pytest" | "alert" | "ci")
    }
    fn covers(&self) -> bool {
        self.automated() || self.kind == "control"
    }
}

const KINDS: [&str; 6] = ["test", "pytest", "alert", "ci", "control", "open"];

/// The references in the code spans of one line.
fn references(text: &str, line: usize) -> Vec<Reference> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|span| {
            let (kind, target) = span.split_once(':')?;
            KINDS.contains(&kind).then(|| Reference { kind: kind.to_owned(), target: target.to_owned(), line })
        })
        .collect()
}

/// A table row of the map: its id, its cells, its references.
struct Row {
    id: String,
    cells: Vec<String>,
    refs: Vec<Reference>,
    line: usize,
}

/// `000.H1`, `004.B20`, `34.5`: digits, a dot, optional capitals, digits.
fn is_row_id(cell: &str) -> bool {
    let Some((seed, item)) = cell.split_once('.') else { return false };
    let number = item.trim_start_matches(|c: char| c.is_ascii_uppercase());
    !seed.is_empty()
        && seed.chars().all(|c| c.is_ascii_digit())
        && !number.is_empty()
        && number.chars().all(|c| c.is_ascii_digit())
}

fn rows(map: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    for (i, text) in map.lines().enumerate() {
        let Some(inner) = text.trim().strip_prefix('|').and_then(|t| t.strip_suffix('|')) else { continue };
        let cells: Vec<String> = inner.split('|').map(|c| c.trim().to_owned()).collect();
        if cells.first().is_some_and(|c| is_row_id(c)) {
            rows.push(Row { id: cells[0].clone(), refs: references(text, i + 1), cells, line: i + 1 });
        }
    }
    rows
}

/// A Rust test: `fn NAME(` with a test attribute among the lines above it.
fn check_rust_test(root: &Path, target: &str) -> Result<(), String> {
    let (file, name) = target.rsplit_once("::").ok_or("not FILE::FUNCTION")?;
    let code = read(&root.join(file)).ok_or_else(|| format!("no file {file}"))?;
    let lines: Vec<&str> = code.lines().collect();
    let signature = format!("fn {name}(");
    let defines = |line: &str| {
        let t = line.trim_start();
        let t = t.strip_prefix("pub(crate) ").or_else(|| t.strip_prefix("pub ")).unwrap_or(t);
        t.strip_prefix("async ").unwrap_or(t).starts_with(&signature)
    };
    let at = lines.iter().position(|l| defines(l)).ok_or_else(|| format!("{file} has no fn {name}"))?;
    let is_test = lines[..at]
        .iter()
        .rev()
        .map(|l| l.trim())
        .take_while(|l| l.starts_with("#[") || l.starts_with("//"))
        .any(|l| ["#[test]", "#[tokio::test", "#[sqlx::test"].iter().any(|a| l.starts_with(a)));
    is_test.then_some(()).ok_or_else(|| format!("fn {name} in {file} is not a #[test]"))
}

/// A Python unittest method: `def METHOD(` after `class CLASS(`, before the next class.
fn check_python_test(root: &Path, target: &str) -> Result<(), String> {
    let [file, class, method] = target.split("::").collect::<Vec<_>>()[..] else {
        return Err("not FILE::CLASS::METHOD".into());
    };
    let code = read(&root.join(file)).ok_or_else(|| format!("no file {file}"))?;
    let mut lines = code.lines().skip_while(|l| !l.starts_with(&format!("class {class}(")));
    lines.next().ok_or_else(|| format!("{file} has no class {class}"))?;
    let def = format!("def {method}(");
    lines
        .take_while(|l| !l.starts_with("class "))
        .any(|l| l.trim_start().starts_with(&def))
        .then_some(())
        .ok_or_else(|| format!("class {class} in {file} has no method {method}"))
}

/// The lines of every `*.yml` file of `dir`, trimmed.
fn yaml_lines(dir: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "yml") {
            lines.extend(read(&entry.path()).unwrap_or_default().lines().map(|l| l.trim().to_owned()));
        }
    }
    lines
}

/// An alert: a rule in prometheus/rules and a promtool test in prometheus/tests.
fn check_alert(root: &Path, name: &str) -> Result<(), String> {
    let rule = format!("alert: {name}");
    if !yaml_lines(&root.join("prometheus/rules")).iter().any(|l| l.trim_start_matches("- ") == rule) {
        return Err(format!("no rule `{rule}` in prometheus/rules/*.yml"));
    }
    let tested = format!("alertname: {name}");
    if !yaml_lines(&root.join("prometheus/tests")).contains(&tested) {
        return Err(format!("no promtool test of {name} in prometheus/tests/*.yml"));
    }
    Ok(())
}

/// A check script that exists and that .ci/run runs.
fn check_ci(root: &Path, path: &str) -> Result<(), String> {
    if !root.join(path).is_file() {
        return Err(format!("no file {path}"));
    }
    let ci = read(&root.join(".ci/run")).unwrap_or_default();
    ci.contains(path).then_some(()).ok_or_else(|| format!(".ci/run does not run {path}"))
}

/// GitHub's anchor of a heading: lower case, spaces to `-`, only letters,
/// digits, `-` and `_` kept.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// A documented control: a file and one of its headings' anchors.
fn check_control(root: &Path, target: &str) -> Result<(), String> {
    let (file, wanted) = target.split_once('#').ok_or("not FILE#SECTION")?;
    let doc = read(&root.join(file)).ok_or_else(|| format!("no file {file}"))?;
    let mut in_fence = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence && line.starts_with('#') && anchor(line.trim_start_matches('#')) == wanted {
            return Ok(());
        }
    }
    Err(format!("{file} has no section #{wanted}"))
}

fn check(root: &Path, r: &Reference) -> Result<(), String> {
    match r.kind.as_str() {
        "test" => check_rust_test(root, &r.target),
        "pytest" => check_python_test(root, &r.target),
        "alert" => check_alert(root, &r.target),
        "ci" => check_ci(root, &r.target),
        "control" => check_control(root, &r.target),
        _ if r.target.trim().is_empty() => Err("says nothing".to_owned()),
        _ => Ok(()),
    }
}

#[test]
fn every_reference_of_the_compliance_map_names_something_that_exists() {
    let root = root();
    let map = read(&root.join(MAP)).expect("docs/compliance.md");
    let mut missing = Vec::new();
    for (i, line) in map.lines().enumerate() {
        for r in references(line, i + 1) {
            if let Err(why) = check(&root, &r) {
                missing.push(format!("{MAP}:{}: `{}:{}`: {why}", r.line, r.kind, r.target));
            }
        }
    }
    assert!(missing.is_empty(), "references that name nothing:\n{}", missing.join("\n"));
}

/// The seed item a row quotes: its second cell, between double quotes.
fn quote(row: &Row) -> Option<&str> {
    row.cells.get(1)?.strip_prefix('"')?.strip_suffix('"')
}

fn is_seed_row(row: &Row) -> bool {
    row.id.starts_with("000.") || row.id.starts_with("004.")
}

#[test]
fn every_row_names_a_test_or_a_control_and_every_seed_list_is_whole() {
    let rows = rows(&read(&root().join(MAP)).expect("docs/compliance.md"));
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for row in &rows {
        if !seen.insert(row.id.as_str()) {
            problems.push(format!("{MAP}:{}: row {} twice", row.line, row.id));
        }
        if !row.refs.iter().any(Reference::covers) {
            problems.push(format!("{MAP}:{}: row {} names no test and no control", row.line, row.id));
        }
        if is_seed_row(row) && quote(row).is_none_or(str::is_empty) {
            problems.push(format!("{MAP}:{}: row {} quotes no item (\"…\" in its second cell)", row.line, row.id));
        }
    }
    for (prefix, expected) in SEED_ROWS {
        let n = rows.iter().filter(|r| r.id.strip_prefix(prefix).is_some_and(|n| n.parse::<u32>().is_ok())).count();
        if n != expected {
            problems.push(format!("{MAP}: {n} rows {prefix}…, the seed has {expected} items"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// (seed rows, proved by a test, by a control alone, open): an open row
/// counts as open whatever else it names.
fn tally(rows: &[Row]) -> [usize; 4] {
    let seed: Vec<&Row> = rows.iter().filter(|r| is_seed_row(r)).collect();
    let open = seed.iter().filter(|r| r.refs.iter().any(|x| x.kind == "open")).count();
    let tested =
        seed.iter().filter(|r| r.refs.iter().all(|x| x.kind != "open") && r.refs.iter().any(Reference::automated));
    let tested = tested.count();
    [seed.len(), tested, seed.len() - tested - open, open]
}

#[test]
fn the_summary_counts_the_rows_as_they_are() {
    let map = read(&root().join(MAP)).expect("docs/compliance.md");
    let [total, tested, controlled, open] = tally(&rows(&map));
    let summary = format!(
        "Summary: {total} seed items: {tested} proved by at least one automated test, {controlled} by a named control alone, {open} open"
    );
    eprintln!("{summary}");
    assert!(map.contains(&summary), "{MAP} should say:\n{summary}");
}

/// The seed files `000_*.txt` and `004_*.txt`, if the seeds are beside the workspace.
fn seeds() -> Option<BTreeMap<&'static str, String>> {
    let dir = std::env::var_os("CLINFLOW_SEEDS_DIR").map_or_else(|| root().join("../shared/seeds"), PathBuf::from);
    let mut seeds = BTreeMap::new();
    for entry in fs::read_dir(&dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        for seed in ["000", "004"] {
            if name.starts_with(&format!("{seed}_")) && name.ends_with(".txt") {
                seeds.insert(seed, read(&entry.path())?);
            }
        }
    }
    (seeds.len() == 2).then_some(seeds)
}

/// The items of each seed's lists: seed 000's checklist sub-items (`  - [ ] …`),
/// seed 004's numbered and bulleted lines outside its code blocks.
fn seed_items(seed: &str, text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut in_fence = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        let item = match seed {
            "000" => line.strip_prefix("  - [ ] "),
            _ if in_fence => None,
            _ => line
                .strip_prefix("- ")
                .or_else(|| line.split_once(". ").filter(|(n, _)| n.parse::<u32>().is_ok()).map(|(_, t)| t)),
        };
        items.extend(item.map(|i| i.trim_end().to_owned()));
    }
    items
}

#[test]
fn every_seed_item_is_quoted_verbatim() {
    let Some(seeds) = seeds() else {
        eprintln!("no ../shared/seeds beside the workspace (or CLINFLOW_SEEDS_DIR): quotes not compared");
        return;
    };
    let rows = rows(&read(&root().join(MAP)).expect("docs/compliance.md"));
    let mut problems = Vec::new();
    for row in rows.iter().filter(|r| is_seed_row(r)) {
        let (seed, text) = seeds.iter().find(|(s, _)| row.id.starts_with(*s)).expect("000 or 004");
        if quote(row).is_some_and(|q| !text.contains(q)) {
            problems.push(format!("{MAP}:{}: row {} is not a verbatim quote of seed {seed}", row.line, row.id));
        }
    }
    let quoted: BTreeSet<&str> = rows.iter().filter_map(quote).collect();
    for (seed, text) in &seeds {
        for item in seed_items(seed, text) {
            if !quoted.contains(item.as_str()) {
                problems.push(format!("seed {seed}: no row quotes {item:?}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
