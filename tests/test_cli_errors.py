"""One way to fail: refused input exits with 2 and one line on stderr naming it, checked before any work and
writing nothing; a run that fails exits with 1 and one line; a bug keeps its traceback."""

import errno
import importlib

import numpy as np
import pytest

from vdm.checkpoint import save_model
from vdm.cli import main
from vdm.errors import FAILED, REFUSED, InputError, exit_code, message
from vdm.model import VDM


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    save_model(VDM(n_embd=32, n_layer=1, image_size=8, channels=3, dropout=0.0).eval(), path)
    return path


@pytest.fixture(scope="module")
def vdmc(tmp_path_factory, model_file):
    """A .vdmc file of one 6×5 colour image named img.npy, made with `model_file`."""
    d = tmp_path_factory.mktemp("vdmc")
    np.save(d / "img.npy", np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    assert main(["compress", str(d / "img.npy"), "-o", str(d / "x.vdmc"), "--model", str(model_file), "--steps", "2",
                 "--tile", "8", "--warmup", "4", "--threads", "1", "-q"]) == 0
    return d / "x.vdmc"


def refused(argv, capsys, *, code: int = 2) -> str:
    """Run `vdm argv` in this process; assert the exit code and one clean line on stderr, and return that line."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"vdm {argv[0]}: error: "), err
    assert "Traceback" not in err and "Errno" not in err, err
    return err


def forbid(monkeypatch, target: str) -> None:
    """Make calling `target` ("module.attr") fail the test: the refusal must come before that work."""
    def called(*args, **kwargs):
        raise AssertionError(f"{target} was called")
    monkeypatch.setattr(target, called)


# --- sample -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("existing", ["s.png", "s.npz"])
def test_sample_refuses_to_overwrite_the_png_or_npz(tmp_path, model_file, capsys, monkeypatch, existing):
    (tmp_path / existing).write_bytes(b"keep me")
    forbid(monkeypatch, "vdm.commands._load")
    err = refused(["sample", model_file, "--out", tmp_path / "s.png", "-n", "1", "--steps", "1"], capsys)
    assert existing in err and "--force" in err
    assert (tmp_path / existing).read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_sample_force_overwrites_both_files(tmp_path, model_file):
    for name in ("s.png", "s.npz"):
        (tmp_path / name).write_bytes(b"old")
    assert main(["sample", str(model_file), "--out", str(tmp_path / "s.png"), "-n", "1", "--steps", "1",
                 "--sampler", "ancestral", "--device", "cpu", "--force"]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (1, 8, 8, 3)


def test_sample_force_does_not_replace_a_directory(tmp_path, model_file, capsys, monkeypatch):
    (tmp_path / "s.png").mkdir()
    forbid(monkeypatch, "vdm.commands._load")
    err = refused(["sample", model_file, "--out", tmp_path / "s.png", "--force"], capsys)
    assert "s.png: is a directory" in err


# --- decompress ---------------------------------------------------------------------------------------------
def test_decompress_refuses_an_output_file_before_decoding(tmp_path, vdmc, capsys, monkeypatch):
    (tmp_path / "out").write_bytes(b"keep me")
    forbid(monkeypatch, "vdm.codec.cli._load")
    forbid(monkeypatch, "vdm.codec.compressor.decompress_images")
    for force in ([], ["--force"]):
        err = refused(["decompress", vdmc, "-o", tmp_path / "out", *force], capsys)
        assert "out: exists and is not a directory" in err
    assert (tmp_path / "out").read_bytes() == b"keep me"


def test_decompress_refuses_existing_images_before_decoding(tmp_path, vdmc, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    np.save(tmp_path / "out" / "img.npy", np.zeros(3, np.uint8))
    forbid(monkeypatch, "vdm.codec.cli._load")
    forbid(monkeypatch, "vdm.codec.compressor.decompress_images")
    err = refused(["decompress", vdmc, "-o", tmp_path / "out"], capsys)
    assert "img.npy exists (use --force to overwrite)" in err
    (tmp_path / "out" / "img.npy").unlink()
    (tmp_path / "out" / "img.npy").mkdir()  # --force never replaces a directory by a file
    err = refused(["decompress", vdmc, "-o", tmp_path / "out", "--force"], capsys)
    assert "img.npy: is a directory" in err


def test_decompress_force_overwrites(tmp_path, vdmc, model_file):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "img.npy").write_bytes(b"old")
    assert main(["decompress", str(vdmc), "-o", str(tmp_path / "out"), "--model", str(model_file), "-q",
                 "--force"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "img.npy"), np.load(vdmc.parent / "img.npy"))


@pytest.mark.parametrize("kind, words", [("dir", "is a directory"), ("missing", "no such file")])
def test_decompress_input_that_is_not_a_file(tmp_path, capsys, kind, words):
    if kind == "dir":
        (tmp_path / "in.vdmc").mkdir()
    err = refused(["decompress", tmp_path / "in.vdmc", "-o", tmp_path / "out"], capsys)
    assert f"in.vdmc: {words}" in err and not (tmp_path / "out").exists()


# --- compress -----------------------------------------------------------------------------------------------
def test_compress_a_directory_says_so(tmp_path, model_file, capsys, monkeypatch):
    (tmp_path / "photos").mkdir()
    forbid(monkeypatch, "vdm.codec.cli._load")
    err = refused(["compress", tmp_path / "photos", "-o", tmp_path / "x.vdmc", "--model", model_file], capsys)
    assert "photos: is a directory" in err and "no such file" not in err
    assert not (tmp_path / "x.vdmc").exists()


def test_compress_force_onto_a_directory_is_refused_before_compressing(tmp_path, vdmc, model_file, capsys,
                                                                       monkeypatch):
    (tmp_path / "out.vdmc").mkdir()
    forbid(monkeypatch, "vdm.codec.cli._load")
    forbid(monkeypatch, "vdm.codec.compressor.compress_images")
    err = refused(["compress", vdmc.parent / "img.npy", "-o", tmp_path / "out.vdmc", "--force"], capsys)
    assert "out.vdmc: is a directory" in err


def test_compress_refuses_to_overwrite_before_reading(tmp_path, vdmc, capsys, monkeypatch):
    (tmp_path / "x.vdmc").write_bytes(b"keep me")
    forbid(monkeypatch, "vdm.codec.images.read_images")
    err = refused(["compress", vdmc.parent / "img.npy", "-o", tmp_path / "x.vdmc"], capsys)
    assert "x.vdmc exists (use --force to overwrite)" in err and (tmp_path / "x.vdmc").read_bytes() == b"keep me"


def test_compress_output_under_a_file_is_refused(tmp_path, vdmc, capsys):
    (tmp_path / "f").write_bytes(b"")
    err = refused(["compress", vdmc.parent / "img.npy", "-o", tmp_path / "f" / "x.vdmc"], capsys)
    assert "f: is not a directory" in err


def test_bad_coding_parameters_are_refused(tmp_path, vdmc, capsys):
    err = refused(["compress", vdmc.parent / "img.npy", "-o", tmp_path / "x.vdmc", "--grid-bits", "99"], capsys)
    assert "grid_bits" in err and not (tmp_path / "x.vdmc").exists()


# --- train --------------------------------------------------------------------------------------------------
def test_train_out_a_file_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").write_text("not a run")
    forbid(monkeypatch, "vdm.train.train")
    err = refused(["train", "--preset", "quick", "--out", tmp_path / "run", "--max-steps", "1"], capsys)
    assert "run: exists and is not a directory" in err and (tmp_path / "run").read_text() == "not a run"


def test_train_run_with_checkpoints_needs_resume(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    err = refused(["train", "--preset", "quick", "--out", tmp_path / "run", "--max-steps", "1"], capsys)
    assert "already holds checkpoints" in err and "--resume" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def test_train_bad_limits_exit_2_with_one_line(tmp_path, capsys):
    refused(["train", "--preset", "quick", "--out", tmp_path / "r", "--max-steps", "-1"], capsys)
    refused(["train", "--preset", "quick", "--set", "optim.lr=fast", "--out", tmp_path / "r"], capsys)
    assert not (tmp_path / "r").exists()


def test_a_run_that_fails_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    from vdm.train import NonFiniteLossError

    def diverges(*args, **kwargs):
        raise NonFiniteLossError("3 non-finite losses in a row at step 7; stopped without saving")
    monkeypatch.setattr("vdm.train.train", diverges)
    err = refused(["train", "--preset", "quick", "--out", tmp_path / "r"], capsys, code=1)
    assert "non-finite losses" in err


def test_a_disk_error_during_the_work_exits_1_in_words(tmp_path, vdmc, model_file, capsys, monkeypatch):
    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr("vdm.codec.cli.atomic_write", full)
    err = refused(["compress", vdmc.parent / "img.npy", "-o", tmp_path / "x.vdmc", "--steps", "2", "--tile", "8",
                   "--warmup", "4", "--threads", "1", "-q", "--model", model_file], capsys, code=1)
    assert "x.vdmc: no space left on device" in err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(args):
        raise KeyError("a bug")
    monkeypatch.setattr("vdm.convert_cli.convert_command", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["convert", "x.flax", "--config", "cifar10", "--out", str(tmp_path / "m.safetensors")])


# --- convert, plot, eval ------------------------------------------------------------------------------------
def test_convert_output_checks(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, "vdm.convert.convert_checkpoint")
    (tmp_path / "d.safetensors").mkdir()
    err = refused(["convert", "x.flax", "--config", "cifar10", "--out", tmp_path / "d.safetensors", "--force"],
                  capsys)
    assert "d.safetensors: is a directory" in err
    (tmp_path / "m.safetensors").write_bytes(b"keep me")
    err = refused(["convert", "x.flax", "--config", "cifar10", "--out", tmp_path / "m.safetensors"], capsys)
    assert "m.safetensors exists (use --force to overwrite)" in err
    assert (tmp_path / "m.safetensors").read_bytes() == b"keep me"


def test_plot_refuses_to_overwrite_a_figure(tmp_path, model_file, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "schedule.png").write_bytes(b"keep me")
    forbid(monkeypatch, "vdm.commands._load")
    args = ["plot", model_file, "--out", tmp_path / "figs", "--images", "0", "--device", "cpu"]
    err = refused(args, capsys)
    assert "schedule.png exists (use --force to overwrite)" in err
    assert (tmp_path / "figs" / "schedule.png").read_bytes() == b"keep me"
    monkeypatch.undo()
    assert main([str(a) for a in args] + ["--force"]) == 0
    assert (tmp_path / "figs" / "schedule.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_refusals_name_the_command(tmp_path, model_file, capsys):
    err = refused(["eval", model_file, "--steps", "-1"], capsys)
    assert "--steps" in err
    err = refused(["eval", tmp_path / "none"], capsys)
    assert "none: no such file" in err


# --- the error table ----------------------------------------------------------------------------------------
def test_every_listed_library_error_exists():
    for module, name in REFUSED + FAILED:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Exception), (module, name)


def test_exit_codes_and_messages():
    from vdm.checkpoint import CheckpointError
    from vdm.train import NonFiniteLossError, TrainingError
    assert exit_code(InputError("x")) == exit_code(CheckpointError("x")) == exit_code(TrainingError("x")) == 2
    assert exit_code(NonFiniteLossError("x")) == exit_code(OSError(errno.EIO, "I/O error")) == 1
    assert exit_code(RuntimeError("x")) is None and exit_code(ValueError("x")) is None
    assert message(IsADirectoryError(errno.EISDIR, "Is a directory", "photos")) == "photos: is a directory"
    assert message(InputError("two\nlines")) == "two lines"
    assert message(OSError("no errno")) == "no errno"
