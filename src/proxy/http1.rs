//! HTTP/1.1 to a backend, carried by the request that uses the connection.
//!
//! hyper's client gives every connection a task of its own and passes requests and responses to
//! it over channels, so each request to a backend wakes two tasks and moves its request and
//! response between them. Here the request's own future writes the request and reads the
//! response head, and the response body reads the rest from the socket as it is polled. Once the
//! response has been read to its end, the body hands the connection back ([`Release`]) if it can
//! carry another request. A connection therefore belongs to one exchange at a time, and to no
//! task at all while it is idle.
//!
//! Framing follows RFC 9112: a request body of known length goes with `Content-Length`, any other
//! with chunked coding; a response is delimited by its method and status, `Transfer-Encoding`,
//! `Content-Length` or the end of the connection, in that order (section 6.3). Interim (1xx)
//! responses other than 101 are read and dropped. A response may start while the request body is
//! still going out (an echo, a stream): the response body then sends the rest as it is polled. A
//! response that ends before all of the request was sent ends the exchange; that connection is
//! closed, not used again.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, COOKIE, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use super::http::Body;

pub mod server;

/// Largest response head (status line and headers), and largest trailer section.
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in a response head or trailer section (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size, extensions, CRLF).
const MAX_CHUNK_LINE: usize = 1024;
/// Room made in the read buffer before each read.
const READ_SIZE: usize = 8 * 1024;
/// Buffers handed to one vectored write.
const MAX_IOVECS: usize = 16;

/// Takes a connection back once a response has been read to its end.
pub trait Release: Send + Sync + Unpin + 'static {
    fn release(self, conn: Connection);
}

/// A kept-alive HTTP/1.1 connection to a backend, and what was read from it past the last
/// response (nothing, between exchanges).
#[derive(Debug)]
pub struct Connection {
    io: TcpStream,
    read: BytesMut,
}

/// A failed exchange. The connection is gone with it.
#[derive(Debug)]
pub struct Failure {
    pub reason: String,
    /// Nothing came back on the connection before it failed: a request the backend cannot have
    /// acted on twice (no body, an idempotent method) may go again on another connection.
    pub nothing_received: bool,
}

impl Failure {
    fn new(reason: impl Into<String>, nothing_received: bool) -> Self {
        Self { reason: reason.into(), nothing_received }
    }
}

impl Connection {
    pub fn new(io: TcpStream) -> Self {
        Self { io, read: BytesMut::new() }
    }

