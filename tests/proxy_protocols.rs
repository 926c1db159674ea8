//! What rides through two boxes: WebSocket, gRPC-style trailers, a 100 MB body, an
//! application's own TLS; and proof, with openssl on both ends, that what travels between the
//! boxes is mutual TLS with the expected identities.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use meshkeep::identity::IdentityName;
use meshkeep::identity::ca::{Issuer, IssuerPem};
use support::mesh::*;
use support::{Daemon, free_addr, require_tool};

const ECHO_IDENTITY: &str = "echo.shop.serviceaccount.identity.linkerd.cluster.local";
const WEB_IDENTITY: &str = "web.shop.serviceaccount.identity.linkerd.cluster.local";

// ---- WebSocket (RFC 6455), written out so that nothing but the protocol is trusted ----

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let bytes = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn websocket_accept(key: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64(digest.as_ref())
}

/// Reads an HTTP head (up to the blank line).
fn read_head(reader: &mut impl BufRead) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            return head;
        }
        head.push_str(&line);
    }
}

/// One frame: (opcode, payload), unmasked.
fn read_frame(reader: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    reader.read_exact(&mut head)?;
    let opcode = head[0] & 0x0f;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            reader.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            reader.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut mask = [0u8; 4];
    if masked {
        reader.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload)?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok((opcode, payload))
}

fn write_frame(writer: &mut impl Write, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> std::io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => frame.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(mask) => {
            frame.extend_from_slice(&mask);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => frame.extend_from_slice(payload),
    }
    writer.write_all(&frame)
}

/// A WebSocket server on 127.0.0.1 that echoes every data frame and answers a close.
fn websocket_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                let head = read_head(&mut reader);
                let Some(key) = head.lines().find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("sec-websocket-key").then(|| value.trim().to_owned())
                }) else {
                    let _ = writer.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
                    return;
                };
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    websocket_accept(&key)
                );
                writer.write_all(answer.as_bytes()).unwrap();
                while let Ok((opcode, payload)) = read_frame(&mut reader) {
                    let _ = write_frame(&mut writer, opcode, &payload, None);
                    if opcode == 0x8 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_websocket_echo_crosses_two_boxes() {
    let boxes = two_boxes_to(websocket_echo_server(), Some("echo"));
    let stream = TcpStream::connect(boxes.listener).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let key = base64(b"sixteen byte key");
    write!(
        writer,
        "GET /chat HTTP/1.1\r\nHost: echo.shop\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut reader);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains(&websocket_accept(&key)), "the backend's accept key arrives unchanged\n{head}");

    write_frame(&mut writer, 0x1, b"hello over a websocket", Some([1, 2, 3, 4])).unwrap();
    assert_eq!(read_frame(&mut reader).unwrap(), (0x1, b"hello over a websocket".to_vec()));
    // A large binary message (64-bit length) in the same connection.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    write_frame(&mut writer, 0x2, &big, Some([9, 8, 7, 6])).unwrap();
    let (opcode, payload) = read_frame(&mut reader).unwrap();
    assert!(opcode == 0x2 && payload == big, "the binary message came back altered");
    write_frame(&mut writer, 0x8, &[0x03, 0xe8], Some([5, 5, 5, 5])).unwrap();
    assert_eq!(read_frame(&mut reader).unwrap().0, 0x8, "the close is answered");

    let mtls = metric(&boxes.a, "tcp_open_total{direction=\"outbound\",tls=\"true\"");
    assert!(mtls >= 1.0, "the WebSocket rode mTLS between the boxes");
}

// ---- HTTP/2 with trailers (gRPC's shape), from a hyper client ----

#[test]
fn grpc_style_trailers_cross_two_boxes() {
    use http_body_util::{BodyExt, Full};
    let boxes = two_boxes_to(http_backend(), Some("echo"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, host, body, trailers) = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(boxes.listener).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("HTTP/2 handshake with box A");
        tokio::spawn(connection);
        // An HTTP/2 client's own Host header reaches an HTTP/2 workload (box B restores Host
        // from :authority only for HTTP/1 workloads, and rewrites :authority for the backend).
        let request = hyper::Request::post("http://echo.shop/grpc")
            .header("host", "echo.shop")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(bytes::Bytes::from_static(b"\0\0\0\0\x05hello")))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(20), sender.send_request(request))
            .await
            .expect("answered in time")
            .expect("response");
        let status = response.status();
        let host = response.headers().get("x-seen-host").cloned();
        let collected = response.into_body().collect().await.expect("body and trailers");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        (status, host, collected.to_bytes(), trailers)
    });
    assert_eq!(status, 200);
    assert_eq!(host.as_ref().map(|h| h.to_str().unwrap()), Some("echo.shop"), "the backend saw the client's Host");
    assert_eq!(&body[..], b"\0\0\0\0\x02hi");
    assert_eq!(trailers.get("grpc-status").map(|v| v.to_str().unwrap()), Some("0"), "{trailers:?}");
    assert_eq!(trailers.get("grpc-message").map(|v| v.to_str().unwrap()), Some("received 10 bytes"));
}

