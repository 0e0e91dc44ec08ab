"""A stand-in for the Kubernetes API, for .ci/images: `python3 .ci/kube_api_standin.py PORT`.

It listens on 127.0.0.1:PORT over plain HTTP and answers what the operator asks when it starts without leader
election: the list of Deployments (none) and a watch on them (no events; the stream stays open until the client
goes). Anything else is a Kubernetes 404 Status. Every request is logged to stdout as `api: "GET /path…" code`.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        print("api:", format % args, flush=True)

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path != "/apis/apps/v1/deployments":
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
        elif parse_qs(url.query).get("watch") == ["true"]:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            while self.connection.recv(1024):
                pass
            self.close_connection = True
        else:
            self.reply(200, {"kind": "DeploymentList", "apiVersion": "apps/v1", "metadata": {"resourceVersion": "1"}, "items": []})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Api)
    server.daemon_threads = True
    server.serve_forever()