    /// Whether an idle connection can still take a request: the backend has neither closed it
    /// nor sent anything unasked. Costs no system call unless the runtime saw the socket turn
    /// readable (a close, a reset, unasked bytes, or readiness left from the last response).
    pub fn is_usable(&self) -> bool {
        matches!(self.io.try_read(&mut [0; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends a request (`parts` in origin form, with its Host header) and reads the response
    /// head. The response body reads the rest, then gives the connection to `release` if it can
    /// carry another request.
    pub async fn send<R: Release>(
        mut self,
        parts: &Parts,
        body: Body,
        release: R,
    ) -> Result<Response<ResponseBody<R>>, Failure> {
        let framing = request_framing(parts, &body);
        let mut head = Vec::with_capacity(256);
        encode_head(parts, framing, &mut head);
        let mut sending = Sending::new(Bytes::from(head), body, framing);
        let head = poll_fn(|cx| self.poll_exchange(cx, &mut sending)).await?;
        let Head { status, version, mut headers, reason } = head;
        let mut keep =
            sending.failed.is_none() && reusable(version, &headers) && reusable(parts.version, &parts.headers);
        let framing = match response_framing(&parts.method, version, status, &mut headers) {
            Ok((framing, clean)) => {
                keep &= clean && status != StatusCode::SWITCHING_PROTOCOLS && !matches!(framing, Framing::Close);
                framing
            }
            Err(reason) => return Err(Failure::new(reason, false)),
        };
        let sending = (!sending.done()).then_some(sending);
        let mut body = ResponseBody { conn: Some(self), framing, keep, release: Some(release), ready: None, sending };
        body.take_buffered();
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if let Some(reason) = reason {
            response.extensions_mut().insert(reason);
        }
        Ok(response)
    }

    /// Writes the request while reading, until a final response head has arrived.
    fn poll_exchange(&mut self, cx: &mut Context<'_>, sending: &mut Sending) -> Poll<Result<Head, Failure>> {
        loop {
            // A backend may answer, and stop reading, before all of the request is sent.
            sending.poll_write(cx, &mut self.io);
            if let Some(reason) = sending.broken.take() {
                return Poll::Ready(Err(Failure::new(reason, false)));
            }
            // Interim responses are dropped; a final one ends the exchange.
            loop {
                match parse_head(&mut self.read) {
                    Ok(Some(head))
                        if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        continue;
                    }
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => break,
                    Err(reason) => return Poll::Ready(Err(Failure::new(reason, false))),
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    let reason = sending.failed.take();
                    let reason = reason.unwrap_or_else(|| "the backend closed the connection before responding".into());
                    return Poll::Ready(Err(Failure::new(reason, !sending.received)));
                }
                Ok(_) => sending.received = true,
                Err(e) => return Poll::Ready(Err(Failure::new(e.to_string(), !sending.received))),
            }
        }
    }

    /// Reads what the socket has into the buffer; 0 at the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    /// No body, and no header saying so.
    None,
    Length(u64),
    Chunked,
}

fn request_framing(parts: &Parts, body: &Body) -> RequestFraming {
    // A body in another coding (gzip, ...) stays so, with chunked coding last.
    if other_codings(&parts.headers).next().is_some() {
        return RequestFraming::Chunked;
    }
    let declared = super::peer::content_length(&parts.headers);
    if body.is_end_stream() {
        return if declared == Some(0) { RequestFraming::Length(0) } else { RequestFraming::None };
    }
    match body.size_hint().exact().or(declared) {
        Some(length) => RequestFraming::Length(length),
        None => RequestFraming::Chunked,
    }
}

/// The request's transfer codings other than chunked.
fn other_codings(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    field_tokens(headers, &TRANSFER_ENCODING).filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked"))
}

/// The comma-separated parts of a header value, without surrounding whitespace (RFC 9110, 5.6.1).
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// The parts of every field named `name`, in order.
fn field_tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a [u8]> {
    headers.get_all(name).iter().flat_map(|value| tokens(value.as_bytes()))
}

/// Why a Content-Length field could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LengthError {
    /// Not a list of decimal numbers.
    Invalid,
    /// A number unlike one given before.
    Differing,
}

/// Takes one Content-Length field's value into `length`, what the fields before it said: a list
/// of decimal numbers that must all agree (RFC 9110, 8.6).
fn add_content_length(length: &mut Option<u64>, value: &[u8]) -> Result<(), LengthError> {
    for part in tokens(value) {
        // `u64::from_str` also takes a leading `+`; an empty part is no number either. Over 19
        // digits is no length a body has (and more than HTTP/2 peers take).
        let digits =
            (part.len() <= 19 && part.iter().all(u8::is_ascii_digit)).then(|| std::str::from_utf8(part).ok()).flatten();
        let parsed = digits.and_then(|d| d.parse::<u64>().ok()).ok_or(LengthError::Invalid)?;
        if length.is_some_and(|l| l != parsed) {
            return Err(LengthError::Differing);
        }
        *length = Some(parsed);
    }
    Ok(())
}

/// The request line and headers. Content-Length and Transfer-Encoding are the body's own: they
/// are written from `framing`, not copied.
fn encode_head(parts: &Parts, framing: RequestFraming, out: &mut Vec<u8>) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() { b"/" } else { target.as_bytes() });
    // HTTP/1.0 has no chunked coding (no server of this proxy hands on such a request anyway).
    let http10 = parts.version == Version::HTTP_10 && framing != RequestFraming::Chunked;
    out.extend_from_slice(if http10 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" });
    let mut cookies_written = false;
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        if name == COOKIE {
            // HTTP/2 clients split cookies into several fields; HTTP/1.1 has one, its pairs
            // joined with "; " (RFC 9113, 8.2.3).
            if !cookies_written {
                cookies_written = true;
                out.extend_from_slice(b"cookie: ");
                for (i, value) in parts.headers.get_all(COOKIE).iter().enumerate() {
                    out.extend_from_slice(if i == 0 { b"" } else { b"; " });
                    out.extend_from_slice(value.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(length) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(length.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => {
            out.extend_from_slice(b"transfer-encoding: ");
            for coding in other_codings(&parts.headers) {
                out.extend_from_slice(coding);
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(b"chunked\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The request on its way out: bytes waiting for the socket, and the body they come from.
struct Sending {
    out: VecDeque<Bytes>,
    body: Option<Body>,
    framing: RequestFraming,
    /// Body bytes taken so far (checked against a declared length).
    sent: u64,
    /// Whether any byte of a response has arrived.
    received: bool,
    /// Why writing to the backend failed, if it did: nothing more is sent, and a response may
    /// still be read.
    failed: Option<String>,
    /// Why the request itself failed (its body broke off, or did not match its length): the
    /// exchange cannot complete, as the backend waits for the rest.
    broken: Option<String>,
}

/// Why sending stopped short.
enum Fault {
    Socket(String),
    Request(String),
}

impl Sending {
    fn new(head: Bytes, body: Body, framing: RequestFraming) -> Self {
        let has_body = !matches!(framing, RequestFraming::None | RequestFraming::Length(0));
        let body = has_body.then_some(body);
        Self { out: VecDeque::from([head]), body, framing, sent: 0, received: false, failed: None, broken: None }
    }

    /// Whether nothing more is to be sent: all of the request was written, or sending failed.
    fn done(&self) -> bool {
        self.body.is_none() && self.out.is_empty()
    }

    /// Writes what it can, until the socket or the request body is not ready. A failure ends
    /// the sending and is kept in `failed`.
    fn poll_write(&mut self, cx: &mut Context<'_>, io: &mut TcpStream) {
        if let Err(fault) = self.poll_write_inner(cx, io) {
            self.body = None;
            self.out.clear();
            match fault {
                Fault::Socket(reason) => self.failed = Some(reason),
                Fault::Request(reason) => self.broken = Some(reason),
            }
        }
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>, io: &mut TcpStream) -> Result<(), Fault> {
        loop {
            while !self.out.is_empty() {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let count = self.out.iter().zip(slices.iter_mut()).map(|(b, s)| *s = IoSlice::new(b)).count();
                let written = match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Ok(0)) => {
                        return Err(Fault::Socket("the backend connection took no more bytes".into()));
                    }
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(e)) => return Err(Fault::Socket(format!("writing the request: {e}"))),
                };
                self.consume(written);
            }
            let Some(body) = self.body.as_mut() else { return Ok(()) };
            let frame = match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(frame) => frame,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.push_data(data).map_err(Fault::Request)?,
                    Err(frame) => {
                        if let (Ok(trailers), RequestFraming::Chunked) = (frame.into_trailers(), self.framing) {
                            self.push_end(Some(&trailers));
                        }
                    }
                },
                Some(Err(e)) => return Err(Fault::Request(format!("reading the request body: {e}"))),
                None => {
                    if let RequestFraming::Length(length) = self.framing
                        && self.sent != length
                    {
                        return Err(Fault::Request(format!(
                            "the request body ended after {} of {length} bytes",
                            self.sent
                        )));
                    }
                    self.push_end(None);
                }
            }
        }
    }

    fn push_data(&mut self, data: Bytes) -> Result<(), String> {
        if data.is_empty() {
            return Ok(());
        }
        self.sent += data.len() as u64;
        match self.framing {
            RequestFraming::Length(length) if self.sent > length => {
                Err(format!("the request body is longer than its {length} bytes"))
            }
            RequestFraming::Chunked => {
                self.out.push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                self.out.push_back(data);
                self.out.push_back(Bytes::from_static(b"\r\n"));
                Ok(())
            }
            _ => {
                self.out.push_back(data);
                Ok(())
            }
        }
    }

    /// The body is complete: the last chunk and trailers of a chunked body.
    fn push_end(&mut self, trailers: Option<&HeaderMap>) {
        self.body = None;
        if self.framing == RequestFraming::Chunked {
            let mut end = b"0\r\n".to_vec();
            for (name, value) in trailers.into_iter().flatten() {
                end.extend_from_slice(name.as_str().as_bytes());
                end.extend_from_slice(b": ");
                end.extend_from_slice(value.as_bytes());
                end.extend_from_slice(b"\r\n");
            }
            end.extend_from_slice(b"\r\n");
            self.out.push_back(Bytes::from(end));
        }
    }

    fn consume(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.out.front_mut() else { return };
            if written < front.len() {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.out.pop_front();
        }
    }
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// The reason phrase, when it is not the status's usual one (hyper's HTTP/1 server writes
    /// it back out).
    reason: Option<hyper::ext::ReasonPhrase>,
}

/// Takes a complete response head off the front of `buf`; `None` until one has arrived.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut lines);
    let length = match response.parse(buf) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err(format!("the backend's response head is over {MAX_HEAD} bytes")),
        Err(e) => return Err(format!("the backend's response head is malformed: {e}")),
    };
    let status = response.code.and_then(|code| StatusCode::from_u16(code).ok());
    let status = status.ok_or("the backend's response has an invalid status")?;
    let version = if response.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let reason = response
        .reason
        .filter(|reason| Some(*reason) != status.canonical_reason())
        .and_then(|reason| hyper::ext::ReasonPhrase::try_from(reason.as_bytes()).ok());
    // Header values become slices of the head as received, not copies.
    let base = buf.as_ptr() as usize;
    let mut fields = Vec::with_capacity(response.headers.len());
    for line in response.headers.iter() {
        let name =
            HeaderName::from_bytes(line.name.as_bytes()).map_err(|_| "the backend sent an invalid header name")?;
        let start = line.value.as_ptr() as usize - base;
        fields.push((name, start..start + line.value.len()));
    }
    let head = buf.split_to(length).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, range) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(range));
        headers.append(name, value.map_err(|_| "the backend sent an invalid header value")?);
    }
    Ok(Some(Head { status, version, headers, reason }))
}