// ---- A 100 MB body ----

#[test]
fn a_100_mb_body_crosses_two_boxes_intact() {
    let boxes = two_boxes_to(http_backend(), Some("echo"));
    let dir = tempfile::tempdir().unwrap();
    let upload = dir.path().join("upload.bin");
    let downloaded = dir.path().join("download.bin");
    // Not a repeating pattern: a shifted or dropped block would change the digest.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let payload: Vec<u8> = (0..100 * 1024 * 1024 / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    std::fs::write(&upload, &payload).unwrap();
    let output = Command::new(require_tool("curl"))
        .args(["-sS", "--max-time", "300", "--http1.1", "-H", "Host: echo.shop", "-o"])
        .arg(&downloaded)
        .arg("--data-binary")
        .arg(format!("@{}", upload.display()))
        .args(["-w", "%{http_code}"])
        .arg(format!("http://{}/upload", boxes.listener))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200", "{}", String::from_utf8_lossy(&output.stderr));
    let back = std::fs::read(&downloaded).unwrap();
    assert_eq!(back.len(), payload.len(), "length");
    let digest = |data: &[u8]| ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec();
    assert!(digest(&back) == digest(&payload), "100 MB came back altered");
}

// ---- An application's own TLS, passed through untouched ----

/// Writes a self-signed certificate and key for `name`; returns (cert path, key path).
fn self_signed(dir: &Path, name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path.display().to_string(), key_path.display().to_string())
}

/// openssl s_server on `addr`, with what it prints collected; killed on drop.
struct SServer {
    child: std::process::Child,
    /// Held open: s_server ends its connection when its input ends.
    _stdin: std::process::ChildStdin,
    printed: std::sync::Arc<std::sync::Mutex<String>>,
}

impl SServer {
    fn start(addr: SocketAddr, args: &[&str]) -> Self {
        let mut child = Command::new(require_tool("openssl"))
            .args(["s_server", "-accept", &addr.to_string()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl s_server");
        let stdin = child.stdin.take().unwrap();
        let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for pipe in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let printed = std::sync::Arc::clone(&printed);
            std::thread::spawn(move || {
                // Bytes, not lines: what the peer sent may not be UTF-8.
                let mut reader = BufReader::new(pipe);
                let mut line = Vec::new();
                while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                    printed.lock().unwrap().push_str(&String::from_utf8_lossy(&line));
                    line.clear();
                }
            });
        }
        // Not probed by connecting: that would use up `-naccept 1`.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !printed.lock().unwrap().contains("ACCEPT") {
            assert!(std::time::Instant::now() < deadline, "s_server did not start: {}", printed.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        SServer { child, _stdin: stdin, printed }
    }

    /// Waits for it to exit (`-naccept 1`) and returns everything it printed.
    fn output(mut self) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        std::thread::sleep(Duration::from_millis(100));
        self.printed.lock().unwrap().clone()
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_applications_own_tls_passes_through_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "app-backend.example");
    let backend = free_addr();
    let _server = SServer::start(backend, &["-cert", &cert, "-key", &key, "-www"]);
    let boxes = two_boxes_to(backend, Some("echo"));
    let output = Command::new(require_tool("curl"))
        .args(["-sS", "-v", "--max-time", "20", "--cacert", &cert, "--resolve"])
        .arg(format!("app-backend.example:{}:127.0.0.1", boxes.listener.port()))
        .arg(format!("https://app-backend.example:{}/", boxes.listener.port()))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "curl verified the backend's own certificate end to end\n{stderr}");
    assert!(stderr.contains("CN=app-backend.example"), "{stderr}");
    assert!(stdout.contains("s_server"), "the backend's page arrived\n{stdout}");
    let mtls = metric(&boxes.a, "tcp_open_total{direction=\"outbound\",tls=\"true\"");
    assert!(mtls >= 1.0, "the application's TLS rode inside the boxes' mTLS");
}

// ---- Proof of what is on the wire between boxes ----

