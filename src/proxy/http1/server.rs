//! HTTP/1.1 from a local client, served by the connection's own task.
//!
//! hyper's server runs a dispatcher per connection and passes request bodies through a channel.
//! Here the connection's task reads a request head, calls the service, and writes the response
//! itself. A request body reads from the socket as it is polled, then hands the reading half
//! back ([`ClientBody`]); the response goes out while it is still being read (an echo). Pipelined
//! requests are served one after another.
//!
//! Framing follows RFC 9112. A request body is delimited by chunked coding or by Content-Length.
//! A request that could be read two ways is refused with 400 and the connection closed: both
//! headers, differing lengths, chunked not last or twice, Transfer-Encoding in HTTP/1.0. Another
//! transfer coding before chunked gets 501. A response goes with Content-Length when its length is known, else chunked
//! (to HTTP/1.0 clients: until the connection closes, reset if the body breaks off). Trailers go
//! only to a client that said `TE: trailers`. `Expect: 100-continue` is answered before the
//! service is called, unless part of the body has already arrived. A client that closes its
//! connection while its request is served cancels the request (as hyper's server does; a
//! half-closed client is taken to be gone). A connection that closes with bytes it will not serve
//! reads them off first, for a while ([`close`]). CONNECT is refused (501): tunnels are carried
//! as opaque TCP, never by this server. An absolute-form target's authority replaces the Host
//! header (RFC 9112, 3.2.2).

use std::fmt::Write as _;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::task::AtomicWaker;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HOST, TE, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use super::{
    BodyError, Chunk, Decoded, Framing, LengthError, MAX_HEAD, MAX_HEADERS, READ_SIZE, add_content_length, tokens,
};
use crate::proxy::head::HeadClock;
use crate::proxy::http::{Body, ERROR_HEADER};
use crate::proxy::tcp::Counted;

/// Response bytes gathered before they are written.
const WRITE_SIZE: usize = 64 * 1024;

/// Asks a connection to close once its current exchange is over (at once, when it has none).
/// Waiting costs a waker registration, no lock: a connection waits on it before every request.
#[derive(Debug, Default)]
pub struct Stop {
    asked: AtomicBool,
    waiter: AtomicWaker,
}

impl Stop {
    pub fn ask(&self) {
        self.asked.store(true, Ordering::Release);
        self.waiter.wake();
    }

    fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }

    async fn wait(&self) {
        poll_fn(|cx| {
            if !self.asked() {
                self.waiter.register(cx.waker());
            }
            if self.asked() { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
    }
}

/// Why a request head is answered by the connection itself, which then closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

const fn reject(status: StatusCode, reason: &'static str) -> Rejection {
    Rejection { status, reason }
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Length(u64),
    Chunked,
}

/// A request head taken off the connection.
#[derive(Debug)]
pub struct RequestHead {
    pub parts: Parts,
    pub body: BodyFraming,
    /// The client lets the connection carry another request after this one.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expects_continue: bool,
    /// The client takes trailers in a chunked response (`TE: trailers`).
    pub takes_trailers: bool,
}

/// Takes a complete request head off the front of `buf`; `None` until one has arrived.
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, Rejection> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut lines);
    let length = match request.parse(buf) {
        Ok(httparse::Status::Complete(length)) if length <= MAX_HEAD => length,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(httparse::Status::Complete(_) | httparse::Status::Partial) => {
            return Err(reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "the request head is over 64 KiB"));
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "the request has over 100 header fields"));
        }
        Err(_) => return Err(reject(StatusCode::BAD_REQUEST, "the request head is malformed")),
    };
    let bad = |reason| reject(StatusCode::BAD_REQUEST, reason);
    let method = request.method.map(|m| Method::from_bytes(m.as_bytes()));
    let method = method.and_then(Result::ok).ok_or(bad("the request method is invalid"))?;
    if method == Method::CONNECT {
        return Err(reject(StatusCode::NOT_IMPLEMENTED, "CONNECT is not supported here"));
    }
    let version = if request.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    // The target and the header values become slices of the head as received, not copies.
    let base = buf.as_ptr() as usize;
    let range = |part: &[u8]| {
        let start = part.as_ptr() as usize - base;
        start..start + part.len()
    };
    let target = range(request.path.ok_or(bad("the request has no target"))?.as_bytes());
    let mut facts = Facts::default();
    let mut fields = Vec::with_capacity(request.headers.len());
    for line in request.headers.iter() {
        let name = HeaderName::from_bytes(line.name.as_bytes()).map_err(|_| bad("a header name is invalid"))?;
        facts.add(&name, line.value)?;
        fields.push((name, range(line.value)));
    }
    let body = facts.framing(version)?;
    let head = buf.split_to(length).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| bad("the request target is invalid"))?;
    // An absolute-form target names the host itself, and its authority wins over the Host
    // header (RFC 9112, 3.2.2): routing, authorization and the peer all see the same one.
    let named = uri.authority().map(|a| HeaderValue::from_str(a.as_str()));
    match (facts.hosts, &named) {
        (_, Some(_)) if uri.authority().is_some_and(|a| a.as_str().contains('@')) => {
            return Err(bad("the request target has user information"));
        }
        (_, Some(Err(_))) => return Err(bad("the request target is invalid")),
        (0, None) if version == Version::HTTP_11 => return Err(bad("an HTTP/1.1 request needs a Host header")),
        (2.., _) => return Err(bad("the request has more than one Host header")),
        _ => {}
    }
    let mut headers = HeaderMap::with_capacity(fields.len() + usize::from(facts.hosts == 0));
    for (name, range) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(range)).map_err(|_| bad("a header value is invalid"))?;
        headers.append(name, value);
    }
    if let Some(Ok(authority)) = named {
        headers.insert(HOST, authority);
    }
    let keep_alive = if version == Version::HTTP_10 { facts.keep_alive && !facts.close } else { !facts.close };
    let expects_continue = version == Version::HTTP_11 && facts.expects_continue;
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead { parts, body, keep_alive, expects_continue, takes_trailers: facts.takes_trailers }))
}

/// What a request head says about its body and its connection, gathered field by field as the
/// head is parsed (a header map lookup costs more than the whole scan).
#[derive(Debug, Default)]
struct Facts {
    hosts: usize,
    /// The Content-Length, once one was seen (every value must agree).
    length: Option<u64>,
    /// Transfer-Encoding was present.
    encoded: bool,
    /// How many transfer codings it lists, and how many of them are chunked.
    codings: usize,
    chunked: usize,
    last_chunked: bool,
    close: bool,
    keep_alive: bool,
    takes_trailers: bool,
    expects_continue: bool,
}

