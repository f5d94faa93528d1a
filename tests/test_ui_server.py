"""The web UI's boundaries on loopback: Host/Origin check, the file route, the login, and `magicme ui`'s options."""

import os
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from magicme import ui_server  # noqa: E402
from magicme.ui_server import exposure_warning, file_refusal, host_policy, read_auth, refusal  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the rules


@pytest.mark.parametrize("bound, allow, host, origin, served", [
    ("127.0.0.1", [], "127.0.0.1:7860", None, True),
    ("127.0.0.1", [], "localhost:7860", "http://localhost:7860", True),
    ("127.0.0.1", [], "[::1]:7860", None, True),
    ("127.0.0.1", [], "attacker.example:7860", None, False),  # DNS rebinding: the attacker's name, our address
    ("127.0.0.1", [], None, None, False),
    ("127.0.0.1", [], "127.0.0.1:7860", "http://attacker.example", False),  # a web page driving the UI
    ("127.0.0.1", [], "127.0.0.1:7860", "http://localhost:8888", False),  # another local server's page
    ("127.0.0.1", [], "127.0.0.1:7860", "null", False),
    ("127.0.0.1", ["studio.lan"], "studio.lan:7860", "http://studio.lan:7860", True),
    ("127.0.0.1", ["studio.lan"], "STUDIO.LAN.:7860", None, True),
    ("127.0.0.1", ["proxy.example"], "127.0.0.1:7860", "https://proxy.example", True),  # a reverse proxy's page
    ("127.0.0.1", ["proxy.example"], "127.0.0.1:7860", "http://localhost:8888", False),
    ("0.0.0.0", [], "192.168.1.20:7860", "http://192.168.1.20:7860", True),  # every interface: its addresses
    ("0.0.0.0", [], "evil.example:7860", None, False),
    ("0.0.0.0", ["*"], "evil.example:7860", "http://other.example", True),  # the user turned the check off
])
def test_host_and_origin_rules(bound, allow, host, origin, served):
    assert (refusal(host, origin, host_policy(bound, allow)) is None) == served


def test_only_files_in_the_served_roots_pass(tmp_path):
    root = tmp_path / "cache"
    (root / "ab").mkdir(parents=True)
    roots = [str(root)]
    assert file_refusal(f"/gradio_api/file={root}/ab/clip.mp4", roots) is None
    assert file_refusal(f"/gradio_api/file/{root}/ab/clip.mp4", roots) is None
    assert file_refusal("/gradio_api/queue/join", roots) is None  # not a file route
    for path in (f"/gradio_api/file={root}/../secret", "/gradio_api/file=/etc/passwd", "/gradio_api/file/etc/passwd",
                 "/gradio_api/file=http://example.com/x.png", "/gradio_api/proxy=http://127.0.0.1:22/"):
        assert file_refusal(path, roots) is not None, path
    link = root / "ab" / "link"
    link.symlink_to("/etc/passwd")
    assert file_refusal(f"/gradio_api/file={link}", roots) is not None


# ---- on loopback


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from magicme import ui

    home = tmp_path_factory.mktemp("home")  # `--work-dir ~`: a user's folder with secrets in it
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    app = ui.build_app(home, device="cpu")
    port = free_port()
    ui.launch(app, "127.0.0.1", port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}", port, home, app
    app.close()


def test_loopback_serves_its_page_and_refuses_foreign_hosts_and_origins(server):
    url, port, _, _ = server
    assert httpx.get(url + "/").status_code == 200
    assert httpx.get(url + "/", headers={"Host": f"localhost:{port}"}).status_code == 200
    rebound = httpx.get(url + "/", headers={"Host": f"attacker.example:{port}"})
    assert rebound.status_code == 403 and "--allow-host" in rebound.text
    cross = httpx.post(url + "/gradio_api/queue/join", json={}, headers={"Origin": "http://attacker.example"})
    assert cross.status_code == 403
    assert httpx.get(url + "/gradio_api/info", headers={"Origin": "null"}).status_code == 403


