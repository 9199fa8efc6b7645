"""The receiver's side of file-level copying: rsync through the tunnel, the checked command, the build."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from opensmc.agent import files, tunnel
from opensmc.chunkstore.staging import StagingIndex
from opensmc.receiver import filesystems
from opensmc.receiver.rsync import RsyncRefused, server_command
from tests.integration.test_receiver import TOKEN, Receiver

MiB = 1024 * 1024
VID = "v-d0.p0_1"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the receiver's rsync keeps owners: needs root")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "volumes", tmp_path / "store")
    StagingIndex.create(r.root / "v-d0.fidx", 64 * MiB, 16 * 1024).close()
    yield r
    r.stop()


def _rsync(
    r: Receiver, src: Path, *extra: str, token: str = TOKEN, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **(env_extra or {}),
        "PYTHONPATH": str(Path(tunnel.__file__).parents[2]),
        tunnel.ENV_URL: r.url,
        tunnel.ENV_TOKEN: token,
        tunnel.ENV_VOLUME: VID,
    }
    rsh = f"{sys.executable} -m opensmc.agent.tunnel"
    cmd = ["rsync", "-aHAXS", "--numeric-ids", "--delete-excluded", *extra, "-e", rsh, f"{src}/", "opensmc:tree"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@needs_root
def test_the_tunnel_holds_rsync_to_the_limit_and_follows_a_change_while_it_runs(
    receiver: Receiver, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(16 * MiB)
    (src / "big").write_bytes(data)
    limit = str(tmp_path / "limit")
    tunnel.write_limit(limit, 64 * 1024)  # 64 KiB/s: 16 MiB would take over four minutes
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(tunnel.__file__).parents[2]),
        tunnel.ENV_URL: receiver.url,
        tunnel.ENV_TOKEN: TOKEN,
        tunnel.ENV_VOLUME: VID,
        tunnel.ENV_LIMIT: limit,
    }
    rsh = f"{sys.executable} -m opensmc.agent.tunnel"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["rsync", "-aHAXS", "--numeric-ids", "-e", rsh, f"{src}/", "opensmc:tree"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        assert proc.poll() is None  # held to the limit (a lower bound: a slow machine only makes it later)
        tunnel.write_limit(limit, 0)  # the server lifted the limit: the running copy follows
        _out, err = proc.communicate(timeout=100)  # not ~250 s: the change applied while rsync ran
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - t0 >= 1.5
    assert (receiver.root / f"{VID}.tree" / "big").read_bytes() == data


@needs_root
def test_the_agent_passes_a_limit_change_to_its_running_copy(receiver: Receiver, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(16 * MiB)
    (src / "big").write_bytes(data)
    t0 = time.monotonic()
    seen: list[float] = []

    def limit() -> float:  # Mbit/s as the server says now: 0.5 (over four minutes for 16 MiB), then none
        seen.append(time.monotonic() - t0)
        return 0.5 if time.monotonic() - t0 < 1.5 else 0.0

    prep = files.Prepared({"device": "0_1", "volume_id": VID}, str(src), "/", {"size": 64 * MiB}, 16 * MiB)
    counts: list[tuple[int, int]] = []
    built = files.send(
        prep, receiver.url, TOKEN, files.FileOptions(), all_mounts=[], limit_mbit=limit,
        stopped=threading.Event(), progress=lambda n: None, build=lambda vid, spec: {"vid": vid},
        on_files=lambda checked, known: counts.append((checked, known)),
    )  # fmt: skip
    assert built["vid"] == VID and built["files_sent"] == 1
    assert counts and counts[-1] == (2, 2)  # rsync's own count: the root directory and the file
    assert max(seen) >= 1.5  # it was still copying when the limit was lifted, and then it finished
    assert (receiver.root / f"{VID}.tree" / "big").read_bytes() == data


@needs_root
def test_rsync_through_the_tunnel_then_incremental(receiver: Receiver, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(os.urandom(3 * MiB))  # several chunks each way
    (src / "b").write_text("bee\n")
    os.chown(src / "b", 123, 456)
    done = _rsync(receiver, src)
    assert done.returncode == 0, done.stderr
    tree = receiver.root / f"{VID}.tree"
    assert (tree / "d" / "a").read_bytes() == (src / "d" / "a").read_bytes()
    assert (tree / "b").stat().st_uid == 123 and (tree / "b").stat().st_gid == 456
    (src / "b").unlink()
    (src / "c").write_text("new\n")
    done = _rsync(receiver, src, "--out-format=SENT %n")
    assert done.returncode == 0, done.stderr
    assert not (tree / "b").exists() and (tree / "c").read_text() == "new\n"
    # the only file sent is the new one (the root directory may be listed too: its mtime changed)
    sent = [line for line in done.stdout.splitlines() if line.startswith("SENT") and not line.endswith("/")]
    assert sent == ["SENT c"], done.stdout


def test_tunnel_with_a_bad_token_is_refused(receiver: Receiver, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    done = _rsync(receiver, src, token="nope")
    assert done.returncode != 0
    assert "403" in done.stderr and "Auth.Denied" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "asked",
    [
        ["rsync", "--server", "--sender", "-logDtpre.iLsfxC", ".", "/etc"],  # read the receiver's files
        ["rsync", "--server", "-logDtprKe.iLsfxC", ".", "x"],  # keep-dirlinks: follow symlinks out of the tree
        ["rsync", "--server", "--backup-dir=/etc", "-a", ".", "x"],
        ["rsync", "--server", "--log-file=/etc/passwd", ".", "x"],
        ["rsync", "--server", "--bwlimit=1;id", ".", "x"],
        ["sh", "-c", "id", ".", "x"],
        ["rsync", "--server", "-a"],
        "rsync --server . x",
    ],
)
def test_only_a_checked_rsync_server_command_runs(asked: object, tmp_path: Path) -> None:
    with pytest.raises(RsyncRefused):
        server_command(asked, tmp_path)


def test_the_destination_is_always_the_partitions_tree(tmp_path: Path) -> None:
    asked = ["rsync", "--server", "-lHogDtpAXrxSe.iLsfxCIvu", "--delete-excluded", "--partial", ".", "/etc"]
    assert server_command(asked, tmp_path / "t") == [*asked[:-1], f"{tmp_path / 't'}/"]


def _post_build(r: Receiver, body: object) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=120)
    headers = {"Authorization": f"Bearer {TOKEN}", "X-OpenSMC-Protocol": "1", "Content-Type": "application/json"}
    conn.request("POST", f"/v1/volumes/{VID}/build", body=json.dumps(body), headers=headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


SPEC = {
    "fs_type": "ext4",
    "size": 32 * MiB,
    "uuid": "0b2c9f4e-1d4a-4c55-9b7e-2f6a1e0c3d11",
    "label": "rootfs",
    "block_size": 4096,
    "inode_size": 256,
    "features": ["has_journal", "ext_attr", "dir_index", "filetype", "extent", "flex_bg", "sparse_super",
                 "large_file", "huge_file", "dir_nlink", "extra_isize", "metadata_csum"],
}  # fmt: skip


def test_build_makes_the_filesystem_into_a_staging_index(receiver: Receiver, tmp_path: Path) -> None:
    tree = receiver.root / f"{VID}.tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("built\n")
    status, body = _post_build(receiver, SPEC)
    assert status == 200, body
    disk = StagingIndex.read_disk(receiver.root / f"{VID}.fidx")
    assert disk.size == SPEC["size"]
    image = bytearray(disk.size)
    for i in disk.nonzero():
        image[i * disk.chunk_size : (i + 1) * disk.chunk_size] = receiver.repo.get(bytes(disk.digests[i]))
    fs = tmp_path / "fs.img"
    fs.write_bytes(image)
    assert subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True).returncode == 0
    out = subprocess.run(["dumpe2fs", "-h", str(fs)], capture_output=True, text=True).stdout
    assert SPEC["uuid"] in out and "rootfs" in out
    assert (
        "built"
        in subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(fs)], capture_output=True, text=True).stdout
    )
    assert not list(receiver.root.glob(".*.img")), "the build's image file was left behind"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"fs_type": "xfs"}, "Build.Invalid"),
        ({"uuid": "not-a-uuid"}, "Build.Invalid"),
        ({"label": "x" * 17}, "Build.Invalid"),
        ({"features": ["has_journal", "encrypt"]}, "Build.UnsupportedFeature"),
        ({"features": ["-O evil"]}, "Build.Invalid"),
        ({"size": 2**70}, "Build.Invalid"),
    ],
)
def test_build_checks_every_field(receiver: Receiver, change: dict, code: str) -> None:
    (receiver.root / f"{VID}.tree").mkdir()
    status, body = _post_build(receiver, {**SPEC, **change})
    assert status == 400 and body["code"] == code, body


def test_build_of_files_that_do_not_fit_says_how_much_they_need(receiver: Receiver) -> None:
    tree = receiver.root / f"{VID}.tree"
    tree.mkdir()
    (tree / "big").write_bytes(os.urandom(40 * MiB))
    status, body = _post_build(receiver, SPEC)
    assert status == 400 and body["code"] == "Build.TooSmall", body
    assert "larger SizeBytes" in body["message"]


def test_tunnel_request_names_the_volume_and_the_command() -> None:
    os.environ[tunnel.ENV_VOLUME] = VID
    try:
        raw = tunnel._request("http://h:1/base", "tok", ["rsync", "--server", ".", "x"]).decode()
    finally:
        del os.environ[tunnel.ENV_VOLUME]
    assert raw.startswith(f"POST /base/v1/volumes/{VID}/rsync HTTP/1.1\r\n")
    args = next(line.split(": ", 1)[1] for line in raw.split("\r\n") if line.startswith("X-OpenSMC-Rsync-Args"))
    assert json.loads(base64.b64decode(args)) == ["rsync", "--server", ".", "x"]


def test_tunnel_request_asks_for_the_raw_stream_only_when_told() -> None:
    os.environ[tunnel.ENV_VOLUME] = VID
    try:
        chunked = tunnel._request("http://h:1", "tok", ["rsync", "--server", ".", "x"]).decode()
        raw = tunnel._request("http://h:1", "tok", ["rsync", "--server", ".", "x"], upgrade=True).decode()
    finally:
        del os.environ[tunnel.ENV_VOLUME]
    assert "Transfer-Encoding: chunked\r\n" in chunked and "Upgrade" not in chunked
    assert "Upgrade: opensmc-rsync\r\n" in raw and "Connection: Upgrade\r\n" in raw
    assert "Content-Length: 0\r\n" in raw and "chunked" not in raw


@needs_root
def test_over_plain_tcp_the_receiver_hands_its_socket_to_rsync(receiver: Receiver, tmp_path: Path) -> None:
    """101 Switching Protocols, then rsync's own protocol on the socket: its greeting is the first
    thing after the head (rsync --server speaks first: its protocol version, 4 bytes)."""
    os.environ[tunnel.ENV_VOLUME] = VID
    try:
        head = tunnel._request(receiver.url, TOKEN, ["rsync", "--server", "-logDtpre.iLsfxCIvu", ".", "tree"], True)
    finally:
        del os.environ[tunnel.ENV_VOLUME]
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            more = sock.recv(4096)
            assert more, answer
            answer += more
        status, _, rest = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 101 "), status
        assert b"upgrade: opensmc-rsync" in status.lower()
        while len(rest) < 4:
            more = sock.recv(4096)
            assert more, rest
            rest += more
        assert 27 <= int.from_bytes(rest[:4], "little") < 100  # rsync's protocol version (3.4 speaks 32)


def test_a_receiver_that_answers_the_upgrade_with_200_is_asked_again_chunked(tmp_path: Path) -> None:
    """An older receiver runs its rsync on the empty body and answers 200: the tunnel asks again."""
    heads: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ]

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(4096)
                heads.append(head)
                conn.sendall(answer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(tunnel.__file__).parents[2]),
        tunnel.ENV_URL: f"http://127.0.0.1:{port}",
        tunnel.ENV_TOKEN: TOKEN,
        tunnel.ENV_VOLUME: VID,
    }
    done = subprocess.run(
        [sys.executable, "-m", "opensmc.agent.tunnel", "opensmc", "rsync", "--server", ".", "tree"],
        input=b"", capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    server.join(10)
    listener.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello"
    assert len(heads) == 2
    assert b"Upgrade: opensmc-rsync" in heads[0] and b"chunked" in heads[1] and b"Upgrade" not in heads[1]


@needs_root
def test_rsync_through_the_tunnel_over_tls(tmp_path: Path) -> None:
    from tests.e2e.test_tls import make_cert

    cert, key = make_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    r = Receiver(tmp_path / "volumes", tmp_path / "store", ctx)
    try:
        StagingIndex.create(r.root / "v-d0.fidx", 64 * MiB, 16 * 1024).close()
        src = tmp_path / "src"
        src.mkdir()
        payload = os.urandom(5 * MiB)  # TLS records both ways, many of them
        (src / "big").write_bytes(payload)
        os.environ[tunnel.ENV_CA] = str(cert)
        try:
            done = _rsync(r, src)
        finally:
            del os.environ[tunnel.ENV_CA]
        assert done.returncode == 0, done.stderr
        assert (r.root / f"{VID}.tree" / "big").read_bytes() == payload
        (src / "big").write_bytes(payload[: 4 * MiB] + os.urandom(MiB))  # a delta both ways
        os.utime(src / "big", (1_700_000_000, 1_700_000_000))  # same size: the quick check needs another mtime
        done = _rsync(r, src, "--no-whole-file", env_extra={tunnel.ENV_CA: str(cert)})
        assert done.returncode == 0, done.stderr
        assert (r.root / f"{VID}.tree" / "big").read_bytes() == (src / "big").read_bytes()
    finally:
        r.stop()


# -- incremental builds: the last image patched ---------------------------------------------------------------


def _image(r: Receiver, tmp_path: Path, name: str) -> Path:
    """The filesystem the partition's staging index holds, as a file."""
    disk = StagingIndex.read_disk(r.root / f"{VID}.fidx")
    fs = tmp_path / name
    with fs.open("wb") as f:
        f.truncate(disk.size)
        for i in disk.nonzero():
            f.seek(i * disk.chunk_size)
            f.write(r.repo.get(bytes(disk.digests[i])))
    return fs


