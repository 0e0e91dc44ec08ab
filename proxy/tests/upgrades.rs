//! Connections that leave HTTP through the proxy: a protocol switch (101, as a WebSocket handshake makes) inbound
//! and outbound, and a `CONNECT` tunnel out; each is joined byte for byte after the handshake and counted. All on
//! loopback, with raw sockets so the bytes on the wire are the test's own.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use bytes::Bytes;
use common::{agent, listen};
use http::{Request, Response, StatusCode, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rootscale_proxy::Routes;
use rootscale_tracer::identity::{KeyRing, MeshKeys};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// An application that switches to an echo protocol when asked (`Upgrade: echo`), and answers 426 otherwise.
async fn switching_echo() -> SocketAddr {
    let (listener, addr) = listen().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|mut request: Request<Incoming>| async move {
                let asked = request.headers().get(header::UPGRADE).is_some_and(|value| value == "echo");
                let mut response = Response::new(Empty::<Bytes>::new());
                if !asked {
                    *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
                    return Ok::<_, Infallible>(response);
                }
                let switched = hyper::upgrade::on(&mut request);
                tokio::spawn(async move {
                    let Ok(switched) = switched.await else { return };
                    let mut io = TokioIo::new(switched);
                    let mut buf = [0u8; 256];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                response.headers_mut().insert(header::CONNECTION, "upgrade".parse().unwrap());
                response.headers_mut().insert(header::UPGRADE, "echo".parse().unwrap());
                Ok(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    addr
}

/// A plain TCP echo server.
async fn tcp_echo() -> SocketAddr {
    let (listener, addr) = listen().await;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Sends `head` on a new connection to `to`, reads the response head; returns its status line and the connection.
async fn handshake(to: SocketAddr, head: &str) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(to).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut read = Vec::new();
    while !read.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed after {:?}", String::from_utf8_lossy(&read));
        read.push(byte[0]);
    }
    let text = String::from_utf8(read).unwrap();
    (text.lines().next().unwrap().to_string(), stream)
}

async fn echoes(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_switch_passes_through_both_ways_and_a_connect_tunnels_out() {
    let keys = Arc::new(KeyRing::fixed(MeshKeys::generate().unwrap()));
    let agent = agent("svc-b", &keys, false, None).await;
    let app = switching_echo().await;
    let echo = tcp_echo().await;
    let routes = Routes::default().with("svc-c", app.to_string().parse().unwrap()).unwrap();
    let proxy = common::proxy(&agent, app, routes, &[]).await;

    // Inbound: a caller's handshake reaches the application with its Upgrade, and the switched connection echoes.
    let (status, mut stream) = handshake(
        proxy.inbound_addr(),
        "GET /chat HTTP/1.1\r\nHost: svc-b\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 101 Switching Protocols");
    echoes(&mut stream, b"inbound frames").await;
    echoes(&mut stream, b"and more").await;
    // A plain request still goes through as HTTP (the application asks for an upgrade: 426).
    let (status, _) = handshake(proxy.inbound_addr(), "GET / HTTP/1.1\r\nHost: svc-b\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 426 Upgrade Required");

    // Outbound: the application's handshake through the HTTP proxy port, absolute-form.
    let (status, mut stream) = handshake(
        proxy.outbound_addr(),
        "GET http://svc-c/chat HTTP/1.1\r\nHost: svc-c\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 101 Switching Protocols");
    echoes(&mut stream, b"outbound frames").await;

    // CONNECT: a tunnel to the callee's port, then bytes both ways; to a port where nothing listens, a 502.
    let (status, mut stream) =
        handshake(proxy.outbound_addr(), &format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n")).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    echoes(&mut stream, b"\x16\x03\x01 opaque bytes").await;
    let (nowhere_listener, nowhere) = listen().await;
    drop(nowhere_listener);
    let (status, _) =
        handshake(proxy.outbound_addr(), &format!("CONNECT {nowhere} HTTP/1.1\r\nHost: {nowhere}\r\n\r\n")).await;
    assert_eq!(status, "HTTP/1.1 502 Bad Gateway");

    let counters = proxy.counters();
    assert_eq!(counters.upgraded.load(Ordering::Relaxed), 2);
    assert_eq!(counters.tunnels.load(Ordering::Relaxed), 1);
    assert_eq!(counters.upstream_errors.load(Ordering::Relaxed), 1);
    // The handshakes were requests and calls like any other: measured, not counted as uncorrelated tunnels.
    assert_eq!(counters.uncorrelated.load(Ordering::Relaxed), 1, "the outbound handshake carried no trace context");
}
