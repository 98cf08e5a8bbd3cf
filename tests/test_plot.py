"""`vdm.plot` and `vdm plot`: metrics parsing, the schedule curve, and valid PNG files."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vdm
from vdm.checkpoint import save_model
from vdm.cli import main
from vdm.plot import MetricsError, read_metrics, schedule_curve, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_model(**kw) -> vdm.VDM:
    torch.manual_seed(0)
    return vdm.VDM(n_embd=32, n_layer=1, image_size=8, **kw)


def make_run(tmp_path, metrics: list[dict] | None):
    """A run directory with one checkpoint, a folder dataset in its config and, if given, metrics.jsonl."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000020"
    step.mkdir(parents=True)
    save_model(tiny_model(), step / "ema.safetensors")
    (run / "checkpoints" / "best").write_text("step_00000020")
    root = tmp_path / "imgs" / "test"
    root.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 8, 3), dtype=np.uint8)).save(root / "a.png")
    (run / "config.json").write_text(json.dumps({"data": {"name": "folder", "root": str(root.parent)}}))
    if metrics is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + "\n")
    return run


def assert_png(path, min_size=(100, 100)):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        assert np.asarray(im.convert("L")).std() > 0  # something was drawn


def test_read_metrics_and_series(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 20, "bpd": 5.0}\n\n{"step": 10, "bpd": 6.0, "test_bpd": 6.5}\n'
                 '{"step": 30, "bpd": NaN}\n{"event": "saved"}\n{"step": 40, "bpd": true}\n')
    recs = read_metrics(p)
    assert len(recs) == 5
    steps, bpd = series(recs, "bpd")
    np.testing.assert_array_equal(steps, [10, 20])  # sorted; NaN, booleans and step-less records dropped
    np.testing.assert_array_equal(bpd, [6.0, 5.0])
    assert series(recs, "test_bpd")[1].tolist() == [6.5]


@pytest.mark.parametrize("text, where", [('{"step": 1}\n{"step": \n', "line 2"), ("[1, 2]\n", "line 1")])
def test_read_metrics_rejects_bad_lines(tmp_path, text, where):
    p = tmp_path / "metrics.jsonl"
    p.write_text(text)
    with pytest.raises(MetricsError, match=where) as e:
        read_metrics(p)
    assert "metrics.jsonl" in str(e.value)


def test_schedule_curve_is_the_schedule():
    model = tiny_model(gamma_type="fixed_linear", gamma_min=-10.0, gamma_max=4.0)
    t, gamma = schedule_curve(model, points=11)
    np.testing.assert_allclose(t, np.linspace(0, 1, 11), atol=1e-7)
    np.testing.assert_allclose(gamma, -10.0 + 14.0 * t, atol=1e-5)


def test_cli_plot_writes_three_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    metrics = [{"step": s, "bpd": 8.0 - s / 100} for s in range(0, 200, 20)] + [{"step": 200, "test_bpd": 6.1}]
    run = make_run(tmp_path, metrics)
    out = tmp_path / "figs"
    assert main(["plot", str(run), "--out", str(out), "--images", "2", "--points", "5", "--device", "cpu"]) == 0
    names = {"training_curve.png", "schedule.png", "diffusion_integrand.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        assert_png(out / name)
    assert capsys.readouterr().out.count("wrote ") == 3


def test_cli_plot_without_metrics_or_images(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path, None)
    assert main(["plot", str(run / "checkpoints" / "step_00000020"), "--images", "0"]) == 0
    assert [p.name for p in (run / "plots").iterdir()] == ["schedule.png"]
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_cli_plot_bad_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path, [])
    (run / "metrics.jsonl").write_text("{oops\n")
    assert main(["plot", str(run), "--images", "0"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl, line 1" in err and "Traceback" not in err


def test_cli_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path, [])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert main(["plot", str(run)]) == 2
    assert "pip install 'vdm[plot]'" in capsys.readouterr().err