def _same_tree(fs: Path, src: Path) -> None:
    from tests.e2e.trees import compare, image_entries, source_entries

    fsck = subprocess.run(["e2fsck", "-fn", str(fs)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    problems = compare(source_entries(src), image_entries(fs), extra=())
    assert not problems, "\n".join(problems)


def _sync_and_build(r: Receiver, src: Path) -> dict:
    done = _rsync(r, src, "--delete")
    assert done.returncode == 0, done.stderr
    status, body = _post_build(r, {**SPEC, "size": 64 * MiB})
    assert status == 200, body
    filesystems._wait_kept(filesystems.Kept(r.root, VID))  # the image is kept by a thread, after the answer
    return body


@needs_root
def test_an_incremental_build_patches_the_last_image_with_every_kind_of_change(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "opensmc.receiver")
    from tests.e2e.test_file_level import _change_every_kind
    from tests.e2e.trees import make_root_tree

    src = tmp_path / "src"
    make_root_tree(src)
    for gone in ("proc", "tmp", "run", "var/cache", "swapfile"):  # the agent's excludes are not under test here
        p = src / gone
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    first = _sync_and_build(receiver, src)
    assert first["patched"] == 0
    assert (receiver.root / f"{VID}.img").exists() and not (receiver.root / f"{VID}.changes").exists()
    _same_tree(_image(receiver, tmp_path, "run1.fs"), src)
    _change_every_kind(src)
    second = _sync_and_build(receiver, src)
    assert second["patched"] == 1, caplog.text
    assert second["bytes"] < 4 * MiB, "more than the change was read again"
    stored = _image(receiver, tmp_path, "run2.fs")
    _same_tree(stored, src)
    # every block debugfs wrote went into the store: what it holds is the patched image, byte for byte
    assert stored.read_bytes() == (receiver.root / f"{VID}.img").read_bytes()
    assert not list(receiver.root.glob(f"{VID}.patching")) and not (receiver.root / f"{VID}.changes").exists()


def _small_tree(src: Path) -> None:
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_text("one\n")
    (src / "data").write_bytes(os.urandom(300_000))


@needs_root
@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        ("failed-rsync", "did not finish"),
        ("interrupted-patch", "patch of the last image was interrupted"),
        ("no-image", "missing"),
        ("corrupt-image", "debugfs"),
        ("socket", "socket"),
        ("other-size", "differs from the last build's"),
        ("rebooted", "rebooted"),
        ("other-index", "not the one the last image was recorded with"),
    ],
)
def test_an_incremental_build_it_cannot_patch_exactly_builds_it_all_again(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture, spoil: str, why: str
) -> None:
    """Anything the patch cannot do exactly, or a last image it cannot trust: the whole filesystem, loudly."""
    import json as json_mod
    import socket

    caplog.set_level(logging.INFO, "opensmc.receiver")
    src = tmp_path / "src"
    _small_tree(src)
    assert _sync_and_build(receiver, src)["patched"] == 0
    (src / "etc/hostname").write_text("two, longer\n")  # another size: the quick check sees it
    (src / "etc/added").write_text("added\n")
    img, size = receiver.root / f"{VID}.img", 64 * MiB
    if spoil == "failed-rsync":
        (receiver.root / f"{VID}.rsync-dirty").touch()  # what an rsync killed or failed leaves
    elif spoil == "interrupted-patch":
        (receiver.root / f"{VID}.patching").touch()  # what a patch killed (kill -9) leaves: the image half written
        with img.open("r+b") as f:
            f.seek(1024)
            f.write(os.urandom(4096))  # the superblock, half patched
    elif spoil == "no-image":
        img.unlink()
    elif spoil == "corrupt-image":
        with img.open("r+b") as f:
            f.seek(1024)
            f.write(bytes(1024))  # no superblock: debugfs cannot open it
    elif spoil == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(src / "etc/sock"))
        sock.close()
    elif spoil == "other-size":
        size = 48 * MiB
    elif spoil == "other-index":  # another build's index (another process's, or one cut short)
        StagingIndex.rewrite_without(receiver.root / f"{VID}.fidx", [0])
    elif spoil == "rebooted":
        state = receiver.root / f"{VID}.img.json"
        state.write_text(json_mod.dumps({**json_mod.loads(state.read_text()), "boot_id": "another boot"}))
    done = _rsync(receiver, src, "--delete")
    assert done.returncode == 0, done.stderr
    status, body = _post_build(receiver, {**SPEC, "size": size})
    assert status == 200 and body["patched"] == 0, body
    assert "built again, not patched" in caplog.text and why in caplog.text, caplog.text
    _same_tree(_image(receiver, tmp_path, "rebuilt.fs"), src)
    # and the next change patches again
    caplog.clear()
    (src / "etc/hostname").write_text("three\n")
    assert _sync_and_build(receiver, src)["patched"] == 1 or spoil == "other-size", caplog.text
    _same_tree(_image(receiver, tmp_path, "run3.fs"), src)


