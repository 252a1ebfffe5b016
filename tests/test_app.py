"""The Hydra app: every config composes and instantiates, a tiny run, a 2-job multirun, the sweep summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]
TINY = ["data.image_size=32", "data.batch_size=2", "data.train_size=4", "data.val_size=2", "trainer.max_steps=2",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str], tmp_path: Path):  # noqa: ANN202
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("group", ["model", "data", "lrcnn", "trainer", "logger", "experiment"])
def test_every_config_composes_and_instantiates(group: str, tmp_path: Path) -> None:
    for option in _options(group):
        extra = ["data.path=" + str(tmp_path)] if option == "folder" else []
        if option in ("large_images", "gigapixel_resnet50"):
            extra = [f"data.path={_large_images(tmp_path / 'large')}", "data.num_classes=2", "data.crop=16"]
        if option == "folder":
            for c in ("a", "b"):
                (tmp_path / c).mkdir(exist_ok=True)
                from PIL import Image

                for i in range(2):
                    Image.new("RGB", (8, 8), color=(i * 90, 0, 0)).save(tmp_path / c / f"{i}.png")
            extra.append("data.num_classes=2")
        cfg = _compose([f"{group}={option}", *extra], tmp_path)
        OmegaConf.resolve(cfg.model)
        if group == "model":
            assert hydra.utils.instantiate(cfg.model).net is not None
        elif group == "data":
            assert hydra.utils.instantiate(cfg.data).num_classes >= 2
        elif group == "lrcnn":
            assert hydra.utils.instantiate(cfg.lrcnn).mode == cfg.lrcnn.mode
        elif group == "trainer":
            if cfg.trainer.accelerator in ("gpu",):
                continue  # needs a GPU to instantiate
            with open_dict(cfg.trainer):
                cfg.trainer.devices = 1
                cfg.trainer.pop("strategy", None)
            assert hydra.utils.instantiate(cfg.trainer, logger=False).max_steps > 0
        elif group == "logger":
            assert hydra.utils.instantiate(cfg.logger) is not None
        else:
            assert cfg.model is not None


def _large_images(root: Path) -> Path:
    """Two class folders, one 8-bit RGB TIFF (tiled) and one .npy each."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / c / "slide.tif", rng.integers(0, 256, (96, 80, 3), dtype=np.uint8), tile=(32, 32),
                         compression="zlib")
        np.save(root / c / "scene.npy", rng.integers(0, 256, (72, 88, 3), dtype=np.uint8))
    return root


@pytest.mark.slow  # the Hydra run end to end; the data module and the uint8 normalisation: test_large_images.py
def test_large_images_run_uint8_through_a_normalising_backbone(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run(["data=large_images", f"data.path={_large_images(tmp_path / 'data')}", "data.num_classes=2",
                 "data.crop=64", "data.train_size=4", "data.val_size=2", "data.batch_size=2", "model=resnet50_uint8",
                 "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                 "trainer.enable_checkpointing=false", f"hydra.run.dir={out}", "lrcnn.rows=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "summary.md").is_file()


@pytest.mark.parametrize(("make", "message"), [  # the readers' errors: test_large_images.py; here, the app's line
    (lambda d: d / "missing.tif", "missing.tif: no such file"),
    pytest.param(lambda d: (d / "x.tif").write_bytes(b"not a tiff at all") and d / "x.tif", "x.tif: cannot read it",
                 marks=pytest.mark.slow),
    (lambda d: d, "crop 64 is larger than the image"),
])
def test_large_images_bad_input_is_one_clear_line(make, message: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "small.npy", np.zeros((40, 50, 3), np.uint8))
    path = make(data)
    proc = _run(["data=large_images", f"data.path={path}", "data.num_classes=1", "data.crop=64",
                 f"hydra.run.dir={tmp_path / 'bad'}", "trainer.max_steps=1"], tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_uint8_images_into_a_float_network_is_one_clear_line(tmp_path: Path) -> None:
    import numpy as np

    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        np.save(tmp_path / "data" / name / "x.npy", np.zeros((80, 80, 3), np.uint8))
    proc = _run(["data=large_images", f"data.path={tmp_path / 'data'}", "data.num_classes=2", "data.crop=64",
                 f"hydra.run.dir={tmp_path / 'bad'}", "trainer.max_steps=1"], tmp_path)  # model: small_vgg (floats)
    assert proc.returncode != 0
    assert "error: the data yields torch.uint8 images but model=small_vgg takes floats" in proc.stderr, proc.stderr
    assert "model=resnet50_uint8" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run(["data=large_images", f"data.path={tmp_path / 'data'}", "data.crop=64",
                 f"hydra.run.dir={tmp_path / 'bad'}", "trainer.max_steps=1"], tmp_path)  # num_classes is required
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: Missing mandatory value: data.num_classes", proc.stderr


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_tiny_run_writes_metrics_and_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run([*TINY, f"hydra.run.dir={out}", "lrcnn.rows=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics.csv").is_file() and (out / "summary.md").is_file()
    summary = (out / "summary.md").read_text()
    for word in ("mode", "rows", "peak memory", "memory saved", "step time ratio", "val accuracy"):
        assert word in summary
    assert "lrcnn/peak_memory_mib" in (out / "metrics.csv").read_text()


def test_multirun_and_sweep_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = _run(["-m", *TINY, "lrcnn.mode=2ps,off", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs[:2] == ["0", "1"]
    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize_sweep.py"), str(sweep)],
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0, summary.stderr
    table = (sweep / "sweep_summary.md").read_text()
    assert "lrcnn.mode=2ps" in table and "lrcnn.mode=off" in table
    assert (sweep / "sweep_summary.png").stat().st_size > 1000


@pytest.mark.parametrize(("args", "message"), [
    (["data=folder", "data.path=/nonexistent/slides", "data.num_classes=2"], "no such folder"),
    (["model=vgg16", "data.image_size=16"], "data.image_size=16 does not fit model=vgg16"),
    (["model=unet", "data.image_size=36"], "data.image_size=36 does not fit model=unet"),
    pytest.param(["model=alexnet"], "Could not find 'model/alexnet'", marks=pytest.mark.slow),
])
def test_bad_input_is_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    proc = _run([f"hydra.run.dir={tmp_path / 'bad'}", "trainer.max_steps=1", *args], tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_summarize_sweep_bad_folder(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize_sweep.py"), str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no such sweep folder" in proc.stderr