def test_file_route_serves_no_file_of_the_work_folder_or_the_machine(server):
    from gradio.utils import get_upload_folder

    url, _, home, app = server
    for path in (home / ".ssh" / "id_rsa", app.magicme_files / ".magicme-ui", Path("/etc/passwd")):
        for form in ("file=", "file/"):
            r = httpx.get(f"{url}/gradio_api/{form}{path}")
            assert r.status_code == 403 and "PRIVATE" not in r.text, (form, path)
    copy = Path(get_upload_folder()) / "magicme-test" / "clip.txt"  # where Gradio keeps what the UI hands it
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text("made by the UI")
    try:
        assert httpx.get(f"{url}/gradio_api/file={copy}").text == "made by the UI"
    finally:
        copy.unlink()


def test_login_is_required_when_auth_is_given(tmp_path):
    from magicme import ui

    app = ui.build_app(tmp_path / "w", device="cpu")
    port = free_port()
    ui.launch(app, "127.0.0.1", port, block=False, quiet=True, auth=[("ann", "s3cret-pass")])
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/config").status_code == 401
        with httpx.Client(base_url=url) as client:
            assert client.post("/login", data={"username": "ann", "password": "wrong"}).status_code == 400
            assert client.post("/login", data={"username": "ann", "password": "s3cret-pass"}).status_code == 200
            assert client.get("/config").status_code == 200
    finally:
        app.close()


# ---- logins and the command


def test_logins_come_from_flags_a_file_and_the_environment(tmp_path):
    assert read_auth() is None
    file = tmp_path / "logins"
    file.write_text("# team\nann:pa:ss:word\n\n  bob:hunter22\n")
    os.chmod(file, 0o600)
    assert read_auth(["cli:pw"], str(file), "env:one,env2:two") == [
        ("cli", "pw"), ("env", "one"), ("env2", "two"), ("ann", "pa:ss:word"), ("bob", "hunter22")]
    file.write_text("carol\n")
    with pytest.raises(ValueError, match=r"line 1: expected USER:PASSWORD") as e:
        read_auth(None, str(file))
    assert "carol" not in str(e.value)
    with pytest.raises(ValueError, match="--auth: expected USER:PASSWORD") as e:
        read_auth(["dave:"])
    with pytest.raises(FileNotFoundError, match="--auth-file"):
        read_auth(None, str(tmp_path / "missing"))


def test_exposure_warning_says_what_is_open_and_what_to_do():
    assert exposure_warning("127.0.0.1", 7860, None) is None
    bare = exposure_warning("0.0.0.0", 7860, None)
    assert bare.startswith("WARNING: --host 0.0.0.0") and "--auth" in bare and "anyone" in bare
    assert "unencrypted" in exposure_warning("0.0.0.0", 7860, [("a", "b")])


def test_cli_ui_warns_loudly_and_passes_logins_hosts_and_mode(monkeypatch, tmp_path, capsys):
    from magicme.cli import main

    calls = []
    monkeypatch.setattr(ui_server, "launch", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("MAGICME_UI_AUTH", "ann:from-env")
    assert main(["ui", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--port" in err[0] and calls == []
    assert main(["ui", "--host", "0.0.0.0", "--port", "7999", "--work-dir", str(tmp_path / "w"), "--allow-host", "box.lan", "--shared"]) == 0
    (app, kw), = calls
    assert app.magicme_files == (tmp_path / "w" / "workspaces").resolve()
    assert (kw["host"], kw["port"], kw["auth"], kw["allow_hosts"], kw["quiet"]) == ("0.0.0.0", 7999, [("ann", "from-env")], ["box.lan"], True)
    out = capsys.readouterr()
    assert "WARNING: --host 0.0.0.0" in out.err and "http://0.0.0.0:7999" in out.out and "one workspace for everyone" in out.out
    monkeypatch.delenv("MAGICME_UI_AUTH")
    assert main(["ui", "--auth", "nocolon", "--work-dir", str(tmp_path / "w")]) == 2
    assert "nocolon" not in capsys.readouterr().err
    home = tmp_path / "home"
    (home / "workspaces").mkdir(parents=True)
    (home / "workspaces" / "taxes.pdf").write_text("x")
    assert main(["ui", "--work-dir", str(home)]) == 2
    assert "not made by magicme ui" in capsys.readouterr().err
