"""Output paths checked before any work, atomic writes with normal permissions, and a loader
that rejects empty, truncated, garbage, foreign, newer or self-contradicting files with one
line naming the file (directly and through ``eva inspect``)."""
from __future__ import annotations

import copy
import errno
import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from eva.errors import EvaError

D0, D1 = 6, 4


def _fileio():
    """Imported per test so each test fails on its own when the module is missing."""
    import eva.fileio
    return eva.fileio


def _layers(tensors):
    return {name: {"rank": int(t.shape[0]), "in_features": int(t.shape[1]),
                   "explained_variance_ratio": [0.5, 0.25, 0.125][: max(int(t.shape[0]), 1)],
                   "tokens": 40, "steps": 3, "converged": True, "min_cosine": None}
            for name, t in tensors.items()}


def make_result():
    """A hand-built result shaped like the engine's, with a rank-0 layer, in non-sorted order."""
    from eva.result import EvaStateDict
    g = torch.Generator().manual_seed(0)
    tensors = {
        "h.1.attn.c_attn": torch.randn(3, D0, generator=g),
        "h.0.mlp.c_fc": torch.zeros(0, D1),  # rank 0: stored as an empty (0, d) tensor
        "h.0.attn.c_attn": torch.randn(2, D0, generator=g),
    }
    meta = {
        "format": "eva-kernels/1",
        "order": list(tensors),
        "settings": {"r": 2, "rho": 2.0, "tau": 0.99},
        "layers": _layers(tensors),
        "groups": [[n] for n in tensors],
        "run": {"steps": 3, "stop_reason": "max_steps", "rank_budget": 6, "seconds": 0.5},
    }
    return EvaStateDict(tensors, metadata=meta)


def write_raw(path, tensors, meta):
    """A file the way the previous ``save`` wrote it (plain ``save_file``); ``meta`` str = verbatim."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"eva_metadata": text})
    return path


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def good_file(tmp_path, umask022):
    path = tmp_path / "good.safetensors"
    make_result().save(str(path))
    return path


def one_line(msg: str):
    assert "\n" not in msg and msg.strip() == msg, repr(msg)


# ----------------------------------------------------------------- check_output_path

def test_check_output_path_returns_absolute_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _fileio().check_output_path("sub/dir/out.safetensors", "--out") == str(tmp_path / "sub/dir/out.safetensors")
    assert os.listdir(tmp_path) == []  # no parent dirs made, no probe file left behind


def test_check_output_path_leaves_existing_target_alone(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous result")
    before = os.stat(target)
    assert _fileio().check_output_path(str(target), "--out") == str(target)
    after = os.stat(target)
    assert target.read_bytes() == b"previous result"
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_check_output_path_rejects_a_directory(tmp_path):
    with pytest.raises(EvaError) as info:
        _fileio().check_output_path(str(tmp_path), "--out")
    msg = str(info.value)
    one_line(msg)
    assert msg.startswith(f"--out {str(tmp_path)!r}: ") and "directory" in msg and "file name" in msg


def test_check_output_path_rejects_a_file_as_path_component(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    path = str(tmp_path / "notes.txt" / "deeper" / "out.safetensors")
    with pytest.raises(EvaError) as info:
        _fileio().check_output_path(path, "--out")
    msg = str(info.value)
    one_line(msg)
    assert msg.startswith(f"--out {path!r}: ") and "notes.txt" in msg and "not a directory" in msg
    assert (tmp_path / "notes.txt").read_text() == "x"


def test_check_output_path_rejects_non_regular_target():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(EvaError) as info:
        _fileio().check_output_path("/dev/null", "--out")
    assert str(info.value).startswith("--out '/dev/null': ") and "not a regular file" in str(info.value)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("path", ["/sys/eva_state_dict.safetensors", "/proc/eva/sub/eva_state_dict.safetensors"])
def test_check_output_path_unwritable_real_directory(path):
    """Real directories nobody (root included) can create files in: permission bits are not used."""
    top = "/" + path.split("/")[1]
    if not os.path.isdir(top):
        pytest.skip(f"no {top}")
    try:  # if this system lets us create files there, the case cannot be shown here
        probe = os.path.join(top, ".eva-test-probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.unlink(probe)
        pytest.skip(f"{top} is writable here")
    except OSError:
        pass
    with pytest.raises(EvaError) as info:
        _fileio().check_output_path(path, "--out")
    msg = str(info.value)
    one_line(msg)
    assert msg.startswith(f"--out {path!r}: cannot create files in {top!r}")
    assert not os.path.exists(path)


def _fail_open_for(monkeypatch, marker: str, code: int):
    """Make ``os.open`` of names containing ``marker`` fail with ``code``, as a read-only FS would."""
    real_open = os.open

    def fake_open(p, flags, *args, **kwargs):
        if marker in os.fspath(p):
            raise OSError(code, os.strerror(code), os.fspath(p))
        return real_open(p, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", fake_open)


def test_check_output_path_read_only_file_system(tmp_path, monkeypatch):
    fileio = _fileio()
    path = str(tmp_path / "out.safetensors")
    _fail_open_for(monkeypatch, ".eva-probe-", errno.EROFS)
    with pytest.raises(EvaError) as info:
        fileio.check_output_path(path, "--out")
    msg = str(info.value)
    one_line(msg)
    assert msg.startswith(f"--out {path!r}: ") and "read-only" in msg and "writable file system" in msg


def test_check_output_path_probes_instead_of_trusting_access(tmp_path, monkeypatch):
    """``os.access`` says yes (as for root); the probe's EACCES still stops the run."""
    fileio = _fileio()
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    _fail_open_for(monkeypatch, ".eva-probe-", errno.EACCES)
    with pytest.raises(EvaError, match="no permission"):
        fileio.check_output_path(str(tmp_path / "x.safetensors"), "--out")


