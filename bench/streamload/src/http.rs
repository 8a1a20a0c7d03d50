//! Just enough HTTP/1.1: the mock's request parser and the client's incremental response decoder.

#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    pub close: bool,
}

#[derive(Debug)]
pub enum Parse {
    Incomplete,
    /// The request and how many bytes of the buffer it used.
    Done(Request, usize),
    Bad(String),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request from the front of `buf` (Content-Length or chunked body).
pub fn parse_request(buf: &[u8]) -> Parse {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > 64 * 1024 {
            Parse::Bad("request head too large".into())
        } else {
            Parse::Incomplete
        };
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Parse::Bad("bad request line".into());
    };
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (
            name.trim().to_ascii_lowercase(),
            value.trim().to_ascii_lowercase(),
        );
        match name.as_str() {
            "content-length" => match value.parse() {
                Ok(n) => length = Some(n),
                Err(_) => return Parse::Bad("bad content-length".into()),
            },
            "transfer-encoding" => chunked = value.contains("chunked"),
            "connection" => {
                close = value.contains("close") || (close && !value.contains("keep-alive"))
            }
            _ => {}
        }
    }
    let start = head_end + 4;
    let (body, used) = if chunked {
        let mut dec = ChunkedDecoder::default();
        let mut body = Vec::new();
        match dec.feed(&buf[start..], &mut body) {
            Err(e) => return Parse::Bad(e),
            Ok(_) if !dec.done => return Parse::Incomplete,
            Ok(n) => (body, start + n),
        }
    } else {
        let n = length.unwrap_or(0);
        if buf.len() < start + n {
            return Parse::Incomplete;
        }
        (buf[start..start + n].to_vec(), start + n)
    };
    Parse::Done(
        Request {
            method: method.to_string(),
            path: path.to_string(),
            body,
            close,
        },
        used,
    )
}

#[derive(Debug, Default)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataCr,
    DataLf,
    Trailer,
    Done,
}

/// Incremental decoder of a chunked body.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
    pub done: bool,
}

impl ChunkedDecoder {
    /// Decode what `input` holds, appending payload to `out`; returns the bytes consumed (all of
    /// `input` unless the body ends inside it).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, String> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Size | ChunkState::Trailer => {
                    let b = input[i];
                    i += 1;
                    if b != b'\n' {
                        if self.line.len() > 4096 {
                            return Err("chunk size line too long".into());
                        }
                        self.line.push(b);
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line[..]);
                    if matches!(self.state, ChunkState::Trailer) {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                            self.done = true;
                            return Ok(i);
                        }
                        continue;
                    }
                    let hex = line.split(|&c| c == b';').next().unwrap_or(b"");
                    let text =
                        std::str::from_utf8(hex).map_err(|_| "bad chunk size".to_string())?;
                    let size = usize::from_str_radix(text.trim(), 16)
                        .map_err(|_| format!("bad chunk size {:?}", text.trim()))?;
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    let take = left.min(input.len() - i);
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    self.state = if take == left {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left - take)
                    };
                }
                ChunkState::DataCr => {
                    if input[i] != b'\r' {
                        return Err("chunk not followed by CRLF".into());
                    }
                    i += 1;
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if input[i] != b'\n' {
                        return Err("chunk not followed by CRLF".into());
                    }
                    i += 1;
                    self.state = ChunkState::Size;
                }
                ChunkState::Done => return Ok(i),
            }
        }
        Ok(i)
    }
}

#[derive(Debug)]
enum Framing {
    Chunked(ChunkedDecoder),
    Length(usize),
    UntilClose,
}

/// Incremental decoder of one HTTP/1.1 response (status, headers, body).
#[derive(Debug, Default)]
pub struct ResponseDecoder {
    head: Vec<u8>,
    pub status: u16,
    framing: Option<Framing>,
    pub complete: bool,
}

