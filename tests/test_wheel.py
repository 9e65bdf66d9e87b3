"""The project installed from its wheel, outside the checkout.

Builds the wheel from the repository's packaging inputs (pyproject.toml and the folders its
[tool.setuptools.package-dir] maps, copied to a temporary directory so no build/ or egg-info
is left in the checkout), installs it into a fresh venv under tmp_path, and runs the
`fer-pipeline` console script from a working directory outside the repository: `synth`, then
`run --profile smoke` end to end, every step through the push.

The fresh venv gets the dependencies without downloading anything: a .pth file in its
site-packages names the main venv's site-packages. A plain path line in a .pth only adds the
directory to sys.path; the .pth files inside it (the editable install's finder, which maps
fer_pipeline onto this checkout) are not run, so `fer_pipeline` can only come from the wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCHEMA_IN_WHEEL = "fer_pipeline/schemas/fer2013/schema.pbtxt"
REVIEW_PAGE = REPO / "serving" / "review_page"

# The smoke profile as `make demo` runs it (both models, its training settings), on a small
# CSV, with the evaluation gate opened so that whatever trained is blessed: infra validation
# and the push then run for real. Whether the CNN learns is tests/test_end_to_end.py's
# business, not this test's. Measured on 2 cores shared with other work (load 6): the run
# 100-117 s, the whole test (wheel, venv, install, synth, run) 102-124 s.
ROWS = 500
MODELS = ("cnn", "vgg16")
CONFIG_YAML = """\
evaluation:
  min_accuracy: {cnn: 0.0, vgg16: 0.0}
  baseline_margin: -1.0     # negative: a model below the majority-class baseline passes too
"""


def _run(args: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel, built with the running venv's pip and setuptools (no download)."""
    pyproject = REPO / "pyproject.toml"
    package_dirs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(pyproject, src / "pyproject.toml")
    for folder in sorted(set(package_dirs.values())):
        shutil.copytree(REPO / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "--disable-pip-version-check", "-w", dist, src], cwd=tmp_path, timeout=300)
    wheels = list(dist.glob("fer_pipeline-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv with the wheel installed and the main venv's site-packages on its path."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, timeout=120)
    python = venv / "bin" / "python"
    site_packages = Path(_run([python, "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"],
                              cwd=tmp_path).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "_main_venv_dependencies.pth").write_text(
        "".join(f"{path}\n" for path in sorted(ours)))
    uv = Path(sys.executable).parent / "uv"
    if uv.exists():
        _run([uv, "pip", "install", "--quiet", "--no-deps", "--offline", "--python", python,
              wheel], cwd=tmp_path, timeout=300)
    else:  # pip, imported from the main venv's site-packages, installs into the fresh venv
        _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
              "--disable-pip-version-check", wheel], cwd=tmp_path, timeout=300)
    return venv


@pytest.mark.slow
def test_wheel_installs_and_runs_the_pipeline_outside_the_checkout(tmp_path):
    assert not tmp_path.resolve().is_relative_to(REPO)
    wheel = _build_wheel(tmp_path)

    names = set(zipfile.ZipFile(wheel).namelist())
    assert SCHEMA_IN_WHEEL in names
    if REVIEW_PAGE.is_dir():
        page_files = [p.name for p in REVIEW_PAGE.iterdir()
                      if p.is_file() and not p.name.startswith(".")]
        assert page_files
        for name in page_files:
            assert f"fer_pipeline/serving/review_page/{name}" in names, name

    venv = _fresh_venv(tmp_path, wheel)
    work = tmp_path / "work"
    work.mkdir()

    # fer_pipeline (and its schema, found through importlib.resources) comes from the wheel.
    where = _run([venv / "bin" / "python", "-c",
                  "import fer_pipeline.core.config as c; print(c.__file__); "
                  "print(c.packaged_schema_path()); "
                  "print(c.resolve_schema_path(c.ValidationConfig().schema_path))"],
                 cwd=work).stdout.split()
    installed = venv.resolve()
    for path in where:
        assert Path(path).resolve().is_relative_to(installed), where
        assert not Path(path).resolve().is_relative_to(REPO), where
    assert Path(where[1]).is_file() and where[1] == where[2], where

    cli = venv / "bin" / "fer-pipeline"
    _run([cli, "synth", "--rows", ROWS, "--out", "data.csv"], cwd=work)
    (work / "config.yaml").write_text(CONFIG_YAML)
    started = time.monotonic()
    result = _run([cli, "run", "--profile", "smoke", "--data", "data.csv", "--output", "out",
                   "--config", "config.yaml"], cwd=work, timeout=900)
    elapsed = time.monotonic() - started
    print(f"fer-pipeline run from the wheel: {elapsed:.0f} s")

    output = result.stdout + result.stderr
    steps = ["ingest", "augment", "statistics", "validate", "transform",
             *(f"train-{model}" for model in MODELS), "evaluate", "infra-validate", "push"]
    for step in steps:
        assert f"[fer-pipeline] {step} " in output, (step, output)
    assert (work / "out" / "metadata.sqlite").is_file()
    serving = work / "out" / "serving_models"
    models_config = (serving / "models.config").read_text()
    for model in MODELS:
        versions = [p for p in (serving / model).iterdir() if p.name.isdigit()]
        assert len(versions) == 1, (model, versions, output)
        assert (versions[0] / "saved_model.pb").is_file()
        # Infra validation's canaries, published as the version's warm-up requests.
        assert (versions[0] / "assets.extra" / "tf_serving_warmup_requests").is_file()
        assert f'name: "{model}"' in models_config
    assert str(REPO) not in models_config


def test_every_package_folder_is_in_the_wheels_package_list():
    """A package folder missing from [tool.setuptools] packages would be left out of the
    wheel (the editable install finds it anyway, so nothing else would notice)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            on_disk.add(".".join([name, *relative.parts]))
    assert on_disk - listed == set(), "add these to pyproject.toml's [tool.setuptools] packages"
    assert listed - on_disk == set(), "pyproject.toml lists packages that do not exist"