def test_check_output_path_name_too_long(tmp_path):
    path = str(tmp_path / ("x" * 300 + ".safetensors"))
    with pytest.raises(EvaError, match="longer than"):
        _fileio().check_output_path(path, "--out")


# ----------------------------------------------------------------- atomic_write

def test_atomic_write_disk_full_keeps_existing_file(tmp_path):
    target = tmp_path / "eva.safetensors"
    old = os.urandom(4096)
    target.write_bytes(old)
    seen = []

    def writer(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"half of the new file")
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    with pytest.raises(EvaError) as info:
        _fileio().atomic_write(str(target), writer)
    msg = str(info.value)
    one_line(msg)
    assert str(target) in msg and "No space left on device" in msg and "ENOSPC" in msg
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert target.read_bytes() == old  # byte for byte
    assert os.listdir(tmp_path) == ["eva.safetensors"]  # the temporary is gone
    assert os.path.dirname(seen[0]) == str(tmp_path) and seen[0].endswith(".safetensors")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("writer bug")])
def test_atomic_write_other_exceptions_propagate_unchanged(tmp_path, exc):
    target = tmp_path / "r.png"
    target.write_bytes(b"old plot")

    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise exc

    with pytest.raises(type(exc)):
        _fileio().atomic_write(str(target), writer)
    assert target.read_bytes() == b"old plot"
    assert os.listdir(tmp_path) == ["r.png"]


def test_atomic_write_read_only_at_write_time(tmp_path, monkeypatch):
    """The file system went read-only between the check and the write."""
    fileio = _fileio()
    target = tmp_path / "eva.safetensors"
    target.write_bytes(b"keep me")
    _fail_open_for(monkeypatch, ".tmp", errno.EROFS)
    with pytest.raises(EvaError, match="read-only"):
        fileio.atomic_write(str(target), lambda tmp: open(tmp, "wb").close())
    assert target.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["eva.safetensors"]


