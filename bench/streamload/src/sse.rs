//! The mock's deterministic stream bodies and the few request fields it reads.
//!
//! Frame `j` of a `tokens`-token stream is one HTTP chunk: for `j < tokens` a content event
//! (`tok{j} `), for `j == tokens` the final event (`finish_reason: stop`) followed by `data: [DONE]`
//! and the terminating zero-size chunk. The bytes depend only on the model name and `j`, so every
//! stream of a given length is byte-identical and the client can build the reference itself.

/// A fixed `created` so that bodies never change between runs.
const CREATED: u64 = 1_700_000_000;

pub fn token_event(model: &str, k: usize) -> Vec<u8> {
    format!(
        "data: {{\"id\":\"chatcmpl-streamload\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\
         \"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{k} \"}},\
         \"finish_reason\":null}}]}}\n\n"
    )
    .into_bytes()
}

pub fn final_events(model: &str) -> Vec<u8> {
    format!(
        "data: {{\"id\":\"chatcmpl-streamload\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\
         \"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n\
         data: [DONE]\n\n"
    )
    .into_bytes()
}

/// The decoded body every client must receive for a `tokens`-token stream.
pub fn reference_body(model: &str, tokens: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for k in 0..tokens {
        out.extend_from_slice(&token_event(model, k));
    }
    out.extend_from_slice(&final_events(model));
    out
}

/// `payload` as one chunk of a chunked body; `last` appends the terminating zero-size chunk.
pub fn chunk(payload: &[u8], last: bool) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
    if last {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    out
}

/// Pre-framed chunks for streams of up to `max_tokens` tokens.
pub struct Frames {
    tokens: Vec<Vec<u8>>,
    last: Vec<u8>,
}

impl Frames {
    pub fn new(model: &str, max_tokens: usize) -> Self {
        let tokens = (0..max_tokens)
            .map(|k| chunk(&token_event(model, k), false))
            .collect();
        Frames {
            tokens,
            last: chunk(&final_events(model), true),
        }
    }

    /// Frame `j` of a `tokens`-token stream (`j <= tokens <= max_tokens`).
    pub fn get(&self, j: usize, tokens: usize) -> &[u8] {
        if j < tokens {
            &self.tokens[j]
        } else {
            &self.last
        }
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

/// The value after `"key"` `:` (whitespace allowed), as raw bytes up to the next `,` `}` or `]`.
fn json_scalar<'a>(body: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let mut quoted = Vec::with_capacity(key.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(key);
    quoted.push(b'"');
    let mut from = 0;
    while let Some(at) = find(body, &quoted, from) {
        let mut i = at + quoted.len();
        while i < body.len() && body[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < body.len() && body[i] == b':' {
            i += 1;
            while i < body.len() && body[i].is_ascii_whitespace() {
                i += 1;
            }
            let end = (i..body.len())
                .find(|&e| matches!(body[e], b',' | b'}' | b']'))
                .unwrap_or(body.len());
            return Some(body[i..end].trim_ascii());
        }
        from = at + 1;
    }
    None
}

/// Whether a chat request asks for a stream (`"stream": true`).
pub fn wants_stream(body: &[u8]) -> bool {
    json_scalar(body, b"stream") == Some(b"true".as_slice())
}

/// The length a chat request asks for: `max_completion_tokens` (sglang-router rewrites `max_tokens`
/// to it), else `max_tokens`, if it is a plain integer.
pub fn max_tokens(body: &[u8]) -> Option<usize> {
    let value =
        json_scalar(body, b"max_completion_tokens").or_else(|| json_scalar(body, b"max_tokens"))?;
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The stream id the load client puts in the prompt (`sl-<id>-`), so the mock can report its send times.
pub fn stream_id(body: &[u8]) -> Option<u64> {
    let at = find(body, b"sl-", 0)? + 3;
    let end = (at..body.len()).find(|&i| !body[i].is_ascii_digit())?;
    if end == at || body[end] != b'-' {
        return None;
    }
    std::str::from_utf8(&body[at..end]).ok()?.parse().ok()
}

/// The chat request the load client sends for stream `id`.
pub fn request_body(model: &str, id: u64, tokens: usize) -> Vec<u8> {
    format!(
        "{{\"model\":\"{model}\",\"stream\":true,\"max_tokens\":{tokens},\
         \"messages\":[{{\"role\":\"user\",\"content\":\"sl-{id}- Count slowly.\"}}]}}"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_fields_are_read_back() {
        let body = request_body("m", 42, 7);
        assert!(wants_stream(&body));
        assert_eq!(max_tokens(&body), Some(7));
        assert_eq!(stream_id(&body), Some(42));
        let spaced = br#"{"stream_options": {}, "stream" : true , "max_tokens": 12}"#;
        assert!(wants_stream(spaced));
        assert_eq!(max_tokens(spaced), Some(12));
        assert!(!wants_stream(
            br#"{"stream_options":{"x":1},"stream":false}"#
        ));
        assert_eq!(stream_id(b"sl-12x"), None);
    }

    #[test]
    fn frames_concatenate_to_the_reference() {
        let frames = Frames::new("m", 5);
        let mut wire = Vec::new();
        for j in 0..=3 {
            wire.extend_from_slice(frames.get(j, 3));
        }
        let mut dec = crate::http::ChunkedDecoder::default();
        let mut out = Vec::new();
        let used = dec.feed(&wire, &mut out).expect("valid chunked body");
        assert!(dec.done);
        assert_eq!(used, wire.len());
        assert_eq!(out, reference_body("m", 3));
        assert!(out.ends_with(b"data: [DONE]\n\n"));
    }
}