@needs_root
def test_a_change_log_it_cannot_read_builds_it_all_again(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "opensmc.receiver")
    src = tmp_path / "src"
    _small_tree(src)
    _sync_and_build(receiver, src)
    (src / "etc/hostname").write_text("two, longer\n")  # another size: the quick check sees it
    done = _rsync(receiver, src, "--delete")
    assert done.returncode == 0, done.stderr
    with (receiver.root / f"{VID}.changes").open("ab") as f:
        f.write(b"a line that is not rsync's\n")
    status, body = _post_build(receiver, {**SPEC, "size": 64 * MiB})
    assert status == 200 and body["patched"] == 0, body
    assert "cannot read" in caplog.text, caplog.text
    _same_tree(_image(receiver, tmp_path, "rebuilt.fs"), src)


def test_a_patch_never_reads_through_a_symlink_out_of_the_tree(tmp_path: Path) -> None:
    """A log naming ``a/secret`` when ``a`` is a symlink to a receiver directory now: refused, not read."""
    from opensmc.receiver.patch import CannotPatch, Item, plan

    tree, outside = tmp_path / "tree", tmp_path / "outside"
    tree.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("the receiver's\n")
    (tree / "a").symlink_to(outside)
    with pytest.raises(CannotPatch, match="symlink"):
        plan([Item(">f+++++++++", "a/secret")], tree, tmp_path, lambda dirs: {})
    with pytest.raises(CannotPatch):
        plan([Item(">f+++++++++", "../outside/secret")], tree, tmp_path, lambda dirs: {})