def test_atomic_write_creates_parents_and_returns_path(tmp_path):
    target = str(tmp_path / "a" / "b" / "out.bin")
    assert _fileio().atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new")) == target
    assert open(target, "rb").read() == b"new"
    assert os.listdir(tmp_path / "a" / "b") == ["out.bin"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_permissions_follow_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        target = tmp_path / "out.safetensors"
        _fileio().atomic_write(str(target), lambda tmp: open(tmp, "wb").write(b"x"))
        with open(tmp_path / "reference", "w") as f:  # what a plain open() gives, for comparison
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target).st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "reference").st_mode) == mode


def test_atomic_write_keeps_mode_of_existing_file(tmp_path, umask022):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    _fileio().atomic_write(str(target), lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_atomic_write_through_symlink_keeps_link(tmp_path):
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    _fileio().atomic_write(str(link), lambda tmp: open(tmp, "wb").write(b"new"))
    assert link.is_symlink() and real.read_bytes() == b"new"


# ----------------------------------------------------------------- save / plot through atomic_write

def test_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    """ENOSPC reported at fsync (delayed allocation): the previous result survives untouched."""
    fileio = _fileio()
    target = tmp_path / "eva.safetensors"
    make_result().save(str(target))
    old = target.read_bytes()

    def full(path, directory=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(fileio, "_fsync_path", full)
    sd = make_result()
    sd["h.0.attn.c_attn"] = sd["h.0.attn.c_attn"] * 2
    with pytest.raises(EvaError, match="No space left"):
        sd.save(str(target))
    assert target.read_bytes() == old
    assert os.listdir(tmp_path) == ["eva.safetensors"]


def test_save_to_directory_is_an_eva_error(tmp_path):
    with pytest.raises(EvaError) as info:
        make_result().save(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_save_permissions(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            path = tmp_path / f"u{umask:o}.safetensors"
            make_result().save(str(path))
        finally:
            os.umask(old)
        assert stat.S_IMODE(os.stat(path).st_mode) == mode


def test_save_refuses_non_2d_and_foreign_format(tmp_path):
    sd = make_result()
    sd["bad"] = torch.zeros(3)
    with pytest.raises(EvaError, match="2-D"):
        sd.save(str(tmp_path / "a.safetensors"))
    sd = make_result()
    sd.metadata["format"] = "something/9"
    with pytest.raises(EvaError, match="something/9"):
        sd.save(str(tmp_path / "b.safetensors"))
    assert os.listdir(tmp_path) == []


def test_check_plot_path_formats(tmp_path):
    from eva.cli.plot import check_plot_path
    path = str(tmp_path / "x.weird")
    with pytest.raises(EvaError) as info:
        check_plot_path(path)
    msg = str(info.value)
    one_line(msg)
    assert msg.startswith(f"plot path {path!r}: format '.weird' is not supported; use one of .png, .pdf, .svg")
    with pytest.raises(EvaError, match="no extension"):
        check_plot_path(str(tmp_path / "ranks"))
    with pytest.raises(EvaError, match="is a directory"):
        check_plot_path(str(tmp_path))
    for ext in ("png", "PDF", "svg"):
        assert check_plot_path(str(tmp_path / "p" / f"r.{ext}")) == str(tmp_path / "p" / f"r.{ext}")
    assert os.listdir(tmp_path) == []


def test_check_plot_path_read_only(tmp_path, monkeypatch):
    from eva.cli.plot import check_plot_path
    _fail_open_for(monkeypatch, ".eva-probe-", errno.EROFS)
    with pytest.raises(EvaError, match=r"^plot path .*read-only"):
        check_plot_path(str(tmp_path / "r.png"))


def test_plot_ranks_other_formats_and_bad_extension(tmp_path, umask022):
    from eva.cli.plot import plot_ranks
    ranks = {"layer.0.q": 2, "layer.1.q": 0}
    svg = tmp_path / "r.svg"
    assert plot_ranks(ranks, str(svg)) == str(svg)
    assert b"<svg" in svg.read_bytes()[:2000]
    assert stat.S_IMODE(os.stat(svg).st_mode) == 0o644
    with pytest.raises(EvaError, match="'.weird' is not supported"):
        plot_ranks(ranks, str(tmp_path / "r.weird"))
    assert sorted(os.listdir(tmp_path)) == ["r.svg"]


def test_plot_ranks_failure_keeps_previous_plot(tmp_path, monkeypatch):
    import matplotlib.figure

    from eva.cli.plot import plot_ranks
    png = tmp_path / "r.png"
    png.write_bytes(b"previous plot")

    def broken(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), fname)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(EvaError, match="No space left"):
        plot_ranks({"layer.0.q": 2}, str(png))
    assert png.read_bytes() == b"previous plot" and os.listdir(tmp_path) == ["r.png"]


# ----------------------------------------------------------------- round trip

def test_format_constant():
    from eva.result import FORMAT
    assert FORMAT == "eva-kernels/1"


def test_round_trip_with_rank0_layer(good_file):
    from eva.result import EvaStateDict, load_eva_state_dict
    sd = make_result()
    back = load_eva_state_dict(str(good_file))
    assert isinstance(back, EvaStateDict)
    assert list(back) == list(sd) == back.metadata["order"]  # not alphabetical: order kept
    assert back.metadata == sd.metadata
    for name in sd:
        assert back[name].dtype == torch.float32 and torch.equal(back[name], sd[name])
    assert back.ranks == {"h.1.attn.c_attn": 3, "h.0.mlp.c_fc": 0, "h.0.attn.c_attn": 2}
    assert back["h.0.mlp.c_fc"].shape == (0, D1)
    assert stat.S_IMODE(os.stat(good_file).st_mode) == 0o644
    assert "h.0.mlp.c_fc" in back.summary()
    assert load_eva_state_dict(str(good_file), device="cpu")["h.1.attn.c_attn"].device.type == "cpu"


def test_save_keeps_metadata_in_line_with_edited_tensors(tmp_path):
    from eva.result import load_eva_state_dict
    sd = make_result()
    sd["h.0.attn.c_attn"] = sd["h.0.attn.c_attn"][:0]  # the user drops a layer's components
    path = str(tmp_path / "edited.safetensors")
    before = copy.deepcopy(sd.metadata)
    sd.save(path)
    back = load_eva_state_dict(path)
    assert back.metadata["layers"]["h.0.attn.c_attn"]["rank"] == 0 == back.ranks["h.0.attn.c_attn"]
    assert sd.metadata == before  # the in-memory metadata is not modified by save


def test_previous_writer_files_still_load(tmp_path):
    """``save_file`` with the same marker, as the previous ``save`` wrote it."""
    from eva.result import load_eva_state_dict
    sd = make_result()
    path = write_raw(tmp_path / "old.safetensors", dict(sd), sd.metadata)
    back = load_eva_state_dict(str(path))
    assert list(back) == list(sd) and back.metadata == sd.metadata


def test_file_without_format_marker_is_accepted_and_restamped(tmp_path):
    """Decision: accepted. The previous ``save`` wrote hand-built metadata verbatim (often no
    marker at all); the ``eva_metadata`` header entry already marks the file as ours and every
    structural check still applies. Saving it again stamps the marker."""
    from eva.result import FORMAT, EvaStateDict, load_eva_state_dict
    sd = make_result()
    meta = {k: v for k, v in sd.metadata.items() if k != "format"}
    path = write_raw(tmp_path / "nomarker.safetensors", dict(sd), meta)
    back = load_eva_state_dict(str(path))
    assert list(back) == list(sd) and "format" not in back.metadata
    again = str(tmp_path / "again.safetensors")
    back.save(again)
    assert load_eva_state_dict(again).metadata["format"] == FORMAT
    # the bare minimum the old save wrote for EvaStateDict(tensors).save(p): metadata {}
    bare = write_raw(tmp_path / "bare.safetensors", {"b": torch.ones(1, 2), "a": torch.zeros(2, 2)}, {})
    assert sorted(load_eva_state_dict(str(bare)).ranks.items()) == [("a", 2), ("b", 1)]
    EvaStateDict({"x": torch.ones(1, 3)}).save(again)
    assert load_eva_state_dict(again).metadata == {"format": FORMAT, "order": ["x"]}


# ----------------------------------------------------------------- corrupt files

def _meta_with(**changes):
    sd = make_result()
    meta = json.loads(json.dumps(sd.metadata))
    for key, value in changes.items():
        meta[key] = value
    return dict(sd), meta


def _case(name, tmp_path, good):
    """Build corrupt case ``name``; returns (path, fragment the message must contain)."""
    p = tmp_path / f"{name}.safetensors"
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    if name == "missing":
        return p, "no such file"
    if name == "directory":
        p.mkdir()
        return p, "is a directory"
    if name == "empty":
        p.write_bytes(b"")
        return p, "empty"
    if name.startswith("truncated"):
        cut = {"truncated_1": 1, "truncated_7": 7, "truncated_8": 8, "truncated_20": 20,
               "truncated_header": header_end - 1, "truncated_at_data": header_end,
               "truncated_data": header_end + 5, "truncated_last": len(data) - 1}[name]
        p.write_bytes(data[:cut])
        return p, "truncated" if cut >= 8 else "too short"
    if name == "trailing":
        p.write_bytes(data + b"junk")
        return p, "unexpected byte"
    if name == "random":
        p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).tolist()))
        return p, "not a safetensors file"
    if name == "text":
        p.write_text("layer,rank\nq,4\n" * 20)
        return p, "not a safetensors file"
    if name == "header_not_json":
        p.write_bytes((16).to_bytes(8, "little") + b"\x00garbage-garbage" + b"\x00" * 32)
        return p, "not JSON"
    if name == "foreign":
        save_file({"wte.weight": torch.zeros(5, 3), "wpe.weight": torch.zeros(2, 3)}, str(p))
        return p, "is not an EVA file"
    if name == "foreign_with_other_metadata":
        save_file({"wte.weight": torch.zeros(5, 3)}, str(p), metadata={"format": "pt"})
        return p, "is not an EVA file"
    tensors, meta = _meta_with()
    if name == "wrong_marker":
        meta["format"] = "peft/1"
        return write_raw(p, tensors, meta), "'peft/1'"
    if name == "marker_not_string":
        meta["format"] = 1
        return write_raw(p, tensors, meta), "format marker 1"
    if name == "newer_version":
        meta["format"] = "eva-kernels/2"
        return write_raw(p, tensors, meta), "written by a newer eva-kernels (format eva-kernels/2)"
    if name == "older_version":
        meta["format"] = "eva-kernels/0"
        return write_raw(p, tensors, meta), "eva-kernels/0"
    if name == "json_garbage":
        return write_raw(p, tensors, '{"format": "eva-kernels/1", "order": [...'), "not valid JSON"
    if name == "json_list":
        return write_raw(p, tensors, "[1, 2, 3]"), "not an object"
    if name == "tensor_1d":
        tensors["h.1.attn.c_attn"] = torch.zeros(D0)
        return write_raw(p, tensors, meta), "'h.1.attn.c_attn' is F32 with shape [6]"
    if name == "tensor_3d":
        tensors["h.1.attn.c_attn"] = torch.zeros(1, 3, D0)
        return write_raw(p, tensors, meta), "2-D F32"
    if name == "tensor_fp16":
        tensors["h.0.attn.c_attn"] = tensors["h.0.attn.c_attn"].half()
        return write_raw(p, tensors, meta), "'h.0.attn.c_attn' is F16"
    if name == "order_names_absent":
        meta["order"].append("h.9.mlp.c_fc")
        return write_raw(p, tensors, meta), "'h.9.mlp.c_fc'"
    if name == "tensor_not_in_order":
        meta["order"].remove("h.0.mlp.c_fc")
        return write_raw(p, tensors, meta), "missing from metadata 'order'"
    if name == "order_duplicate":
        meta["order"].append(meta["order"][0])
        return write_raw(p, tensors, meta), "twice"
    if name == "order_not_list":
        meta["order"] = "h.1.attn.c_attn"
        return write_raw(p, tensors, meta), "'order' is not a list"
    if name == "rank_mismatch":
        meta["layers"]["h.1.attn.c_attn"]["rank"] = 5
        return write_raw(p, tensors, meta), "rank 5 but its tensor is 3 x 6"
    if name == "rank0_mismatch":
        meta["layers"]["h.0.mlp.c_fc"]["rank"] = 2
        return write_raw(p, tensors, meta), "'h.0.mlp.c_fc' has metadata rank 2"
    if name == "in_features_mismatch":
        meta["layers"]["h.0.attn.c_attn"]["in_features"] = 99
        return write_raw(p, tensors, meta), "in_features 99"
    if name == "layers_not_dict":
        meta["layers"] = [1, 2]
        return write_raw(p, tensors, meta), "'layers' is a list"
    raise AssertionError(name)


