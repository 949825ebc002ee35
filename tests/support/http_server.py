"""A real HTTP server of a folder, for network shards: it can cut connections mid-body like a failing server."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path


class Server:
    """A threaded HTTP server of `root`; `fail_after` bytes of a response then cut the connection
    (`failures` times), as a server that dies mid-transfer."""

    def __init__(self, root: Path, fail_after: int = 0, failures: int = 0) -> None:
        outer = self
        self.failures, self.requests = failures, 0

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass

            def copyfile(self, source, outputfile):
                outer.requests += 1
                if outer.failures > 0:
                    outer.failures -= 1
                    outputfile.write(source.read(fail_after))
                    outputfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # Cut mid-body: Content-Length promised more.
                    return
                super().copyfile(source, outputfile)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
