use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use http_body_util::{Full, StreamBody};
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::*;
use crate::proxy::http::boxed;

/// Answers with what it received: method, target, version, body length and its `x-sum` trailer.
async fn echo(request: Request<ClientBody>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let text = match body.collect().await {
        Ok(collected) => {
            let sum = collected.trailers().and_then(|t| t.get("x-sum")).map(|v| v.to_str().unwrap_or("?").to_owned());
            let data = collected.to_bytes();
            format!(
                "{} {} {:?} {}:{} sum={sum:?}",
                parts.method,
                parts.uri,
                parts.version,
                data.len(),
                String::from_utf8_lossy(&data)
            )
        }
        Err(e) => format!("body failed: {e}"),
    };
    Response::new(boxed(Full::new(Bytes::from(text))))
}

/// A server for one connection at a time, serving with `service`; counts the requests served.
async fn server<F, Fut>(service: F) -> (SocketAddr, Arc<Stop>, Arc<AtomicUsize>)
where
    F: Fn(Request<ClientBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, served) = (Arc::new(Stop::default()), Arc::new(AtomicUsize::new(0)));
    let (stop2, served2) = (Arc::clone(&stop), Arc::clone(&served));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (stop, served, service) = (Arc::clone(&stop2), Arc::clone(&served2), service.clone());
            tokio::spawn(async move {
                let io = Counted::new(stream, Counter::default(), Counter::default());
                let clock = HeadClock::new();
                let service = |request| {
                    served.fetch_add(1, Ordering::SeqCst);
                    service(request)
                };
                let _ = serve(io, &clock, &stop, service).await;
            });
        }
    });
    (addr, stop, served)
}

/// Sends `request` and reads until the server closes the connection.
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the server did not close the connection; it sent:\n{}", String::from_utf8_lossy(&received));
    String::from_utf8_lossy(&received).into_owned()
}