/// A certificate for `service_account` in `shop` from the boxes' shared issuer in `dir`.
fn issue(dir: &Path, service_account: &str) -> (String, String) {
    let material = IssuerPem {
        certificate: std::fs::read_to_string(dir.join("issuer.crt")).unwrap(),
        private_key: std::fs::read_to_string(dir.join("issuer.key")).unwrap(),
        trust_anchors: std::fs::read_to_string(dir.join("ca.crt")).unwrap(),
    };
    let issuer = Issuer::from_pem(&material).unwrap();
    let name = IdentityName::new("shop", service_account, "cluster.local", "linkerd");
    let leaf = issuer.issue(&name, SystemTime::now(), Duration::from_secs(3600), Duration::from_secs(60)).unwrap();
    let (cert, key) = (dir.join(format!("{service_account}.crt")), dir.join(format!("{service_account}.key")));
    std::fs::write(&cert, leaf.chain_pem()).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let output = Command::new(require_tool("openssl"))
        .args(["s_client", "-connect", &addr.to_string(), "-alpn", "meshkeep/1"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn the_inbound_port_speaks_tls_1_3_with_its_identity_and_requires_a_mesh_client_certificate() {
    let boxes = two_boxes(Some("echo"));
    let ca = boxes.dirs.path().join("ca.crt").display().to_string();
    let (cert, key) = issue(boxes.dirs.path(), "web");
    let answer = s_client(
        boxes.b_inbound,
        &[
            "-CAfile",
            &ca,
            "-cert",
            &cert,
            "-cert_chain",
            &cert,
            "-key",
            &key,
            "-verify_return_error",
            "-verify_hostname",
            ECHO_IDENTITY,
        ],
    );
    assert!(answer.contains("Verify return code: 0 (ok)"), "B's certificate chains to the mesh root\n{answer}");
    assert!(answer.contains(&format!("CN = {ECHO_IDENTITY}")), "{answer}");
    assert!(answer.contains("TLSv1.3"), "{answer}");
    assert!(answer.contains("ALPN protocol: meshkeep/1"), "{answer}");
    let refusals = |d: &Daemon| metric(d, "meshkeep_proxy_errors_total{direction=\"inbound\",reason=\"tls\"}");
    assert_eq!(refusals(&boxes.b), 0.0, "B accepted the mesh client certificate");

    // Without a client certificate the handshake is refused: TLS 1.3 reports it after the
    // client's Finished, as an alert instead of application data.
    let refused = s_client(boxes.b_inbound, &["-CAfile", &ca, "-ign_eof"]);
    assert!(refused.contains("alert") || refused.contains("error"), "{refused}");
    boxes.b.wait_for("refusal counted", Duration::from_secs(10), |d| refusals(d) >= 1.0);
}

#[test]
fn box_a_sends_mutual_tls_with_its_own_identity_to_the_peer() {
    // Box A alone; its peer is openssl s_server holding echo's certificate, which demands and
    // prints A's client certificate and the bytes that follow the handshake.
    let dirs = tempfile::tempdir().unwrap();
    let identity = shared_issuer(dirs.path());
    let (cert, key) = issue(dirs.path(), "echo");
    let peer = SocketAddr::from(([127, 0, 0, 2], free_port_on_b()));
    let server = SServer::start(
        peer,
        &[
            "-cert",
            &cert,
            "-cert_chain",
            &cert,
            "-key",
            &key,
            "-CAfile",
            &dirs.path().join("ca.crt").display().to_string(),
            "-Verify",
            "2",
            "-verify_return_error",
            "-alpn",
            "meshkeep/1",
            "-naccept",
            "1",
        ],
    );
    manifests(&dirs.path().join("m"), 8080, Some("echo"));
    let listener = free_addr();
    let a = Daemon::start(&format!(
        "{identity}[identity.proxy]\nnamespace = \"shop\"\nservice_account = \"web\"\n\
         [upstream.local]\npath = {:?}\npoll_interval = \"200ms\"\n\
         [proxy]\npeer_inbound_port = {}\n[[proxy.listeners]]\nlisten = \"{listener}\"\nservice = \"echo.shop\"\nport = 80\n",
        dirs.path().join("m").display().to_string(),
        peer.port()
    ));
    a.wait_for("proxy certificate", Duration::from_secs(60), |d| d.log().contains("proxy: TLS identity in use"));
    a.wait_for("echo.shop known", Duration::from_secs(30), |d| d.resolve("echo.shop")["result"] == "found");
    let mut client = TcpStream::connect(listener).unwrap();
    client.write_all(b"opaque bytes from a local client").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let printed = server.output();
    assert!(printed.contains(&format!("CN = {WEB_IDENTITY}")), "A presented its own identity\n{printed}");
    assert!(printed.contains("verify return:1"), "A's certificate verified against the mesh root\n{printed}");
    assert!(printed.contains("TLSv1.3") || printed.contains("TLS_AES"), "{printed}");
    assert!(printed.contains("opaque bytes from a local client"), "the client's bytes arrived inside TLS\n{printed}");
}