/// Whether a message of `version` with `headers` leaves the connection open after the exchange.
fn reusable(version: Version, headers: &HeaderMap) -> bool {
    let mut options = field_tokens(headers, &CONNECTION);
    if version == Version::HTTP_10 {
        options.any(|t| t.eq_ignore_ascii_case(b"keep-alive"))
    } else {
        !options.any(|t| t.eq_ignore_ascii_case(b"close"))
    }
}

/// How a message body is delimited, and how much of it is still to come.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection.
    Close,
}

/// Where a chunked body stands.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of a chunk's data are still to come.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    /// The trailer section after the last chunk is next.
    Trailers,
}

/// The body's framing (RFC 9112, 6.3), and whether the head leaves the connection clean: a
/// response with both Transfer-Encoding and Content-Length could be read two ways, and an
/// HTTP/1.0 response cannot have Transfer-Encoding, so such a connection is not used again (and
/// the Content-Length is dropped). A successful CONNECT turns the connection into a tunnel.
fn response_framing(
    method: &Method,
    version: Version,
    status: StatusCode,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), String> {
    if method == Method::CONNECT && status.is_success() {
        return Ok((Framing::Length(0), false));
    }
    if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Length(0), true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let chunked =
            field_tokens(headers, &TRANSFER_ENCODING).last().is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"));
        let clean = headers.remove(CONTENT_LENGTH).is_none() && version != Version::HTTP_10;
        return Ok((if chunked { Framing::Chunked(Chunk::Size) } else { Framing::Close }, clean));
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        add_content_length(&mut length, value.as_bytes()).map_err(|e| match e {
            LengthError::Invalid => "the backend sent an invalid Content-Length",
            LengthError::Differing => "the backend sent differing Content-Length values",
        })?;
    }
    Ok((length.map_or(Framing::Close, Framing::Length), true))
}

