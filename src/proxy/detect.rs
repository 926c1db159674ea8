//! Protocol detection on the first bytes a client sends: HTTP/1, HTTP/2 prior knowledge, TLS
//! from the application, or anything else (opaque). Pure over a byte prefix.

/// What a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A TLS ClientHello from the application itself: passed through untouched.
    Tls,
    Opaque,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1",
            Protocol::Http2 => "http/2",
            Protocol::Tls => "tls",
            Protocol::Opaque => "opaque",
        }
    }
}

/// The HTTP/2 client connection preface.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const METHODS: [&[u8]; 9] =
    [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE "];

/// The verdict on a prefix, or `None` when more bytes are needed to decide.
pub fn detect(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    // A TLS record header: handshake (22), major version 3.
    if prefix[0] == 0x16 {
        return match prefix.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    if H2_PREFACE.starts_with(&prefix[..prefix.len().min(H2_PREFACE.len())]) {
        return if prefix.len() >= H2_PREFACE.len() { Some(Protocol::Http2) } else { None };
    }
    let mut undecided = false;
    for method in METHODS {
        let n = prefix.len().min(method.len());
        if prefix[..n] == method[..n] {
            if prefix.len() < method.len() {
                undecided = true;
                continue;
            }
            // Confirm with the request line's version once the line is complete.
            return match prefix.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    let line = &prefix[..end];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    Some(if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
                        Protocol::Http1
                    } else {
                        Protocol::Opaque
                    })
                }
                None if prefix.len() >= 8192 => Some(Protocol::Opaque),
                None => None,
            };
        }
    }
    if undecided { None } else { Some(Protocol::Opaque) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_recognised_from_their_first_bytes() {
        let cases: [(&[u8], Option<Protocol>); 12] = [
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Some(Protocol::Http1)),
            (b"POST /x HTTP/1.0\n", Some(Protocol::Http1)),
            (b"GET / HTTP/1.1", None),
            (b"GE", None),
            (b"GET /not-http\r\n", Some(Protocol::Opaque)),
            (H2_PREFACE, Some(Protocol::Http2)),
            (b"PRI * HTTP/2.0\r\n", None),
            (&[0x16, 0x03, 0x01, 0x02, 0x00], Some(Protocol::Tls)),
            (&[0x16], None),
            (b"\x00\x00\x00\x08hello", Some(Protocol::Opaque)),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Some(Protocol::Opaque)),
            (b"", None),
        ];
        for (bytes, expected) in cases {
            assert_eq!(detect(bytes), expected, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn an_endless_request_line_is_not_http() {
        let mut line = b"GET /".to_vec();
        line.resize(9000, b'a');
        assert_eq!(detect(&line), Some(Protocol::Opaque));
    }
}