impl Facts {
    fn add(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), Rejection> {
        let bad = |reason| reject(StatusCode::BAD_REQUEST, reason);
        if name == HOST {
            self.hosts += 1;
        } else if name == CONTENT_LENGTH {
            add_content_length(&mut self.length, value).map_err(|e| match e {
                LengthError::Invalid => bad("the request's Content-Length is invalid"),
                LengthError::Differing => bad("the request has differing Content-Length values"),
            })?;
        } else if name == TRANSFER_ENCODING {
            self.encoded = true;
            for coding in tokens(value).filter(|c| !c.is_empty()) {
                self.codings += 1;
                self.last_chunked = coding.eq_ignore_ascii_case(b"chunked");
                self.chunked += usize::from(self.last_chunked);
            }
        } else if name == CONNECTION {
            for option in tokens(value) {
                self.close |= option.eq_ignore_ascii_case(b"close");
                self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == TE {
            self.takes_trailers |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
        } else if name == EXPECT {
            self.expects_continue |= value.eq_ignore_ascii_case(b"100-continue");
        }
        Ok(())
    }

    /// The request body's framing (RFC 9112, 6.1-6.3). Anything that could be read two ways is
    /// refused: that is how a request is smuggled past a proxy to a backend that reads it
    /// otherwise.
    fn framing(&self, version: Version) -> Result<BodyFraming, Rejection> {
        let bad = |reason| reject(StatusCode::BAD_REQUEST, reason);
        if !self.encoded {
            return Ok(BodyFraming::Length(self.length.unwrap_or(0)));
        }
        if version == Version::HTTP_10 {
            return Err(bad("an HTTP/1.0 request cannot have Transfer-Encoding"));
        }
        if self.length.is_some() {
            return Err(bad("the request has both Transfer-Encoding and Content-Length"));
        }
        match (self.codings, self.chunked) {
            (0, _) => Err(bad("the request's Transfer-Encoding is empty")),
            _ if !self.last_chunked => Err(bad("chunked is not the request's last transfer coding")),
            (1, 1) => Ok(BodyFraming::Chunked),
            (_, 2..) => Err(bad("the request is chunked more than once")),
            _ => Err(reject(StatusCode::NOT_IMPLEMENTED, "transfer codings other than chunked are not supported")),
        }
    }
}

/// The reading half of a client connection and what was read from it past the current message.
#[derive(Debug)]
struct Reader {
    io: Counted<OwnedReadHalf>,
    buf: BytesMut,
}

impl Reader {
    /// Reads what the socket has into the buffer; 0 at the end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// A request body, read from the client connection as it is polled (hyper's `Incoming` for this
/// server). Read to its end, it gives
/// the connection's reading half back for the next request; dropped before that, the connection
/// closes after the response.
#[derive(Debug)]
pub struct ClientBody {
    /// `None` for a request without a body, and once the body is complete.
    reading: Option<Reading>,
}

#[derive(Debug)]
struct Reading {
    reader: Reader,
    framing: Framing,
    /// Takes the reading half back, and whether the body was read to its end.
    back: oneshot::Sender<(Reader, bool)>,
}

impl ClientBody {
    const EMPTY: Self = Self { reading: None };

    /// The body is complete: the reading half goes back to the connection.
    fn finish(&mut self) {
        if let Some(reading) = self.reading.take() {
            let _ = reading.back.send((reading.reader, true));
        }
    }

    fn fail(&mut self, reason: String) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.reading = None;
        Poll::Ready(Some(Err(BodyError(reason))))
    }
}

impl Drop for ClientBody {
    /// Left unread, the body still hands the reading half back: the connection reads off what
    /// the client sends of it while it closes.
    fn drop(&mut self) {
        if let Some(reading) = self.reading.take() {
            let _ = reading.back.send((reading.reader, false));
        }
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(reading) = this.reading.as_mut() else { return Poll::Ready(None) };
            match reading.framing.decode(&mut reading.reader.buf, "the client") {
                Ok(Decoded::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(Decoded::Last(frame)) => {
                    this.finish();
                    return Poll::Ready(frame.map(Ok));
                }
                Ok(Decoded::More) => {}
                Err(reason) => return this.fail(reason),
            }
            // The connection ended without this body (its client left, or it was cut): nothing
            // more of it can come.
            if reading.back.poll_closed(cx).is_ready() {
                return this.fail("the client connection was closed".into());
            }
            match ready!(reading.reader.poll_fill(cx)) {
                Ok(0) => return this.fail("the client closed the connection in the middle of the request body".into()),
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the request body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading.as_ref().is_none_or(|r| matches!(r.framing, Framing::Length(0)))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.reading {
            None => SizeHint::with_exact(0),
            Some(Reading { framing: Framing::Length(left), .. }) => SizeHint::with_exact(*left),
            Some(_) => SizeHint::new(),
        }
    }
}

/// Serves HTTP/1.1 requests on `io` until the client closes the connection, a request or
/// response ends it, or `stop` is asked. `clock` hears when each head starts and ends.
pub async fn serve<F, Fut>(io: Counted<TcpStream>, clock: &HeadClock, stop: &Stop, mut service: F) -> io::Result<()>
where
    F: FnMut(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let (read, mut write) = io.into_split();
    let mut reader = Reader { io: read, buf: BytesMut::with_capacity(READ_SIZE) };
    let mut out = BytesMut::new();
    loop {
        let head = loop {
            match parse_request(&mut reader.buf) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(rejection) => {
                    write_rejection(&mut out, rejection);
                    write.write_all(&out).await?;
                    return close(write, Some(reader)).await;
                }
            }
            let read = tokio::select! {
                biased;
                read = reader.fill() => read?,
                () = stop.wait(), if reader.buf.is_empty() => return write.shutdown().await,
            };
            if read == 0 {
                // The client is done (a partial head has no one left to answer).
                return write.shutdown().await;
            }
            clock.arrived();
        };
        clock.head_complete();
        let RequestHead { parts, body: framing, keep_alive, expects_continue, takes_trailers } = head;
        let exchange = Exchange { is_head: parts.method == Method::HEAD, version: parts.version, takes_trailers };
        let (body, mut held) = match framing {
            BodyFraming::Length(0) => (ClientBody::EMPTY, Held::Here(reader)),
            BodyFraming::Length(_) | BodyFraming::Chunked => {
                if expects_continue && reader.buf.is_empty() {
                    write.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                }
                let framing = match framing {
                    BodyFraming::Length(length) => Framing::Length(length),
                    BodyFraming::Chunked => Framing::Chunked(Chunk::Size),
                };
                let (back, returned) = oneshot::channel();
                (ClientBody { reading: Some(Reading { reader, framing, back }) }, Held::Lent(returned))
            }
        };
        // Pinned where it is made: the service's future is large, and moving it costs.
        let mut pending = std::pin::pin!(service(Request::from_parts(parts, body)));
        // A body left unread: where the next request starts is not known.
        let mut unread = false;
        let response = loop {
            match &mut held {
                Held::Here(reader) => match until_gone(pending.as_mut(), reader).await {
                    Some(response) => break response,
                    // The client left: its request went with it.
                    None => return Ok(()),
                },
                // While the body reads the connection, the body notices a client that leaves;
                // once it is back, the connection watches again.
                Held::Lent(returned) => tokio::select! {
                    biased;
                    response = pending.as_mut() => break response,
                    back = returned => match back {
                        Ok((reader, complete)) => (held, unread) = (Held::Here(reader), !complete),
                        Err(_) => held = Held::Lost,
                    },
                },
                Held::Lost => break pending.as_mut().await,
            }
        };
        if let Held::Lent(returned) = &mut held {
            match returned.try_recv() {
                Ok((reader, complete)) => (held, unread) = (Held::Here(reader), !complete),
                Err(oneshot::error::TryRecvError::Closed) => held = Held::Lost,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
        }
        let keep = keep_alive && !stop.asked() && !unread && !matches!(held, Held::Lost);
        let keep = match write_response(&mut write, &mut out, response, exchange, keep).await? {
            After::Next => true,
            After::Close => false,
            After::Reset => {
                write.reset();
                return Ok(());
            }
        };
        reader = match held {
            Held::Here(reader) => reader,
            // The body may still be read after the response (a backend that answered early).
            Held::Lent(returned) if keep => tokio::select! {
                returned = returned => match returned {
                    Ok((reader, true)) => reader,
                    Ok((reader, false)) => return close(write, Some(reader)).await,
                    Err(_) => return write.shutdown().await,
                },
                () = stop.wait() => return write.shutdown().await,
            },
            Held::Lent(mut returned) => match returned.try_recv() {
                Ok((reader, _)) => return close(write, Some(reader)).await,
                Err(_) => return write.shutdown().await,
            },
            Held::Lost => return write.shutdown().await,
        };
        clock.request_done();
        if !keep {
            // Bytes the client sent that will not be served are read off while closing.
            let unserved = unread || !reader.buf.is_empty();
            return close(write, unserved.then_some(reader)).await;
        }
        if !reader.buf.is_empty() {
            // The next request's first bytes came with this one: its head is pending already.
            clock.arrived();
        }
    }
}

/// How long a closing connection goes on reading off what its client still sends, and how much.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// Closes the connection: the writing side at once, then, with `unserved`'s reader, what the
/// client still sends is read and dropped for a while (up to [`LINGER`] or [`LINGER_BYTES`]).
/// Closed with unread bytes, the connection would be reset, and a reset can destroy the last
/// answer before the client has read it (RFC 9112, 9.6).
async fn close(mut write: Counted<OwnedWriteHalf>, unserved: Option<Reader>) -> io::Result<()> {
    write.shutdown().await?;
    let Some(mut reader) = unserved else { return Ok(()) };
    let drain = async {
        let mut read = 0;
        while read < LINGER_BYTES {
            reader.buf.clear();
            match reader.fill().await {
                Ok(n @ 1..) => read += n,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
    Ok(())
}

/// `pending` to its end, unless the client closes the connection first (`None`). Bytes that
/// arrive meanwhile (the next request, pipelined) are kept, up to a head's worth. The socket is
/// read only once the runtime saw it turn readable: watching it costs no system call.
async fn until_gone<F: Future>(mut pending: Pin<&mut F>, reader: &mut Reader) -> Option<F::Output> {
    poll_fn(|cx| {
        if let Poll::Ready(done) = pending.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        while reader.buf.len() < MAX_HEAD && reader.io.get_ref().as_ref().poll_read_ready(cx).is_ready() {
            match reader.poll_fill(cx) {
                Poll::Ready(Ok(1..)) => {}
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await
}

/// Where the connection's reading half is while a request is served.
enum Held {
    Here(Reader),
    /// With the request body, which sends it back when it is read to its end (`true`) or
    /// dropped.
    Lent(oneshot::Receiver<(Reader, bool)>),
    /// Gone with a body that failed (the client broke off, or the connection ended).
    Lost,
}

/// What the response depends on of its request.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    is_head: bool,
    version: Version,
    takes_trailers: bool,
}

/// How a response body goes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outgoing {
    /// This many bytes still to go.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and a body of unknown length).
    Close,
}

/// What becomes of the connection after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// It carries the next request.
    Next,
    Close,
    /// It is reset: the client must not take what it got for all of the response.
    Reset,
}

impl After {
    fn from_keep(keep: bool) -> Self {
        if keep { After::Next } else { After::Close }
    }
}

/// Writes the response and says what becomes of the connection: `keep` decides, unless the
/// response had to be delimited by closing, or its body broke off.
async fn write_response(
    write: &mut Counted<OwnedWriteHalf>,
    out: &mut BytesMut,
    response: Response<Body>,
    exchange: Exchange,
    mut keep: bool,
) -> io::Result<After> {
    let (mut parts, mut body) = response.into_parts();
    let status = parts.status;
    if status.is_informational() {
        // Upgrades are carried as opaque connections before any server sees them: an interim
        // status as the final answer (a backend's 101) cannot be followed here.
        write_rejection(out, reject(StatusCode::BAD_GATEWAY, "the backend answered with an interim status"));
        flush(write, out).await?;
        return Ok(After::Close);
    }
    let bodiless = exchange.is_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let outgoing = if bodiless {
        None
    } else if let Some(length) = body.size_hint().exact() {
        Some(Outgoing::Length(length))
    } else if exchange.version == Version::HTTP_11 {
        Some(Outgoing::Chunked)
    } else {
        keep = false;
        Some(Outgoing::Close)
    };
    if parts.headers.iter().any(|(name, _)| name == CONNECTION) {
        crate::proxy::http::remove_connection_headers(&mut parts.headers);
    }
    // A HEAD or 304 response keeps the length its body would have had.
    let keep_length = bodiless && status != StatusCode::NO_CONTENT;
    encode_head(out, &parts, outgoing, keep_length, keep, exchange.version);
    let Some(mut outgoing) = outgoing else {
        flush(write, out).await?;
        return Ok(After::from_keep(keep));
    };
    let mut trailers = None;
    loop {
        if outgoing == Outgoing::Length(0) {
            break;
        }
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                flush(write, out).await?;
                body.frame().await
            }
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    trailers = frame.into_trailers().ok().filter(|_| exchange.takes_trailers);
                    continue;
                }
            },
            Some(Err(_)) if outgoing == Outgoing::Close => {
                // Nothing else tells this client that the body broke off.
                flush(write, out).await?;
                return Ok(After::Reset);
            }
            Some(Err(_)) => {
                // The client sees the body cut short (no last chunk, or fewer bytes than
                // announced), not complete.
                flush(write, out).await?;
                return Ok(After::Close);
            }
            None if outgoing == Outgoing::Chunked => {
                out.extend_from_slice(b"0\r\n");
                for (name, value) in trailers.iter().flatten() {
                    put_field(out, name, value);
                }
                out.extend_from_slice(b"\r\n");
                break;
            }
            None if outgoing == Outgoing::Close => break,
            None => {
                // Shorter than it announced: the client is waiting for the rest.
                flush(write, out).await?;
                return Ok(After::Close);
            }
        };
        let data = match &mut outgoing {
            Outgoing::Length(left) if data.len() as u64 > *left => {
                // More than it announced: what was announced goes, then the end.
                let announced = usize::try_from(*left).unwrap_or(usize::MAX);
                put_data(write, out, &data[..announced]).await?;
                flush(write, out).await?;
                return Ok(After::Close);
            }
            Outgoing::Length(left) => {
                *left -= data.len() as u64;
                data
            }
            Outgoing::Chunked if data.is_empty() => continue,
            Outgoing::Chunked => {
                put_hex(out, data.len());
                out.extend_from_slice(b"\r\n");
                put_data(write, out, &data).await?;
                out.extend_from_slice(b"\r\n");
                continue;
            }
            Outgoing::Close => data,
        };
        put_data(write, out, &data).await?;
    }
    flush(write, out).await?;
    if out.capacity() > 2 * WRITE_SIZE {
        // A large head or frame does not stay with the connection.
        *out = BytesMut::new();
    }
    Ok(After::from_keep(keep && outgoing != Outgoing::Close))
}

/// Appends `data` to `out`, or writes both out at once when that makes them large.
async fn put_data(write: &mut Counted<OwnedWriteHalf>, out: &mut BytesMut, data: &[u8]) -> io::Result<()> {
    if out.len() + data.len() < WRITE_SIZE {
        out.extend_from_slice(data);
        return Ok(());
    }
    flush(write, out).await?;
    write.write_all(data).await
}

async fn flush(write: &mut Counted<OwnedWriteHalf>, out: &mut BytesMut) -> io::Result<()> {
    if !out.is_empty() {
        write.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// Headers a response loses on the way to the client: they were about the connection it came on
/// (or its framing, which is written anew).
fn hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == http::header::UPGRADE
        || name == "keep-alive"
        || name == "proxy-connection"
}

fn encode_head(
    out: &mut BytesMut,
    parts: &http::response::Parts,
    outgoing: Option<Outgoing>,
    keep_length: bool,
    keep: bool,
    version: Version,
) {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in &parts.headers {
        if hop_by_hop(name) || (name == CONTENT_LENGTH && !keep_length) {
            continue;
        }
        dated |= name == DATE;
        put_field(out, name, value);
    }
    if !dated {
        put_date(out);
    }
    match outgoing {
        Some(Outgoing::Length(length)) => {
            out.extend_from_slice(b"content-length: ");
            put_decimal(out, length);
            out.extend_from_slice(b"\r\n");
        }
        Some(Outgoing::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Some(Outgoing::Close) | None => {}
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A Date header for a response that came without one (a proxy with a clock adds it, RFC 9110
/// 6.6.1), formatted once a second per thread.
fn put_date(out: &mut BytesMut) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let second = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(cached, text)| {
        if *cached != second {
            *cached = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// Writes `n` in decimal (without the formatting machinery, which costs several times more).
fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Writes `n` in hexadecimal (a chunk size).
fn put_hex(out: &mut BytesMut, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b"0123456789abcdef"[n % 16];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The connection's own answer to a head it refuses; the connection closes after it.
fn write_rejection(out: &mut BytesMut, rejection: Rejection) {
    let Rejection { status, reason } = rejection;
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n{ERROR_HEADER}: {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{reason}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        reason.len() + 1
    );
}

#[cfg(test)]
mod tests;
