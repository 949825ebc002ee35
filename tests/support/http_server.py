"""A real HTTP server of a folder, for network shards: it serves byte ranges as object stores do, counts what it
sends, and can cut connections mid-body like a failing server."""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path


class Server:
    """A threaded HTTP server of `root` that honours `Range: bytes=A-[B]`; `fail_after` bytes of a response then
    cut the connection (`failures` times), as a server that dies mid-transfer. `ranges` records each request's
    Range header ("" for none) and `sent` the body bytes sent in all."""

    def __init__(self, root: Path, fail_after: int = 0, failures: int = 0) -> None:
        outer = self
        self.failures, self.requests, self.sent = failures, 0, 0
        self.ranges: list[str] = []
        lock = threading.Lock()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def send_head(self):
                wanted = self.headers.get("Range", "")
                with lock:
                    outer.requests += 1
                    outer.ranges.append(wanted)
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
                path = Path(self.translate_path(self.path))
                if not match or not path.is_file():
                    self.span = None
                    return super().send_head()
                size = path.stat().st_size
                first = int(match[1])
                last = min(int(match[2]) if match[2] else size - 1, size - 1)
                if first >= size:
                    self.send_error(416, "Range Not Satisfiable")
                    return None
                source = path.open("rb")
                source.seek(first)
                self.span = last - first + 1
                self.send_response(206)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.send_header("Content-Length", str(self.span))
                self.end_headers()
                return source

            def copyfile(self, source, outputfile):
                remaining = getattr(self, "span", None)
                with lock:
                    cut = outer.failures > 0
                    outer.failures -= cut
                limit = fail_after if cut else None
                while True:
                    size = 1 << 16
                    if remaining is not None:
                        size = min(size, remaining)
                    if limit is not None:
                        size = min(size, limit)
                    chunk = source.read(size) if size > 0 else b""
                    if not chunk:
                        break
                    outputfile.write(chunk)
                    with lock:
                        outer.sent += len(chunk)
                    if remaining is not None:
                        remaining -= len(chunk)
                    if limit is not None:
                        limit -= len(chunk)
                if cut:
                    outputfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # Cut mid-body: Content-Length promised more.

        class Threading(http.server.ThreadingHTTPServer):
            request_queue_size = 64  # Clients fetch ranges in parallel; the default backlog of 5 drops their SYNs.

        self.httpd = Threading(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
