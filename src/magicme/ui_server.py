"""`magicme ui`'s server and its boundaries: who may reach it, what it serves, and the login.

- Host/Origin check (against DNS rebinding and cross-site requests): a request must name this server
  by an address it was bound to, a loopback name or a host the user allowed (`--allow-host`), and a
  browser's `Origin` must be this same server. Anything else gets 403 before Gradio sees it.
- File route: `/gradio_api/file=` serves only Gradio's own upload/cache folder, where Gradio keeps the
  uploads and the copies of what the UI's handlers returned; never a path in the work folder or
  elsewhere, so one browser cannot fetch another's files by name.
- Login: Gradio's `auth` from `--auth USER:PASSWORD`, `--auth-file FILE` or `MAGICME_UI_AUTH`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")
DEFAULT_PORT = 7860
AUTH_ENV = "MAGICME_UI_AUTH"
_FILE_ROUTE = re.compile(r"/gradio_api/(file=|file/|proxy=)(.*)$", re.DOTALL)
CSS = """
.mm-status { padding: 2px 0; }
.mm-error { color: var(--error-text-color, #b91c1c); font-weight: 600; padding: 2px 0; }
.mm-warning { background: #fff7d6; border: 1px solid #e0b400; color: #5c4400; border-radius: 6px; padding: 6px 10px; }
"""


@dataclass(frozen=True)
class HostPolicy:
    """Which names may appear in a request's Host (and a browser's Origin)."""

    names: frozenset[str]
    allowed: frozenset[str] = frozenset()  # the user's --allow-host names: also accepted as a page's Origin behind a proxy
    any_ip: bool = False  # bound to every interface: any IP literal (a rebinding attack needs a DNS name)
    off: bool = False  # --allow-host '*': behind a proxy that checks hosts itself

    def allows(self, name: str | None) -> bool:
        if self.off:
            return True
        if not name:
            return False
        name = name.lower().rstrip(".")
        if name in self.names:
            return True
        if self.any_ip:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False


def host_policy(host: str, allow: list[str] | tuple[str, ...] = ()) -> HostPolicy:
    """The names a server bound to `host` answers to: loopback, `host` itself, and `allow`; every IP and this machine's names when bound to all interfaces."""
    extra = {a.strip().lower().strip("[]").rstrip(".") for a in allow if a and a.strip()}
    names = {*LOOPBACK, host.lower().strip("[]"), *extra} - {"*"}
    wildcard = host in WILDCARD
    if wildcard:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return HostPolicy(frozenset(names), frozenset(extra - {"*"}), any_ip=wildcard, off="*" in extra)


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None


def refusal(host: str | None, origin: str | None, policy: HostPolicy) -> str | None:
    """Why a request with these Host and Origin headers is refused, or None to serve it."""
    if policy.off:
        return None
    if not host or not policy.allows(_hostname(host)):
        return f"Host {host!r} is not an address of this server (start magicme ui with --allow-host NAME to use that name)"
    if origin is not None:
        parts = urlsplit(origin) if origin != "null" else None
        same = parts is not None and parts.netloc.lower() == host.lower()
        if parts is None or not policy.allows(parts.hostname) or not (same or parts.hostname in policy.allowed):
            return f"requests from {origin!r} are refused: only this server's own page may use it"
    return None


def file_refusal(path: str, roots: list[str]) -> str | None:
    """Why a request for a file is refused (None for other routes): only files inside `roots` are served.

    Gradio serves files at `/gradio_api/file=PATH` and `/gradio_api/file/PATH` (relative to the current
    folder), and fetches remote ones at `/gradio_api/proxy=URL`; the UI needs only the first two, inside `roots`.
    """
    m = _FILE_ROUTE.search(path)
    if m is None:
        return None
    target = m.group(2)
    if m.group(1) == "proxy=" or "://" in target:
        return "remote files are not served"
    real = os.path.realpath(target)
    if any(real == root or real.startswith(root + os.sep) for root in roots):
        return None
    return "not a file this UI made"


class HostGuard:
    """ASGI middleware applying `refusal` and `file_refusal` before the app sees a request."""

    def __init__(self, app, policy: HostPolicy, file_roots: list[str]):
        self.app = app
        self.policy = policy
        self.file_roots = [os.path.realpath(r) for r in file_roots]

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            why = refusal(headers.get("host"), headers.get("origin"), self.policy)
            if why is None and scope["type"] == "http":
                why = file_refusal(scope.get("path", ""), self.file_roots)
            if why is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                from starlette.responses import PlainTextResponse

                await PlainTextResponse(why, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def read_auth(values: list[str] | None = None, file: str | None = None, env: str | None = None) -> list[tuple[str, str]] | None:
    """Logins from `--auth USER:PASSWORD` (repeatable), `--auth-file FILE` (one per line, # comments) and the env var (comma-separated).

    Errors name the source and line, never the password.
    """
    entries: list[tuple[str, str]] = []
    for value in values or []:
        entries.append(("--auth", value))
    if env:
        entries += [(AUTH_ENV, part) for part in env.split(",") if part.strip()]
    if file:
        path = Path(file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise FileNotFoundError(f"--auth-file {file!r} cannot be read ({type(e).__name__})") from None
        if path.stat().st_mode & 0o077:
            print(f"warning: --auth-file {file!r} can be read by other users of this machine (chmod 600 it)", file=sys.stderr)
        entries += [(f"--auth-file {file!r} line {i}", line.strip()) for i, line in enumerate(lines, 1)
                    if line.strip() and not line.lstrip().startswith("#")]
    logins = []
    for source, value in entries:
        user, sep, password = value.partition(":")
        if not sep or not user.strip() or not password:
            raise ValueError(f"{source}: expected USER:PASSWORD with both parts non-empty")
        logins.append((user.strip(), password))
    return logins or None


def exposure_warning(host: str, port: int, auth) -> str | None:
    """What binding to a non-loopback address exposes; None on loopback."""
    if host in LOOPBACK:
        return None
    lines = [f"WARNING: --host {host} lets other machines reach magicme ui on port {port}."]
    if not auth:
        lines.append("  With no login, anyone who reaches that port can run jobs on this machine's GPU and see,"
                     f" download and replace what the UI keeps. Add --auth USER:PASSWORD (or --auth-file FILE, or {AUTH_ENV}).")
    else:
        lines.append("  Logins and pages travel unencrypted (plain HTTP): use it on a network you trust, or behind an HTTPS proxy.")
    return "\n".join(lines)


def check_server_args(host: str, port: int) -> None:
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"--host must be an address such as 127.0.0.1, got {host!r}")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port!r}")


def launch(app, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, block: bool = True, quiet: bool = False,
           auth: list[tuple[str, str]] | None = None, allow_hosts: list[str] | tuple[str, ...] = ()):
    """Serve `app` (from `ui.build_app`) on host:port behind `HostGuard`, with nothing reaching the network."""
    import gradio as gr
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    check_server_args(host, port)
    guard = Middleware(HostGuard, policy=host_policy(host, allow_hosts), file_roots=[get_upload_folder()])
    app.queue(default_concurrency_limit=1)
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        allowed_paths=[str(app.magicme_files)],  # lets Gradio copy the UI's outputs into its cache; HostGuard serves only that cache
        max_file_size=max(app.magicme_limits.max_bytes, app.magicme_limits.max_lora_bytes),  # LoRAs are large; photos are checked for size first
        ssr_mode=False,
        quiet=quiet,
        footer_links=[],
        show_error=False,  # every failure is already a line on the page (ui_handlers.guarded)
        auth=auth,
        app_kwargs={"middleware": [guard]},
        enable_monitoring=False,
        run_history=False,
        mcp_server=False,
        pwa=False,
        css=CSS,
        # the default theme's Source Sans comes from Google Fonts (offline here: only a stub subset ships), so system fonts
        theme=gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]),
    )


def serve(workdir: str | Path = "magicme-ui", host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None,
          *, auth: list[tuple[str, str]] | None = None, allow_hosts: list[str] | tuple[str, ...] = (), shared: bool = False) -> None:
    """`magicme ui`: check the arguments, build the app over `workdir` and serve it until interrupted."""
    from . import ui

    check_server_args(host, port)
    app = ui.build_app(workdir, device=device, shared=shared)
    warning = exposure_warning(host, port, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    shown = f"[{host}]" if ":" in host else host
    mode = "one workspace for everyone" if shared else ("one workspace per login" if auth else "one workspace per browser")
    print(f"magicme ui on http://{shown}:{port} ({mode}, kept in {app.magicme_files}); Ctrl-C stops it", flush=True)
    launch(app, host=host, port=port, quiet=True, auth=auth, allow_hosts=allow_hosts)
