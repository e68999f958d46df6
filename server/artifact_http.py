"""The coordinator's HTTP side: artifacts for devices, /metrics for Prometheus, a small JSON API.

  GET  /  (or /index.html)                       the fleet status page (server/status_page.py)
  GET  /manifests/<variant_id>/v<version>.json   manifest bytes (devices check their sha256 from the desired state)
  GET  /manifests/<variant_id>/v<version>.json.sig   the coordinator's signature on them (JSON: key_id, sig)
  GET  /blobs/<sha256>                           a content-addressed block; single `Range: bytes=` requests -> 206
  GET  /metrics                                  Prometheus exposition
  GET  /api/devices                              the registry as JSON
  GET  /api/catalog                              catalog.json
  POST /api/fl/report                            federated-round results -> metrics
  POST /api/variants/<variant_id>/stitch?accuracy=F&base_version=N
                                                 aggregated stitch weights trained from version N -> the
                                                 variant's next version, pushed (409 when N is not current)
POSTs need `Authorization: Bearer <fleet.api_token>` when a token is configured. The semantics live in the
coordinator (`FleetAPI` below is what this module needs from it); this module only speaks HTTP.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import ssl
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from server.metrics import FleetMetrics
from server.status_page import CONTENT_SECURITY_POLICY, PAGE
from shared.vocabulary import SHA256, VARIANT_ID

log = logging.getLogger("restnet.coordinator")

MAX_POST_BYTES = 256 << 20
CHUNK = 1 << 16
_MANIFEST = re.compile(rf"/manifests/({VARIANT_ID.pattern})/v([0-9]{{1,12}})\.json(\.sig)?")
_BLOB = re.compile(rf"/blobs/({SHA256.pattern})")
_STITCH = re.compile(rf"/api/variants/({VARIANT_ID.pattern})/stitch")


class ApiError(Exception):
    """A request the API refuses: HTTP status plus a one-line reason (sent as JSON)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class FleetAPI(Protocol):
    metrics: FleetMetrics

    def manifest_path(self, variant_id: str, version: int) -> Path | None: ...
    def blob_path(self, sha256: str) -> Path: ...
    def catalog_bytes(self) -> bytes: ...
    def devices(self) -> list[dict]: ...
    def fl_report(self, report: dict) -> dict: ...
    def stitch_update(self, variant_id: str, accuracy: float, base_version: int, body: bytes) -> dict: ...


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """One `bytes=` range -> (start, end inclusive); None: serve everything; "unsatisfiable": 416.

    Malformed or multi-range headers are ignored (RFC 9110 allows serving the whole representation); so are
    positions of more than 18 digits, past any file this serves.
    """
    m = re.fullmatch(r"bytes=(\d{0,18})-(\d{0,18})", (header or "").strip())
    if not m or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":
        length = int(last)
        return (max(0, size - length), size - 1) if length > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    return (start, end) if start < size else "unsatisfiable"