/// A response body read from the connection as it is polled.
pub struct ResponseBody<R: Release> {
    /// `None` once the body is complete.
    conn: Option<Connection>,
    framing: Framing,
    /// Whether the connection can carry another request once the body is complete.
    keep: bool,
    release: Option<R>,
    /// Data read with the head, still to hand out.
    ready: Option<Bytes>,
    /// The rest of the request, when the response started before it was all sent.
    sending: Option<Sending>,
}

impl<R: Release> std::fmt::Debug for ResponseBody<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").field("framing", &self.framing).finish_non_exhaustive()
    }
}

impl<R: Release> ResponseBody<R> {
    /// A body of known length that came whole with the head is taken off the connection at
    /// once, which goes back before the response is even handed on.
    fn take_buffered(&mut self) {
        let Some(conn) = self.conn.as_mut() else { return };
        if let Framing::Length(left) = self.framing
            && conn.read.len() as u64 >= left
        {
            let data = conn.read.split_to(left as usize).freeze();
            self.ready = (!data.is_empty()).then_some(data);
            self.framing = Framing::Length(0);
            self.finish();
        }
    }

    /// The body is complete: the connection goes back if it is clean and in step (all of the
    /// request was sent, nothing more was read).
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep
            && self.sending.take().is_none()
            && conn.read.is_empty()
            && let Some(release) = self.release.take()
        {
            release.release(conn);
        }
    }

    /// The body ended before its framing said it would.
    fn cut_short(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None;
        self.sending = None;
        Poll::Ready(Some(Err(BodyError("the backend closed the connection in the middle of the response body".into()))))
    }

    fn fail(&mut self, reason: String) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None;
        self.sending = None;
        Poll::Ready(Some(Err(BodyError(reason))))
    }
}

