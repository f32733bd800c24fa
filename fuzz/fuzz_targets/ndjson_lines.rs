//! The batch endpoint's NDJSON line splitter (`batch::Lines`, through
//! `fuzz_split_lines`) over a body arriving in chunks of any sizes: no
//! panic; the same lines, numbers and refusals as a plain split of the
//! whole body on `\n`, whatever the chunking (up to where a body over its
//! byte limit stops being read); no kept line over its limit; no refusal
//! message quoting the body.
#![no_main]

use std::sync::LazyLock;

use axum::body::Body;
use clinflow_api::batch::{BatchLimits, fuzz_split_lines};
use clinflow_fuzz::assert_quotes_nothing;
use libfuzzer_sys::fuzz_target;

const LIMITS: BatchLimits = BatchLimits { max_lines: 12, max_bytes: 3000, max_line_bytes: 200 };

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("a runtime"));

type Outcome = (usize, Result<Vec<u8>, &'static str>);

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk sizes; the rest is the body.
    let Some((&pattern, body)) = data.split_first() else { return };
    let chunks: Vec<Vec<u8>> = chunked(body, pattern);
    let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::convert::Infallible>));
    let got = RUNTIME.block_on(fuzz_split_lines(Body::from_stream(stream), LIMITS)).expect("an in-memory body reads");
    let got: Vec<Outcome> = got
        .into_iter()
        .map(|(n, content)| {
            (
                n,
                content.map_err(|(code, message)| {
                    assert_quotes_nothing(&message);
                    code
                }),
            )
        })
        .collect();
    for pair in got.windows(2) {
        assert!(pair[0].0 < pair[1].0, "line numbers out of order: {got:?}");
    }
    for (_, content) in &got {
        if let Ok(line) = content {
            assert!(line.len() <= LIMITS.max_line_bytes && !line.contains(&b'\n'));
        }
    }
    let expected = reference(body);
    if body.len() <= LIMITS.max_bytes {
        assert_eq!(got, expected);
    } else {
        // Reading stops in the chunk that passes the limit: what came
        // before is as the plain split says, then one `batch_too_large`.
        let (last, before) = got.split_last().expect("a refusal at least");
        assert_eq!(last.1, Err("batch_too_large"));
        assert_eq!(before, &expected[..before.len()]);
    }
});

/// Chunks of 1 to 64 bytes, their sizes cycling through a pattern.
fn chunked(body: &[u8], pattern: u8) -> Vec<Vec<u8>> {
    let sizes = [1 + usize::from(pattern & 0x3f), 1 + usize::from(pattern >> 4), 1 + usize::from(pattern % 7)];
    let mut chunks = Vec::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(sizes[i % sizes.len()].min(rest.len()));
        chunks.push(chunk.to_vec());
        rest = tail;
        i += 1;
    }
    chunks
}

/// The splitter's rules applied to the whole body at once.
fn reference(body: &[u8]) -> Vec<Outcome> {
    let mut out = Vec::new();
    let mut segments: Vec<&[u8]> = body.split(|b| *b == b'\n').collect();
    if segments.last().is_some_and(|s| s.is_empty()) {
        segments.pop();
    }
    for (i, line) in segments.into_iter().enumerate() {
        let number = i + 1;
        if line.len() > LIMITS.max_line_bytes {
            out.push((number, Err("line_too_large")));
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else if number > LIMITS.max_lines {
            out.push((number, Err("too_many_lines")));
        } else {
            out.push((number, Ok(line.to_vec())));
        }
    }
    out
}