class _Handler(BaseHTTPRequestHandler):
    server_version = "restnet-fleet"
    protocol_version = "HTTP/1.1"
    api: FleetAPI  # set on the subclass made per server
    token: str | None

    def log_message(self, fmt, *args):  # requests are counted in metrics, not logged line by line
        pass

    # ---- GET / HEAD -------------------------------------------------------------------------------------

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head: bool = False):
        with self._answering(head):
            self._get(urlsplit(self.path).path, head)

    def _get(self, path: str, head: bool):
        if m := _BLOB.fullmatch(path):
            return self._file("blob", self.api.blob_path(m.group(1)), "application/octet-stream", head)
        if m := _MANIFEST.fullmatch(path):
            manifest = self.api.manifest_path(m.group(1), int(m.group(2)))
            if m.group(3):  # its signature
                return self._file("signature", manifest and Path(f"{manifest}{m.group(3)}"), "application/json", head)
            return self._file("manifest", manifest, "application/json", head)
        if path == "/metrics":
            return self._send(200, self.api.metrics.exposition(), "text/plain; version=0.0.4", head)
        if path == "/api/devices":
            return self._json(200, self.api.devices(), head)
        if path == "/api/catalog":
            return self._send(200, self.api.catalog_bytes(), "application/json", head)
        if path in ("/", "/index.html"):
            return self._send(200, PAGE, "text/html; charset=utf-8", head,
                              {"Cache-Control": "no-store", "Content-Security-Policy": CONTENT_SECURITY_POLICY})
        raise ApiError(404, f"no such resource: {path[:200]}")

    @contextmanager
    def _answering(self, head: bool = False):
        """Every request gets a status: ApiError -> its code, anything unexpected -> 500 (and a log line)."""
        self._started = False
        try:
            yield
        except ApiError as exc:
            if self.command == "POST":  # its body may be unread: this connection cannot carry another request
                self.close_connection = True
            self._json(exc.status, {"error": exc.message}, head)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            raise  # the client went away: nobody to answer (the server ignores these)
        except Exception:
            log.exception("HTTP %s %s failed", self.command, self.path[:200])
            self.close_connection = True
            if not self._started:  # past the headers the client sees a short body, which it must verify anyway
                self._json(500, {"error": "internal error"}, head)

    def _file(self, kind: str, path: Path | None, ctype: str, head: bool):
        if path is None or not path.is_file():
            self.api.metrics.artifact_requests.labels(kind, "404").inc()
            raise ApiError(404, f"no such {kind}")
        with open(path, "rb") as fh:
            size = path.stat().st_size
            rng = parse_range(self.headers.get("Range"), size)
            if rng == "unsatisfiable":
                self.api.metrics.artifact_requests.labels(kind, "416").inc()
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = rng if rng else (0, size - 1)
            code = 206 if rng else 200
            self.api.metrics.artifact_requests.labels(kind, str(code)).inc()
            self._started = True
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if head:
                return
            fh.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = fh.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
                self.api.metrics.artifact_bytes.inc(len(chunk))

    # ---- POST -------------------------------------------------------------------------------------------

    def do_POST(self):
        with self._answering():
            self._post(urlsplit(self.path))

    def _post(self, url):
        self._authorise()
        body = self._body()
        if url.path == "/api/fl/report":
            try:
                report = json.loads(body)
            except ValueError:
                raise ApiError(400, "body is not JSON") from None
            return self._json(200, self.api.fl_report(report))
        if m := _STITCH.fullmatch(url.path):
            query = parse_qs(url.query)
            try:
                accuracy = float(query["accuracy"][0])
            except (KeyError, ValueError):
                raise ApiError(400, "query parameter accuracy=<float in [0, 1]> is required") from None
            try:
                base_version = int(query["base_version"][0][:12])
            except (KeyError, ValueError):
                raise ApiError(400, "query parameter base_version=<the version the stitch was trained from> "
                                    "is required") from None
            return self._json(200, self.api.stitch_update(m.group(1), accuracy, base_version, body))
        raise ApiError(404, f"no such resource: {url.path[:200]}")

    def _authorise(self):
        if self.token is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise ApiError(401, "missing or wrong API token (Authorization: Bearer <fleet.api_token>)")

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "Content-Length is required") from None
        if not 0 <= length <= MAX_POST_BYTES:
            raise ApiError(413, f"body larger than {MAX_POST_BYTES} bytes")
        return self.rfile.read(length)

    # ---- replies ----------------------------------------------------------------------------------------

    def _json(self, status: int, obj, head: bool = False):
        self._send(status, json.dumps(obj).encode(), "application/json", head)

    def _send(self, status: int, data: bytes, ctype: str, head: bool = False, headers: dict | None = None):
        self._started = True
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request, client_address):
        """The TLS handshake runs in the request's own thread, so a slow client cannot stall accept()."""
        if self.tls is not None:
            request = self.tls.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address):
        """Clients that hang up or fail the TLS handshake are their own problem; anything else is ours."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)


class ArtifactServer:
    def __init__(self, api: FleetAPI, host: str, port: int, cert_file: str | None = None,
                 key_file: str | None = None, token: str | None = None):
        handler = type("Handler", (_Handler,), {"api": api, "token": token})
        self.httpd = _Server((host, port), handler)
        if cert_file:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert_file, key_file)
            self.httpd.tls = ctx
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="artifact-http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> "ArtifactServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)