/// Why a response body could not be read to its end.
#[derive(Debug)]
pub struct BodyError(String);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BodyError {}

impl<R: Release> hyper::body::Body for ResponseBody<R> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(data) = this.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let (Some(sending), Some(conn)) = (this.sending.as_mut(), this.conn.as_mut()) {
            // A backend that stopped reading the request may still finish its response.
            sending.poll_write(cx, &mut conn.io);
            if let Some(reason) = sending.broken.take() {
                return this.fail(reason);
            }
            if sending.failed.is_some() {
                this.keep = false;
            }
            if sending.done() {
                this.sending = None;
            }
        }
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match this.framing.decode(&mut conn.read, "the backend") {
                Ok(Decoded::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(Decoded::Last(frame)) => {
                    this.finish();
                    return Poll::Ready(frame.map(Ok));
                }
                Ok(Decoded::More) => {}
                Err(reason) => return this.fail(reason),
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.framing, Framing::Close) => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.cut_short(),
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the response body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && (self.conn.is_none() || matches!(self.framing, Framing::Length(0)))
    }

    fn size_hint(&self) -> SizeHint {
        let ready = self.ready.as_ref().map_or(0, |d| d.len() as u64);
        match self.framing {
            Framing::Length(left) if self.conn.is_some() || left == 0 => SizeHint::with_exact(ready + left),
            _ if self.conn.is_none() => SizeHint::with_exact(ready),
            _ => {
                let mut hint = SizeHint::new();
                hint.set_lower(ready);
                hint
            }
        }
    }
}

impl Framing {
    /// The next part of a body so framed from the bytes read, taken off the front of `buf`;
    /// `sender` names who sent it, for errors ("the backend", "the client"). A `Close` body
    /// ends with its connection, which is not for this to see.
    fn decode(&mut self, buf: &mut BytesMut, sender: &str) -> Result<Decoded, String> {
        loop {
            match *self {
                Framing::Length(0) => return Ok(Decoded::Last(None)),
                Framing::Length(_) | Framing::Close if buf.is_empty() => return Ok(Decoded::More),
                Framing::Length(left) => {
                    let data = buf.split_to(buf.len().min(usize::try_from(left).unwrap_or(usize::MAX)));
                    let left = left - data.len() as u64;
                    *self = Framing::Length(left);
                    let frame = Frame::data(data.freeze());
                    return Ok(if left == 0 { Decoded::Last(Some(frame)) } else { Decoded::Frame(frame) });
                }
                Framing::Close => return Ok(Decoded::Frame(Frame::data(buf.split().freeze()))),
                Framing::Chunked(chunk) => match step_chunked(chunk, buf, sender)? {
                    Step::Next(next) => *self = Framing::Chunked(next),
                    Step::Data(data, next) => {
                        *self = Framing::Chunked(next);
                        return Ok(Decoded::Frame(Frame::data(data)));
                    }
                    Step::End(trailers) => {
                        *self = Framing::Length(0);
                        return Ok(Decoded::Last(trailers.map(Frame::trailers)));
                    }
                    Step::More => return Ok(Decoded::More),
                },
            }
        }
    }
}

/// What the bytes read so far give of a body.
enum Decoded {
    /// A frame of it.
    Frame(Frame<Bytes>),
    /// Its end, after this last frame if there is one.
    Last(Option<Frame<Bytes>>),
    /// Nothing until more bytes are read.
    More,
}

/// What one step through a chunked body found.
enum Step {
    /// Framing consumed; go on from this state.
    Next(Chunk),
    /// Chunk data, and the state after it.
    Data(Bytes, Chunk),
    /// The body is complete, with its trailers if it had any.
    End(Option<HeaderMap>),
    /// More bytes are needed.
    More,
}

