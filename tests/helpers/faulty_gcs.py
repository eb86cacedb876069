"""An HTTP proxy that sits between Cloud Storage clients (gcsfs, tensorstore) and a storage
emulator and misbehaves on the requests a test names: answers with an error status, drops
the connection without an answer, or delays the request. Standard library only.

    proxy = FaultyGCS("http://127.0.0.1:PORT")        # the emulator's URL
    proxy.start()                                      # proxy.url is what the clients get
    proxy.add_rule(Rule(method="POST", pattern=r"name=run/checkpoints/7/", status=403, after=3))
    ...
    proxy.stop()

A rule matches a request when its method (None: any) equals the request's and its regular
expression `pattern` is found in the request target (path and query, percent-decoded, so
object names read as written: `.../o?uploadType=media&name=run/checkpoints/7/state/d/abc`).
Of the requests it matches it acts on the ones numbered (from 1) above `after` and, with
`times`, at most that many of those; with `probability` each of those with that chance from
a random generator seeded by `seed`. What it does: `status` (answer that HTTP status with a
JSON error body; the request never reaches the emulator), `drop` (close the connection
without answering; the request never reaches the emulator), `delay` (wait that many seconds
first, then forward). The first rule that acts on a request decides; every request is
logged in `proxy.log` as (method, target, action).
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.parse

# Hop-by-hop headers, not forwarded (RFC 9110 7.6.1).
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "proxy-connection"}


@dataclasses.dataclass
class Rule:
  pattern: str = ""
  method: str | None = None
  status: int | None = None
  drop: bool = False
  delay: float = 0.0
  after: int = 0
  times: int | None = None
  probability: float = 1.0
  seed: int = 0
  matched: int = 0  # requests this rule matched so far
  acted: int = 0  # of those, the ones it acted on

  def __post_init__(self):
    if sum((self.status is not None, self.drop, self.delay > 0)) != 1:
      raise ValueError("a rule does exactly one of status=, drop=True, delay=")
    self._regex = re.compile(self.pattern)
    self._random = random.Random(self.seed)

  def action(self) -> str:
    if self.status is not None:
      return f"status {self.status}"
    return "drop" if self.drop else f"delay {self.delay}"

  def _acts_on(self, method: str, target: str) -> bool:
    """Counts the request if it matches; says whether the rule acts on it."""
    if (self.method is not None and method != self.method) or not self._regex.search(target):
      return False
    self.matched += 1
    if self.matched <= self.after or (self.times is not None and self.acted >= self.times):
      return False
    if self.probability < 1.0 and self._random.random() >= self.probability:
      return False
    self.acted += 1
    return True


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    """Quiet about clients that close a connection mid-request (they retry elsewhere)."""
    if not isinstance(sys.exc_info()[1], ConnectionError):
      super().handle_error(request, client_address)


class FaultyGCS:
  """The proxy: a threading HTTP server on 127.0.0.1 forwarding to `upstream`."""

  def __init__(self, upstream: str):
    parsed = urllib.parse.urlsplit(upstream)
    self.upstream = (parsed.hostname, parsed.port or 80)
    self.rules: list[Rule] = []
    self.log: list[tuple[str, str, str]] = []
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect

      def log_message(self, *args):  # quiet
        pass

      def _handle(self):
        try:
          self._answer()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on this request
          self.close_connection = True

      def _answer(self):
        body = self._read_body()
        target = urllib.parse.unquote(self.path)
        rule = proxy._decide(self.command, target)
        if rule is not None and rule.drop:
          self.close_connection = True
          try:
            self.connection.shutdown(socket.SHUT_RDWR)
          except OSError:
            pass
          return
        if rule is not None and rule.status is not None:
          payload = json.dumps({"error": {"code": rule.status, "message": "injected fault",
                                          "errors": [{"reason": "injected"}]}}).encode()
          self.send_response(rule.status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        if rule is not None and rule.delay:
          time.sleep(rule.delay)
        self._forward(body)

      def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
          chunks = []
          while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
              while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
              return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

      def _forward(self, body: bytes):
        conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
          headers = {k: v for k, v in self.headers.items()
                     if k.lower() not in _HOP and k.lower() != "content-length"}
          if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
          conn.request(self.command, self.path, body=body, headers=headers)
          resp = conn.getresponse()
          data = resp.read()
          self.send_response(resp.status, resp.reason)
          for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
              self.send_header(k, v)
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          if self.command != "HEAD":
            self.wfile.write(data)
        finally:
          conn.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    self._server = _Server(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-gcs", daemon=True)

  def _decide(self, method: str, target: str) -> Rule | None:
    with self._lock:
      chosen = next((rule for rule in self.rules if rule._acts_on(method, target)), None)
      self.log.append((method, target, chosen.action() if chosen else "forward"))
      return chosen

  def add_rule(self, rule: Rule) -> Rule:
    with self._lock:
      self.rules.append(rule)
    return rule

  def clear(self) -> None:
    """Removes every rule and empties the log."""
    with self._lock:
      self.rules.clear()
      self.log.clear()

  def requests(self, pattern: str = "", method: str | None = None) -> list[tuple[str, str, str]]:
    """The logged requests whose target matches `pattern` (and method, if given)."""
    regex = re.compile(pattern)
    with self._lock:
      return [r for r in self.log if regex.search(r[1]) and (method is None or r[0] == method)]

  def start(self) -> "FaultyGCS":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()