/// Reads until `end` has arrived.
async fn read_until(stream: &mut TcpStream, end: &str) -> String {
    let mut received = Vec::new();
    let mut buf = [0; 4096];
    while !String::from_utf8_lossy(&received).contains(end) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before {end:?}; got:\n{}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_with_their_bodies() {
    let (addr, _, served) = server(echo).await;
    let requests = concat!(
        "GET /a?x=1 HTTP/1.1\r\nHost: shop\r\n\r\n",
        "POST /b HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\nhello",
        "POST /c HTTP/1.1\r\nHost: shop\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        "6;ext=1\r\nchunke\r\n5\r\nd bod\r\n1\r\ny\r\n0\r\nx-sum: 12\r\n\r\n",
    );
    let answers = exchange(addr, requests.as_bytes()).await;
    let a = answers.find("GET /a?x=1 HTTP/1.1 0: sum=None").expect(&answers);
    let b = answers.find("POST /b HTTP/1.1 5:hello sum=None").expect(&answers);
    let c = answers.find("POST /c HTTP/1.1 12:chunked body sum=Some(\"12\")").expect(&answers);
    assert!(a < b && b < c, "{answers}");
    assert_eq!(answers.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{answers}");
    assert_eq!(answers.matches("connection: close\r\n").count(), 1, "only the last one closes:\n{answers}");
    assert_eq!(served.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_http10_client_keeps_the_connection_only_when_it_asks() {
    let (addr, _, _) = server(echo).await;
    let requests =
        "GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /two HTTP/1.0\r\n\r\nGET /three HTTP/1.0\r\n\r\n";
    let answers = exchange(addr, requests.as_bytes()).await;
    assert!(answers.contains("connection: keep-alive\r\n"), "{answers}");
    assert!(answers.contains("GET /two HTTP/1.0"), "{answers}");
    assert!(!answers.contains("/three"), "the second request closed the connection:\n{answers}");
}

#[test]
fn requests_that_could_be_read_two_ways_or_not_at_all_are_refused() {
    let many_fields: String = (0..101).map(|i| format!("x-{i}: 1\r\n")).collect();
    let long_field = format!("x-long: {}\r\n", "a".repeat(MAX_HEAD));
    let cases: Vec<(String, StatusCode)> = vec![
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n".into(),
            StatusCode::BAD_REQUEST,
        ),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            StatusCode::BAD_REQUEST,
        ),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".into(), StatusCode::NOT_IMPLEMENTED),
        ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n".into(),
            StatusCode::BAD_REQUEST,
        ),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        // A u64, but more digits than a length has (and than HTTP/2 takes).
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000000000000000\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("GET / HTTP/1.1\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("GET / HTTP/1.1\r\nHost : a\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("GET / HTTP/1.1\r\nHost: a\r\nx-folded: a\r\n b\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("G\tT / HTTP/1.1\r\nHost: a\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("GET / HTTP/1.2\r\nHost: a\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n".into(), StatusCode::BAD_REQUEST),
        ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n".into(), StatusCode::NOT_IMPLEMENTED),
        (format!("GET / HTTP/1.1\r\nHost: a\r\n{many_fields}\r\n"), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        (format!("GET / HTTP/1.1\r\nHost: a\r\n{long_field}\r\n"), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
    ];
    for (request, status) in cases {
        let parsed = parse_request(&mut BytesMut::from(request.as_bytes()));
        let shown: String = request.chars().take(120).collect();
        assert_eq!(parsed.err().map(|r| r.status), Some(status), "{shown:?}");
    }
    let accepted = [
        ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", BodyFraming::Length(5)),
        ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n", BodyFraming::Chunked),
        ("GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n", BodyFraming::Length(0)),
        ("GET / HTTP/1.0\r\n\r\n", BodyFraming::Length(0)),
    ];
    for (request, framing) in accepted {
        let head = parse_request(&mut BytesMut::from(request.as_bytes())).unwrap().unwrap();
        assert_eq!(head.body, framing, "{request:?}");
    }
    // The target's authority wins over the Host header, and stands in for a missing one.
    for request in
        ["GET http://api.shop:8080/x HTTP/1.1\r\nHost: other\r\n\r\n", "GET http://api.shop:8080/x HTTP/1.1\r\n\r\n"]
    {
        let head = parse_request(&mut BytesMut::from(request)).unwrap().unwrap();
        assert_eq!(head.parts.headers.get_all(HOST).iter().collect::<Vec<_>>(), ["api.shop:8080"], "{request:?}");
    }
    let close = parse_request(&mut BytesMut::from("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"));
    assert!(!close.unwrap().unwrap().keep_alive, "close wins over keep-alive");
}

#[tokio::test]
async fn a_refused_request_is_answered_by_the_connection_which_then_closes() {
    let (addr, _, served) = server(echo).await;
    let answer = exchange(addr, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    assert!(
        answer.contains("connection: close\r\n") && answer.contains("both Transfer-Encoding and Content-Length"),
        "{answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "nothing after the refusal is served:\n{answer}");
    assert_eq!(served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let (addr, _, _) = server(echo).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"PUT /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        .await
        .unwrap();
    let interim = read_until(&mut stream, "\r\n\r\n").await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"data").await.unwrap();
    let answer = read_until(&mut stream, "sum=").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("PUT /up HTTP/1.1 4:data"), "{answer}");
}

/// Answers with two data frames of unknown length and a trailer.
async fn streamed(_: Request<ClientBody>) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("9"));
    let frames = [
        Frame::data(Bytes::from_static(b"four")),
        Frame::data(Bytes::from_static(b"abcdefghijklmnopqrstuvwxyz")),
        Frame::trailers(trailers),
    ];
    let body = StreamBody::new(futures::stream::iter(frames.map(Ok::<_, std::convert::Infallible>)));
    let mut response = Response::new(boxed(body));
    response.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    response
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked_or_delimited_by_the_close() {
    let (addr, _, _) = server(streamed).await;
    let answer = exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains("transfer-encoding: chunked") && !head.contains("content-length") && !head.contains("keep-alive"),
        "{head}"
    );
    assert_eq!(body, "4\r\nfour\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 9\r\n\r\n");

    let answer = exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(answer.ends_with("\r\n0\r\n\r\n"), "no trailers for a client that did not ask:\n{answer}");

    let answer = exchange(addr, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("connection: close") && !head.contains("transfer-encoding"), "{head}");
    assert_eq!(body, "fourabcdefghijklmnopqrstuvwxyz");
}

/// Answers HEAD and `/none` without a body, `/switch` with 101; `Content-Length: 10` on all.
async fn bodiless(request: Request<ClientBody>) -> Response<Body> {
    let mut response = Response::new(boxed(Full::new(Bytes::new())));
    match request.uri().path() {
        "/none" => *response.status_mut() = StatusCode::NO_CONTENT,
        "/switch" => *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS,
        _ => {}
    }
    response.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from_static("10"));
    response
}

#[tokio::test]
async fn head_and_204_answers_carry_no_body_and_the_connection_goes_on() {
    let (addr, _, _) = server(bodiless).await;
    let requests = "HEAD / HTTP/1.1\r\nHost: a\r\n\r\nGET /none HTTP/1.1\r\nHost: a\r\n\r\nGET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let answers = exchange(addr, requests.as_bytes()).await;
    let parts: Vec<&str> = answers.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(parts.len(), 3, "{answers}");
    assert!(
        parts[0].starts_with("200") && parts[0].contains("content-length: 10\r\n") && parts[0].ends_with("\r\n\r\n"),
        "{}",
        parts[0]
    );
    assert!(parts[1].starts_with("204") && !parts[1].contains("content-length"), "{}", parts[1]);
    assert!(parts[2].starts_with("200") && parts[2].contains("content-length: 0\r\n"), "{}", parts[2]);

    let answer = exchange(addr, b"GET /switch HTTP/1.1\r\nHost: a\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n") && answer.contains("interim status"), "{answer}");
}

#[tokio::test]
async fn a_body_the_service_leaves_unread_ends_the_connection_after_the_answer() {
    let (addr, _, served) = server(bodiless).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly part").await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("connection: close\r\n"), "{answer}");
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request() {
    struct Dropped(Arc<AtomicUsize>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&dropped);
    let never = move |_: Request<ClientBody>| {
        let guard = Dropped(Arc::clone(&counter));
        async move {
            std::future::pending::<()>().await;
            drop(guard);
            Response::new(boxed(Full::new(Bytes::new())))
        }
    };
    let (addr, _, served) = server(never).await;
    // Without a body, and with one (the service leaves it unread: the connection watches again).
    let requests: [&[u8]; 2] =
        [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"];
    for (n, request) in requests.into_iter().enumerate() {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        while served.load(Ordering::SeqCst) == n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(dropped.load(Ordering::SeqCst), n);
        drop(stream);
        let mut waited = 0;
        while dropped.load(Ordering::SeqCst) == n {
            assert!(waited < 200, "request {n} was still being served after its client left");
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
    }
}

/// A body that announces one length and has another.
struct Misstated {
    announced: u64,
    data: Option<Bytes>,
}

impl hyper::body::Body for Misstated {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.announced)
    }
}

/// Answers `/long` with 11 bytes announced as 5, `/short` with 5 announced as 20, anything
/// else with 2 as 2.
async fn misstated(request: Request<ClientBody>) -> Response<Body> {
    let (announced, data) = match request.uri().path() {
        "/long" => (5, "hello world"),
        "/short" => (20, "hello"),
        _ => (2, "ok"),
    };
    Response::new(boxed(Misstated { announced, data: Some(Bytes::from_static(data.as_bytes())) }))
}

#[tokio::test]
async fn a_body_longer_or_shorter_than_it_announced_ends_the_connection() {
    let (addr, _, served) = server(misstated).await;
    for (path, body) in [("/long", "hello"), ("/short", "hello")] {
        let requests = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        let answers = exchange(addr, requests.as_bytes()).await;
        let (head, sent) = answers.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {head}");
        // Nothing past what was announced, and no answer after it: the client cannot tell
        // where the next one would start (or, for `/short`, sees the body cut short). (Excess
        // in a later frame than the last announced byte is never read: the answer ends where
        // it said it would, and the connection can go on.)
        assert_eq!(sent, body, "{path}: {answers}");
    }
    assert_eq!(served.load(Ordering::SeqCst), 2, "the request after each was not served");
    let answer = exchange(addr, b"GET /fine HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(answer.ends_with("\r\n\r\nok"), "a truthful body is served whole:\n{answer}");
}

/// its `Connection` header names.
async fn broken(_: Request<ClientBody>) -> Response<Body> {
    let frames: [Result<Frame<Bytes>, std::io::Error>; 2] =
        [Ok(Frame::data(Bytes::from_static(b"partial"))), Err(std::io::Error::other("the backend went away"))];
    let mut response = Response::new(boxed(StreamBody::new(futures::stream::iter(frames))));
    response.headers_mut().insert(CONNECTION, HeaderValue::from_static("x-hop"));
    response.headers_mut().insert("x-hop", HeaderValue::from_static("1"));
    response.headers_mut().insert("x-end", HeaderValue::from_static("1"));
    response
}

#[tokio::test]
async fn a_body_that_breaks_off_is_not_passed_off_as_complete() {
    let (addr, _, _) = server(broken).await;
    let answer = exchange(addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("x-end: 1") && !head.contains("x-hop"), "headers named by Connection are dropped:\n{head}");
    assert_eq!(body, "7\r\npartial\r\n", "no last chunk");

    // An HTTP/1.0 client reads to the end of the connection: it is reset instead.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received)).await.unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "{}",
        String::from_utf8_lossy(&received)
    );
}

#[tokio::test]
async fn a_body_still_coming_after_the_answer_is_read_off_while_the_connection_closes() {
    let (addr, _, _) = server(bodiless).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n").await.unwrap();
    let answer = read_until(&mut stream, "\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("connection: close\r\n"), "{answer}");
    // A client that sends its body anyway: closed at once, the connection would answer it with a
    // reset, and a reset can destroy an answer the client has not read yet.
    for half in 0..2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = stream.write_all(&[b'x'; 50_000]).await;
        assert!(sent.is_ok(), "half {half} of the body was refused: {sent:?}");
    }
}

#[tokio::test]
async fn a_stop_closes_an_idle_connection_at_once_and_a_busy_one_after_its_answer() {
    let release = Arc::new(Notify::new());
    let waiting = Arc::clone(&release);
    let slow = move |request: Request<ClientBody>| {
        let waiting = Arc::clone(&waiting);
        async move {
            waiting.notified().await;
            echo(request).await
        }
    };
    let (addr, stop, _) = server(slow).await;
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.ask();
    release.notify_one();
    let answer = read_to_close(&mut busy).await;
    assert!(answer.contains("GET /slow HTTP/1.1") && answer.contains("connection: close\r\n"), "{answer}");

    let (addr, stop, _) = server(echo).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    read_until(&mut idle, "sum=").await;
    stop.ask();
    assert_eq!(read_to_close(&mut idle).await, "", "an idle connection closes without another answer");
}