impl ResponseDecoder {
    /// Feed bytes from the socket; decoded body bytes are appended to `out`.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        if self.framing.is_none() {
            self.head.extend_from_slice(data);
            let Some(end) = find(&self.head, b"\r\n\r\n") else {
                if self.head.len() > 64 * 1024 {
                    return Err("response head too large".into());
                }
                return Ok(());
            };
            let head = std::mem::take(&mut self.head);
            self.parse_head(&head[..end])?;
            let rest = &head[end + 4..];
            return self.feed_body(rest, out);
        }
        if self.complete {
            data = &[];
        }
        self.feed_body(data, out)
    }

    fn parse_head(&mut self, head: &[u8]) -> Result<(), String> {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.split(' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(format!("bad status line {status_line:?}"));
        }
        self.status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or(format!("bad status line {status_line:?}"))?;
        let mut framing = Framing::UntilClose;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim();
            if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked") {
                framing = Framing::Chunked(ChunkedDecoder::default());
            } else if name == "content-length" && !matches!(framing, Framing::Chunked(_)) {
                framing = Framing::Length(
                    value
                        .parse()
                        .map_err(|_| "bad content-length".to_string())?,
                );
            }
        }
        if matches!(framing, Framing::Length(0)) || self.status == 204 || self.status == 304 {
            self.complete = true;
        }
        self.framing = Some(framing);
        Ok(())
    }

    fn feed_body(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        match &mut self.framing {
            Some(Framing::Chunked(dec)) => {
                dec.feed(data, out)?;
                self.complete = dec.done;
            }
            Some(Framing::Length(left)) => {
                let take = (*left).min(data.len());
                out.extend_from_slice(&data[..take]);
                *left -= take;
                self.complete = *left == 0;
            }
            Some(Framing::UntilClose) => out.extend_from_slice(data),
            None => {}
        }
        Ok(())
    }

    /// The peer closed the connection: complete only for a body delimited by the close.
    pub fn eof(&mut self) -> Result<(), String> {
        if matches!(self.framing, Some(Framing::UntilClose)) {
            self.complete = true;
        }
        if self.complete {
            Ok(())
        } else {
            Err("connection closed before the response was complete".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode_byte_by_byte() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let mut dec = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut used = 0;
        for b in wire.chunks(1) {
            if dec.done {
                break;
            }
            used += dec.feed(b, &mut out).expect("valid");
        }
        assert!(dec.done);
        assert_eq!(out, b"hello, world");
        assert_eq!(&wire[used..], b"NEXT");
        let mut bad = ChunkedDecoder::default();
        assert!(bad.feed(b"3\r\nabcX", &mut Vec::new()).is_err());
        assert!(ChunkedDecoder::default()
            .feed(b"zz\r\n", &mut Vec::new())
            .is_err());
    }

    #[test]
    fn requests_parse_with_length_or_chunks() {
        let raw =
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbodyGET";
        let Parse::Done(req, used) = parse_request(raw) else {
            panic!("not parsed")
        };
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.body.as_slice()),
            ("POST", "/v1/chat/completions", &b"body"[..])
        );
        assert_eq!(&raw[used..], b"GET");
        assert!(!req.close);
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nab\r\n0\r\n\r\n";
        let Parse::Done(req, used) = parse_request(raw) else {
            panic!("not parsed")
        };
        assert_eq!(
            (req.body.as_slice(), used, req.close),
            (&b"ab"[..], raw.len(), true)
        );
        assert!(matches!(
            parse_request(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc"),
            Parse::Incomplete
        ));
    }

    #[test]
    fn responses_decode_in_pieces() {
        let wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let mut resp = ResponseDecoder::default();
        let mut out = Vec::new();
        for piece in wire.chunks(7) {
            resp.feed(piece, &mut out).expect("valid");
        }
        assert!(resp.complete);
        assert_eq!((resp.status, out.as_slice()), (200, &b"abc"[..]));
        let mut short = ResponseDecoder::default();
        short
            .feed(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
                &mut Vec::new(),
            )
            .expect("valid");
        assert!(short.eof().is_err());
    }
}