_BUILD_IN_A_PROCESS = """
import sys
from pathlib import Path
from opensmc.chunkstore.backend import LocalBackend
from opensmc.chunkstore.repository import Repository
from opensmc.receiver import filesystems
root, store, vid, spec = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
tree = root / (vid + ".tree")
filesystems.build(root, vid, tree, filesystems.FsSpec.parse(__import__("json").loads(spec)),
                  Repository(LocalBackend(store)), 16 * 1024)
"""


@needs_root
def test_a_build_killed_mid_patch_is_built_whole_next_time(
    receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 (SIGKILL) of the receiver after debugfs patched the kept image, before the index moved on."""
    caplog.set_level(logging.INFO, "opensmc.receiver")
    src = tmp_path / "src"
    _small_tree(src)
    _sync_and_build(receiver, src)
    before = (receiver.root / f"{VID}.fidx").read_bytes()
    (src / "etc/hostname").write_text("two, longer\n")
    (src / "etc/added").write_bytes(os.urandom(50_000))
    done = _rsync(receiver, src, "--delete")
    assert done.returncode == 0, done.stderr
    spec = json.dumps({**SPEC, "size": 64 * MiB})
    killed = subprocess.run(
        [sys.executable, "-c", _BUILD_IN_A_PROCESS, str(receiver.root), str(tmp_path / "store"), VID, spec],
        env={**os.environ, "OPENSMC_CRASH_AT": "build.patched"},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr
    assert (receiver.root / f"{VID}.patching").exists()
    assert (receiver.root / f"{VID}.fidx").read_bytes() == before, "the index moved on with the patch cut short"
    status, body = _post_build(receiver, {**SPEC, "size": 64 * MiB})
    assert status == 200 and body["patched"] == 0, body
    assert "patch of the last image was interrupted" in caplog.text, caplog.text
    _same_tree(_image(receiver, tmp_path, "after-kill.fs"), src)
    filesystems._wait_kept(filesystems.Kept(receiver.root, VID))
    (src / "etc/hostname").write_text("three\n")
    assert _sync_and_build(receiver, src)["patched"] == 1, caplog.text
    _same_tree(_image(receiver, tmp_path, "next.fs"), src)