CASES = ["missing", "directory", "empty", "truncated_1", "truncated_7", "truncated_8", "truncated_20",
         "truncated_header", "truncated_at_data", "truncated_data", "truncated_last", "trailing", "random",
         "text", "header_not_json", "foreign", "foreign_with_other_metadata", "wrong_marker",
         "marker_not_string", "newer_version", "older_version", "json_garbage", "json_list", "tensor_1d",
         "tensor_3d", "tensor_fp16", "order_names_absent", "tensor_not_in_order", "order_duplicate",
         "order_not_list", "rank_mismatch", "rank0_mismatch", "in_features_mismatch", "layers_not_dict"]


@pytest.mark.parametrize("name", CASES)
def test_loader_rejects_bad_file(name, tmp_path, good_file):
    from eva.result import load_eva_state_dict
    path, fragment = _case(name, tmp_path, good_file)
    with pytest.raises(EvaError) as info:
        load_eva_state_dict(str(path))
    msg = str(info.value)
    one_line(msg)
    assert repr(str(path)) in msg, msg
    assert fragment in msg.replace(str(path), "<file>"), msg


@pytest.mark.parametrize("name", CASES)
def test_inspect_rejects_bad_file(name, tmp_path, good_file, capsys):
    from eva.cli import main
    path, fragment = _case(name, tmp_path, good_file)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eva: error: "), err
    assert str(path) in lines[0] and fragment in lines[0].replace(str(path), "<file>")


def test_foreign_file_message_says_what_it_is(tmp_path, good_file):
    from eva.result import load_eva_state_dict
    path, _ = _case("foreign", tmp_path, good_file)
    with pytest.raises(EvaError) as info:
        load_eva_state_dict(str(path))
    msg = str(info.value)
    assert "2 tensor(s)" in msg and ("'wte.weight'" in msg or "'wpe.weight'" in msg)
    assert "eva_metadata" in msg and "eva init" in msg and "EvaStateDict.save" in msg


def test_newer_version_says_upgrade(tmp_path, good_file):
    from eva.result import load_eva_state_dict
    path, _ = _case("newer_version", tmp_path, good_file)
    with pytest.raises(EvaError, match="upgrade"):
        load_eva_state_dict(str(path))


def test_inspect_good_file_still_works(good_file, capsys):
    from eva.cli import main
    assert main(["inspect", str(good_file)]) == 0
    out = capsys.readouterr().out
    head, table = out.split("\n\n", 1)
    assert "settings  r=2" in head and "provenance: not recorded" in head  # hand-built metadata: no provenance
    assert table.startswith("layer") and "h.0.mlp.c_fc" in table
