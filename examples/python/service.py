#!/usr/bin/env python3
"""A service in Python, standard library only, that knows nothing of rootscale: it takes part through
rootscale-proxy (its sidecar), as a Go, Java or Node service would.

It is a thread-per-request HTTP/1.1 server. Each request holds one of --pool workers for --work milliseconds (a
sleep, like I/O), then calls each --call callee in turn through the HTTP proxy in HTTP_PROXY (absolute-form
requests, as any HTTP_PROXY client sends them), passing the W3C trace context on unless --no-propagate. It
answers 200, or 502 when a callee failed.

    python3 service.py --name svc-b --pool 8 --work 5 --call svc-c

It prints "listening on PORT" once it listens (--port 0 picks a free one). POST /control?pool=N&work=MS changes
the pool and the work while it runs (the tests' faults). Options it is not given come from the environment local
mode sets for an external service (`runtime: external`): PORT, SERVICE_NAME, SERVICE_POOL, SERVICE_WORK_MS and
SERVICE_CALLS (comma-separated).
"""

import argparse
import http.client
import http.server
import os
import sys
import threading
import time
import urllib.parse

TRACE_HEADERS = ("traceparent", "tracestate")


class Pool:
    """Worker slots whose number can change while requests hold them."""

    def __init__(self, size):
        self.size = size
        self.held = 0
        self.changed = threading.Condition()

    def resize(self, size):
        with self.changed:
            self.size = size
            self.changed.notify_all()

    def __enter__(self):
        with self.changed:
            while self.held >= self.size:
                self.changed.wait()
            self.held += 1

    def __exit__(self, *_):
        with self.changed:
            self.held -= 1
            self.changed.notify()


def proxy_address():
    proxy = os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy")
    if not proxy:
        return None
    parsed = urllib.parse.urlsplit(proxy)
    return parsed.hostname, parsed.port or 80


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    env = os.environ.get
    parser.add_argument("--name", default=env("SERVICE_NAME"))
    parser.add_argument("--port", type=int, default=int(env("PORT", "0")))
    parser.add_argument("--pool", type=int, default=int(env("SERVICE_POOL", "64")))
    parser.add_argument("--work", type=float, default=float(env("SERVICE_WORK_MS", "5")), help="milliseconds holding a worker")
    parser.add_argument("--call", action="append", default=None, help="a callee's name, called in turn")
    parser.add_argument("--no-propagate", action="store_true", help="do not pass the trace context on")
    args = parser.parse_args()
    if not args.name:
        parser.error("--name (or SERVICE_NAME) is required")
    if args.call is None:
        args.call = [name for name in env("SERVICE_CALLS", "").split(",") if name]
    if args.pool < 1 or not 0 <= args.work <= 10_000:
        parser.error("--pool must be at least 1 and --work within 0..10000 ms")
    pool = Pool(args.pool)
    settings = {"work": args.work / 1000.0}
    proxy = proxy_address()
    if args.call and proxy is None:
        parser.error("--call needs HTTP_PROXY: callees are reached through the proxy")
    local = threading.local()

    def call(callee, headers):
        # One keep-alive connection to the proxy per worker thread.
        connection = getattr(local, "connection", None)
        if connection is None:
            connection = local.connection = http.client.HTTPConnection(*proxy, timeout=10)
        try:
            connection.request("GET", f"http://{callee}/", headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            connection.close()
            local.connection = None
            return 599

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def answer(self, status, text):
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            target = urllib.parse.urlsplit(self.path)
            if target.path != "/control":
                return self.answer(404, "not found\n")
            query = urllib.parse.parse_qs(target.query)
            try:
                if "pool" in query:
                    size = int(query["pool"][0])
                    if size < 1:
                        raise ValueError("pool")
                    pool.resize(size)
                if "work" in query:
                    work = float(query["work"][0])
                    if not 0 <= work <= 10_000:
                        raise ValueError("work")
                    settings["work"] = work / 1000.0
            except ValueError as error:
                return self.answer(400, f"bad {error}\n")
            self.answer(200, "ok\n")

        def do_GET(self):
            with pool:
                time.sleep(settings["work"])
            headers = {}
            if not args.no_propagate:
                for name in TRACE_HEADERS:
                    value = self.headers.get(name)
                    if value is not None:
                        headers[name] = value
            for callee in args.call:
                status = call(callee, headers)
                if status != 200:
                    return self.answer(502, f"{callee} answered {status}\n")
            self.answer(200, f"{args.name}\n")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
