"""`avatar serve`: a local web app (standard library HTTP server, no framework, nothing online).

    GET  /                    the page (static/index.html; everything it loads is in static/)
    GET  /static/NAME         the page's files, among them the 3D viewer (static/viewer.js)
    POST /api/upload?name=F   the request body is a file (photo or speech) -> {"upload": ID}
    POST /api/jobs            JSON {"kind": "create" | "drive" | "converse", ...} -> a job
    POST /api/jobs/ID/cancel  a queued job never starts; a running one is stopped -> the job
    GET  /api/jobs            every job: queued, running (stage, percent, ETA), done, error
    GET  /api/avatars         the avatars made since the server started, with their files
    GET  /files/JOB/NAME      a job's output (avatar .zip, .splat, .ply, .glb, .mp4)

Uploads are capped in size and kept, with every output, in one temporary folder that is removed
when the server stops. Jobs run one at a time (`jobs.JobQueue`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from ..errors import AvatarError
from .jobs import Job, JobQueue, Step

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8",
         ".mp4": "video/mp4", ".zip": "application/zip", ".splat": "application/octet-stream",
         ".ply": "application/octet-stream", ".glb": "model/gltf-binary",
         ".wasm": "application/wasm", ".json": "application/json"}  # fmt: skip
SAFE_NAME = re.compile(r"^[\w][\w.\-]{0,80}$")
QUALITY = {  # create's settings per choice on the page
    "fast": ["--gaussians", "8000", "--fit-steps", "60", "--refine-steps", "40", "--size", "256"],
    "full": [],
}
OUTPUTS = {"avatar": "avatar.zip", "turntable": "turntable.mp4", "splat": "avatar.splat",
           "ply": "avatar.ply", "glb": "avatar.glb", "video": "talk.mp4"}  # fmt: skip
TURNTABLE = ["--orbit", "48", "--size", "384"]
# what may be uploaded: photos and speech (or a video's sound), by suffix; nothing a Python
# process could import, nothing a command line could read as a flag
MEDIA = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".wav", ".mp3", ".flac",
         ".ogg", ".oga", ".opus", ".webm", ".m4a", ".aac", ".mp4", ".mov", ".mkv"}  # fmt: skip
CHUNK = 1 << 20  # uploads stream to disk in pieces of this size
FRAMINGS, SIZES = ("full", "upper", "face"), (256, 384, 512)


class App:
    """The server's state: uploads, avatars and jobs, all under one temporary folder."""

    def __init__(self, max_upload_mb: float = 50.0, max_total_mb: float = 2048.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="avatar-serve-"))
        self.max_upload = int(max_upload_mb * 1024 * 1024)
        self.max_total = int(max_total_mb * 1024 * 1024)  # all uploads together
        self.stored = 0
        self.queue = JobQueue()
        self.uploads: dict[str, Path] = {}
        self.avatars: dict[str, dict] = {}  # job id of the create -> what the page shows
        self.lock = threading.Lock()

    def close(self) -> None:
        self.queue.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- uploads ---------------------------------------------------------------------------
    def upload(self, name: str, length: int, stream) -> str:
        """Stream an upload of `length` bytes to disk under its own (cleaned) name, so that the
        CLI's messages name it as the user knows it; only photo and sound suffixes."""
        clean = re.sub(r"[^\w.\-]+", "_", Path(name).name).lstrip(".-")[-80:] or "upload"
        if Path(clean).suffix.lower() not in MEDIA:
            raise AvatarError(f"{name}: upload a photo or a sound file "
                              f"({', '.join(sorted(MEDIA))})")  # fmt: skip
        if length <= 0:
            raise AvatarError(f"{name}: the file is empty")
        with self.lock:
            if self.stored + length > self.max_total:
                raise AvatarError(f"{name}: the server holds {self.stored / 2**20:.0f} MB of "
                                  "uploads already; restart it to make room")  # fmt: skip
            self.stored += length
            uid = secrets.token_hex(8)
        path = self.root / "uploads" / uid / clean
        path.parent.mkdir(parents=True)
        left = length
        with open(path, "wb") as fh:
            while left > 0 and (piece := stream.read(min(CHUNK, left))):
                fh.write(piece)
                left -= len(piece)
        if left:
            path.unlink()
            raise AvatarError(f"{name}: the upload stopped after {length - left} of {length} bytes")
        with self.lock:
            self.uploads[uid] = path
        return uid

    def _input(self, uid, folder: Path, prefix: str = "") -> str:
        """An upload linked into the job's `in/` folder; the path its command line uses (never
        in the folder the command runs in, where Python could import it)."""
        if not isinstance(uid, str) or uid not in self.uploads:
            raise AvatarError("upload a file first")
        source = self.uploads[uid]
        name = prefix + source.name
        (folder / "in").mkdir(parents=True, exist_ok=True)
        if not (folder / "in" / name).exists():
            os.link(source, folder / "in" / name)
        return f"in/{name}"

    def _avatar(self, aid) -> Path:
        if not isinstance(aid, str) or aid not in self.avatars:
            raise AvatarError("choose an avatar (create one first)")
        return self.root / "jobs" / aid / "avatar.zip"

    # ---- jobs ------------------------------------------------------------------------------
    def submit(self, request: dict) -> Job:
        kind = request.get("kind")
        jid = self.queue.new_id()
        folder = self.root / "jobs" / jid
        if kind == "create":
            photo = self._input(request.get("photo"), folder)
            quality = QUALITY.get(request.get("quality", "full"))
            if quality is None:
                raise AvatarError(f"quality {request.get('quality')!r}: use fast or full")
            title = f"create from {Path(photo).name}"
            steps = [
                Step("create", ["create", photo, "-o", "avatar.zip", *quality]),
                Step("turntable", ["render", "avatar.zip", "-o", "turntable.mp4", *TURNTABLE]),
                Step("splat", ["export", "avatar.zip", "-o", "avatar.splat"]),
                Step("ply", ["export", "avatar.zip", "-o", "avatar.ply"]),
                Step("glb", ["export", "avatar.zip", "-o", "avatar.glb"]),
            ]
            outputs = {k: v for k, v in OUTPUTS.items() if k != "video"}
            job = Job(jid, kind, title, steps, folder, outputs, on_done=self._register)
        elif kind in ("drive", "converse"):
            ids = list(request.get("avatars") or [request.get("avatar")])
            avatars = [self._avatar(a) for a in ids]
            audio = self._input(request.get("audio"), folder)
            framing, view = request.get("framing", "full"), str(request.get("view", "front"))
            size = int(request.get("size", 384))
            if framing not in FRAMINGS or size not in SIZES:
                raise AvatarError(f"framing {framing!r}, size {size}: use {FRAMINGS}, {SIZES}")
            if view not in ("front", "orbit") and not re.fullmatch(r"yaw=-?\d{1,3}", view):
                raise AvatarError(f"view {view!r}: use front, orbit or yaw=DEG")
            options = ["--framing", framing, "--view", view, "--size", str(size)]
            if kind == "drive":
                argv = ["drive", str(avatars[0]), audio, "-o", "talk.mp4", *options]
            else:
                partner = self._input(request.get("partner"), folder, "partner-")
                argv = ["converse", *map(str, avatars), "--audio", audio, "--partner", partner,
                        "-o", "talk.mp4", *options]  # fmt: skip
            title = f"{kind} {', '.join(self.avatars[a]['name'] for a in ids)}"
            job = Job(jid, kind, title, [Step(kind, argv)], folder, {"video": OUTPUTS["video"]})
        else:
            raise AvatarError(f"job kind {kind!r}: use create, drive or converse")
        folder.mkdir(parents=True, exist_ok=True)
        return self.queue.submit(job)

    def _register(self, job: Job) -> None:
        """A finished create: the avatar joins the list, with where the viewer should look."""
        target, position = viewer_camera(job.folder / "avatar.splat")
        name = job.title.removeprefix("create from ")
        with self.lock:
            self.avatars[job.id] = {"id": job.id, "name": name, "target": target,
                                    "position": position, **job.public()["outputs"]}  # fmt: skip

    def file(self, jid: str, name: str) -> Path | None:
        """A job's output by name (nothing else: no inputs, no paths)."""
        job = self.queue.jobs.get(jid)
        if job is None or name not in job.outputs.values() or not SAFE_NAME.match(name):
            return None
        path = job.folder / name
        return path if path.is_file() else None


