#!/usr/bin/env python3
"""Seed a local registry with bench images for bench/steady-state.sh and bench/daemon.sh.

What it does: pushes REPOS x TAGS distinct OCI image manifests into the registry at
BASE (repositories bench/r00.., tags t00..), through the real distribution upload API:
one shared small layer blob per repository, one config blob unique per tag, then one
manifest PUT per tag. Every response status and the returned digests are checked.

Run:  python3 bench/seed.py http://127.0.0.1:PORT [REPOS] [TAGS]
      (defaults: 50 repositories x 20 tags = 1,000 tags)

Standard library only. Refuses any host other than 127.0.0.1. Reuses one keep-alive
connection for all requests.
"""

import hashlib
import http.client
import json
import sys
import time
from urllib.parse import urljoin, urlsplit

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Registry:
    """One keep-alive HTTP/1.1 connection to a loopback registry."""

    def __init__(self, base: str):
        parts = urlsplit(base)
        if parts.scheme != "http" or parts.hostname != "127.0.0.1" or not parts.port:
            raise SystemExit(f"seed: refusing {base!r}: only http://127.0.0.1:PORT is allowed")
        self.base = f"http://127.0.0.1:{parts.port}"
        self.port = parts.port
        self.conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30)
        self.requests = 0

    def request(self, method: str, target: str, body: bytes = b"", headers=None):
        """Sends one request and reads the whole body so the connection can be reused.

        A dropped keep-alive connection is reopened once; a second failure is fatal.
        """
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for attempt in (1, 2):
            try:
                self.conn.request(method, target, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                self.requests += 1
                return resp.status, resp.headers, data
            except (http.client.HTTPException, ConnectionError) as e:
                self.conn.close()
                if attempt == 2:
                    raise SystemExit(f"seed: {method} {target} failed: {e!r}")
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        raise AssertionError("unreachable")

    def expect(self, want: int, method: str, target: str, body: bytes = b"", headers=None):
        status, hdrs, data = self.request(method, target, body, headers)
        if status != want:
            text = data[:500].decode("utf-8", "replace")
            raise SystemExit(f"seed: {method} {target} answered {status}, expected {want}: {text}")
        return hdrs

    def push_blob(self, repo: str, data: bytes) -> str:
        """Monolithic upload: POST opens a session, PUT to its Location with ?digest= closes it."""
        digest = digest_of(data)
        start = f"/v2/{repo}/blobs/uploads/"
        hdrs = self.expect(202, "POST", start)
        location = hdrs.get("Location")
        if not location:
            raise SystemExit(f"seed: POST {start} answered 202 without a Location header")
        # Location may be absolute or relative, and usually carries a _state query already.
        target = urlsplit(urljoin(self.base + start, location))
        if target.hostname != "127.0.0.1" or target.port != self.port:
            raise SystemExit(f"seed: upload Location {location!r} leaves 127.0.0.1:{self.port}")
        sep = "&" if target.query else "?"
        path = target.path + (f"?{target.query}" if target.query else "") + f"{sep}digest={digest}"
        hdrs = self.expect(
            201, "PUT", path, data, {"Content-Type": "application/octet-stream"}
        )
        got = hdrs.get("Docker-Content-Digest")
        if got and got != digest:
            raise SystemExit(f"seed: blob digest mismatch in {repo}: sent {digest}, registry says {got}")
        return digest

    def put_manifest(self, repo: str, tag: str, body: bytes) -> str:
        digest = digest_of(body)
        hdrs = self.expect(
            201, "PUT", f"/v2/{repo}/manifests/{tag}", body, {"Content-Type": MANIFEST_TYPE}
        )
        got = hdrs.get("Docker-Content-Digest")
        if got != digest:
            raise SystemExit(f"seed: manifest digest mismatch for {repo}:{tag}: sent {digest}, registry says {got}")
        return digest


def main() -> None:
    if len(sys.argv) not in (2, 3, 4):
        raise SystemExit("usage: seed.py http://127.0.0.1:PORT [REPOS] [TAGS]")
    reg = Registry(sys.argv[1])
    repos = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    tags = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    if not (0 < repos <= 100 and 0 < tags <= 100):
        raise SystemExit("seed: REPOS and TAGS must be between 1 and 100")

    started = time.monotonic()
    manifests = set()
    for r in range(repos):
        repo = f"bench/r{r:02d}"
        layer = f"driftwatch bench layer for {repo}\n".encode()
        layer_digest = reg.push_blob(repo, layer)
        for t in range(tags):
            tag = f"t{t:02d}"
            config = canonical({
                "architecture": "amd64",
                "os": "linux",
                "config": {"Labels": {"driftwatch.bench": f"{repo}:{tag}"}},
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            })
            config_digest = reg.push_blob(repo, config)
            manifest = canonical({
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": LAYER_TYPE, "digest": layer_digest, "size": len(layer)}],
            })
            manifests.add(reg.put_manifest(repo, tag, manifest))
    elapsed = time.monotonic() - started
    want = repos * tags
    if len(manifests) != want:
        raise SystemExit(f"seed: expected {want} distinct manifests, got {len(manifests)}")
    print(
        f"seeded {want} tags over {repos} repositories "
        f"({reg.requests} requests, {elapsed:.1f} s)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