/// One step through a chunked body in `buf`; `sender` names who sent it, for errors ("the
/// backend", "the client").
fn step_chunked(chunk: Chunk, buf: &mut BytesMut, sender: &str) -> Result<Step, String> {
    match chunk {
        Chunk::Size => {
            let Some(end) = buf.windows(2).take(MAX_CHUNK_LINE).position(|w| w == b"\r\n") else {
                return if buf.len() >= MAX_CHUNK_LINE {
                    Err(format!("a chunk-size line from {sender} is too long"))
                } else {
                    Ok(Step::More)
                };
            };
            let line = buf.split_to(end + 2);
            let size = chunk_size(&line[..end]).ok_or_else(|| format!("{sender} sent an invalid chunk size"))?;
            Ok(Step::Next(if size == 0 { Chunk::Trailers } else { Chunk::Data(size) }))
        }
        Chunk::Data(left) if !buf.is_empty() => {
            let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let data = buf.split_to(take).freeze();
            let left = left - take as u64;
            Ok(Step::Data(data, if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) }))
        }
        Chunk::Data(_) => Ok(Step::More),
        Chunk::DataEnd if buf.len() < 2 => Ok(Step::More),
        Chunk::DataEnd if &buf[..2] == b"\r\n" => {
            buf.advance(2);
            Ok(Step::Next(Chunk::Size))
        }
        Chunk::DataEnd => Err(format!("chunk data from {sender} is not followed by CRLF")),
        Chunk::Trailers => {
            let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut lines) {
                Ok(httparse::Status::Complete((length, lines))) => {
                    let mut trailers = HeaderMap::with_capacity(lines.len());
                    for line in lines.iter() {
                        let name = HeaderName::from_bytes(line.name.as_bytes());
                        let value = HeaderValue::from_bytes(line.value);
                        if let (Ok(name), Ok(value)) = (name, value) {
                            trailers.append(name, value);
                        }
                    }
                    buf.advance(length);
                    Ok(Step::End((!trailers.is_empty()).then_some(trailers)))
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(Step::More),
                Ok(httparse::Status::Partial) => Err(format!("trailers from {sender} are over {MAX_HEAD} bytes")),
                Err(e) => Err(format!("trailers from {sender} are malformed: {e}")),
            }
        }
    }
}

/// A chunk-size line's size: hex digits, then nothing or extensions (`;...`), which are ignored.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return None;
    }
    if !matches!(line[digits..].iter().find(|&&b| b != b' ' && b != b'\t'), None | Some(b';')) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&line[..digits]).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    #[test]
    fn split_cookie_fields_go_as_one_line() {
        let mut request = http::Request::get("/").body(()).unwrap();
        for cookie in ["a=1", "b=2"] {
            request.headers_mut().append(COOKIE, HeaderValue::from_static(cookie));
        }
        request.headers_mut().insert("x-after", HeaderValue::from_static("1"));
        let (parts, ()) = request.into_parts();
        let mut out = Vec::new();
        encode_head(&parts, RequestFraming::None, &mut out);
        let head = String::from_utf8(out).unwrap();
        assert_eq!(head, "GET / HTTP/1.1\r\ncookie: a=1; b=2\r\nx-after: 1\r\n\r\n");
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"FF;name=value"), Some(255));
        assert_eq!(chunk_size(b"10 ; ext"), Some(16));
        assert_eq!(chunk_size(b"ffffffffffffffff"), Some(u64::MAX));
        for bad in [&b""[..], b";ext", b"1g", b"-1", b"0x10", b"1 2", b"10000000000000000"] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// An idle connection is usable until the backend closes it or sends something unasked.
    #[tokio::test]
    async fn an_idle_connection_is_usable_until_the_backend_closes_or_talks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let quiet = Connection::new(TcpStream::connect(addr).await.unwrap());
        let (mut quiet_server, _) = listener.accept().await.unwrap();
        let closed = Connection::new(TcpStream::connect(addr).await.unwrap());
        drop(listener.accept().await.unwrap());
        let talking = Connection::new(TcpStream::connect(addr).await.unwrap());
        let (mut talking_server, _) = listener.accept().await.unwrap();
        talking_server.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.unwrap();
        // Let the FIN and the bytes arrive, and the runtime see them.
        for _ in 0..50 {
            if !closed.is_usable() && !talking.is_usable() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(quiet.is_usable());
        assert!(!closed.is_usable());
        assert!(!talking.is_usable());
        quiet_server.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!quiet.is_usable(), "bytes nobody asked for");
    }
}