VIEWER_FOV = 40.0  # the viewer's vertical field of view (AvatarViewer's default), degrees


def viewer_camera(splat: Path) -> tuple[list[float], list[float]]:
    """Where the 3D viewer looks (the Gaussians' middle) and stands (in front, far enough to see
    the whole body, with a margin, in the viewer's field of view)."""
    means = np.frombuffer(splat.read_bytes(), np.float32).reshape(-1, 8)[:, :3]
    means = means[np.isfinite(means).all(1)]
    if len(means) == 0:
        return [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]
    lo, hi = np.percentile(means, 1, 0), np.percentile(means, 99, 0)
    centre = (lo + hi).astype(np.float64) / 2
    distance = 1.3 * float((hi - lo).max()) / (2 * np.tan(np.radians(VIEWER_FOV / 2)))
    return centre.round(4).tolist(), (centre + [0.0, 0.0, distance]).round(4).tolist()


class Handler(BaseHTTPRequestHandler):
    app: App  # set by `make_server`
    hosts: frozenset[str] = frozenset()  # Host headers answered; empty: any (--host 0.0.0.0)
    server_version = "avatar-serve"
    timeout = 60  # a client that stops sending is dropped, not waited for

    def log_message(self, format, *args) -> None:  # quiet: the page shows what happens
        pass

    def _send(self, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), TYPES[".json"])

    def _error(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        self._json({"error": message}, status)

    def _file(self, path: Path, download: str | None = None) -> None:
        """A file, or the byte range asked for (video players seek with ranges)."""
        extra = {"Cache-Control": "no-cache", "Accept-Ranges": "bytes"}
        if download:
            extra["Content-Disposition"] = f'attachment; filename="{download}"'
        kind = TYPES.get(path.suffix, "application/octet-stream")
        size = path.stat().st_size
        ask = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if ask is None or not (ask[1] or ask[2]):
            return self._send(200, path.read_bytes(), kind, extra)
        start, end = (
            (int(ask[1]), int(ask[2] or size - 1)) if ask[1] else (size - int(ask[2]), size - 1)
        )
        start, end = max(start, 0), min(end, size - 1)
        if start > end:
            return self._send(416, b"", kind, {"Content-Range": f"bytes */{size}"})
        with open(path, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1)
        self._send(206, body, kind, {**extra, "Content-Range": f"bytes {start}-{end}/{size}"})

    def _trusted(self) -> bool:
        """Only pages of this server may talk to it: the Host must be this server's own name
        (another site's page reached by DNS rebinding names its own host), and a POST must
        carry the page's X-Avatar header (a cross-site form or no-cors fetch cannot)."""
        if self.hosts and self.headers.get("Host", "") not in self.hosts:
            self._error("this server answers only to its own address", 403)
            return False
        if self.command == "POST" and self.headers.get("X-Avatar") != "1":
            self._error("requests come from the avatar page (X-Avatar header missing)", 403)
            return False
        return True

    def do_GET(self) -> None:
        if not self._trusted():
            return
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        if url.path == "/":
            return self._file(STATIC / "index.html")
        if len(parts) == 2 and parts[0] == "static" and SAFE_NAME.match(parts[1]):
            path = STATIC / parts[1]
            return self._file(path) if path.is_file() else self._error("not found", 404)
        if url.path == "/api/jobs":
            return self._json(self.app.queue.listing())
        if url.path == "/api/avatars":
            with self.app.lock:
                return self._json(list(reversed(self.app.avatars.values())))
        if len(parts) == 3 and parts[0] == "files":
            path = self.app.file(parts[1], parts[2])
            if path is not None:
                download = "download" in parse_qs(url.query)
                return self._file(path, f"{parts[1]}-{parts[2]}" if download else None)
        self._error("not found", 404)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        if not self._trusted():
            self.close_connection = True
            return
        url = urlparse(self.path)
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0:
            return self._error("the request has no Content-Length", 411)
        if length > self.app.max_upload:
            self.close_connection = True
            # closing on an unread body resets the connection before the client has read the
            # answer: a body up to a few times the limit is read and dropped, a larger one not
            if length <= 4 * self.app.max_upload:
                _discard(self.rfile, length)
            limit = self.app.max_upload / 2**20
            return self._error(f"the file is {length / 2**20:.1f} MB; the limit is {limit:g} MB",
                               413)  # fmt: skip
        try:
            if url.path == "/api/upload":
                name = parse_qs(url.query).get("name", ["upload"])[0][:200]
                return self._json({"upload": self.app.upload(name, length, self.rfile)})
            body = self.rfile.read(length)
            if url.path == "/api/jobs":
                try:
                    request = json.loads(body or b"{}")
                except ValueError:
                    return self._error("the request is not JSON")
                if not isinstance(request, dict):
                    return self._error("the request is not a JSON object")
                return self._json(self.app.submit(request).public())
            parts = [p for p in url.path.split("/") if p]
            if len(parts) == 4 and parts[:2] == ["api", "jobs"] and parts[3] == "cancel":
                job = self.app.queue.cancel(parts[2])
                return self._json(job.public()) if job else self._error("no such job", 404)
        except AvatarError as exc:
            self.close_connection = True  # the body may be unread
            return self._error(str(exc))
        except (TypeError, ValueError) as exc:
            return self._error(f"bad request: {exc}")
        self._error("not found", 404)


class _ServerV6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, app: App) -> ThreadingHTTPServer:
    """The server (IPv6 for an IPv6 address: `::1`, `::`); bound to a loopback address it
    answers only requests naming it."""
    server = (_ServerV6 if ":" in host else ThreadingHTTPServer)((host, port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    loopback = host in ("127.0.0.1", "localhost", "::1")
    names = (
        {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]")} if loopback else set()
    )
    server.RequestHandlerClass = type("BoundHandler", (Handler,),
                                      {"app": app, "hosts": frozenset(names)})  # fmt: skip
    return server


def _discard(stream, size: int, block: int = 2**20) -> None:
    while size > 0:
        chunk = stream.read(min(block, size))
        if not chunk:
            return
        size -= len(chunk)


def serve(host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 50.0,
          ready=print) -> None:  # fmt: skip
    """Run until interrupted; the temporary folder goes with it."""
    import signal
    import sys

    if threading.current_thread() is threading.main_thread():  # `kill` cleans up as Ctrl-C does
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = App(max_upload_mb)
    try:
        server = make_server(host, port, app)
    except OSError as exc:
        app.close()
        raise AvatarError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        shown = {"127.0.0.1": "localhost", "::1": "[::1]", "::": "[::]"}.get(
            host, f"[{host}]" if ":" in host else host
        )
        ready(f"avatar serve: http://{shown}:{server.server_address[1]}/ (Ctrl-C stops it)")
        ready(f"avatar serve: uploads and outputs in {app.root} (removed when it stops)")
        server.serve_forever()
    finally:
        server.server_close()
        app.close()
