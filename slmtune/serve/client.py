"""Talk to a running server's admin API; what `slmtune adapters add/remove/list --url` uses.

    AdminClient("http://127.0.0.1:8000").add("support", "/abs/path/runs/quickstart")

Plain urllib, so the command needs nothing beyond the standard library.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request


class ClientError(RuntimeError):
    """The server refused the call or could not be reached; the message is the server's own."""


class AdminClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = err.reason
            raise ClientError(f"{method} {path}: {err.code}: {message}") from None
        except (urllib.error.URLError, OSError) as err:
            raise ClientError(f"cannot reach {self.url}: {getattr(err, 'reason', err)}") from None

    def add(self, name: str, path: str) -> dict:
        return self._call("POST", "/admin/adapters", {"name": name, "path": path})

    def remove(self, name: str) -> dict:
        return self._call("DELETE", "/admin/adapters/" + urllib.parse.quote(name, safe=""))

    def list(self) -> list[dict]:
        return self._call("GET", "/admin/adapters")["data"]
