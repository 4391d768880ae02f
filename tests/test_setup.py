"""The repository sets itself up: environment.yml agrees with pyproject.toml; `make lab` serves the notebooks."""

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_distribution_is_not_the_unrelated_mplib_on_the_package_index():
    project = pyproject()["project"]
    assert project["name"] != "mplib"
    assert any(d == "torch==2.13.0" for d in project["dependencies"])
    for name in ("transformers", "jupyterlab", "matplotlib", "ipywidgets", "tqdm"):
        assert any(d.startswith(name) for d in project["dependencies"]), name
    assert all("==" in d for d in project["optional-dependencies"]["test"])  # pytest and nbval pinned


def test_environment_yml_installs_this_repository_and_nothing_else_by_hand():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(conda) == ["pip", "python=3.11"]
    assert pip == ["--editable .[test]"]
    # pyproject.toml is the one source of dependencies: the extra environment.yml asks for exists
    assert "test" in pyproject()["project"]["optional-dependencies"]
    py = re.sub(r"[^\d.]", "", pyproject()["project"]["requires-python"])
    assert tuple(map(int, "3.11".split("."))) >= tuple(map(int, py.split(".")))


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^```(?:bash|sh)?\n(.*?)\n```", readme, flags=re.S | re.M)
    assert commands[:2] == ["make lab", "make test"]
    assert "make test </dev/null" in (ROOT / ".ci" / "run").read_text()


def test_every_notebook_uses_the_python3_kernel():
    import json

    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        meta = json.loads(nb.read_text())["metadata"]
        assert meta["kernelspec"]["name"] == "python3", nb.name


@pytest.mark.slow
def test_make_lab_serves_the_notebooks():
    spec = importlib.util.spec_from_file_location("check_lab", ROOT / "scripts" / "check_lab.py")
    check_lab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_lab)
    names = check_lab.served_notebooks()
    assert "00_setup.ipynb" in names
    assert names == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def test_readme_ten_line_example_runs_and_checks_itself(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## mplib in ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 10
    exec(compile(code, "README.md", "exec"), {})
    assert "stage" in capsys.readouterr().out  # the plan was printed


def _readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _torchrun_file(code: str) -> str | None:
    """The file name of an example meant for torchrun ("# step.py: ... torchrun ..."), else None."""
    m = re.match(r"# (\w+\.py): .*torchrun", code)
    return m.group(1) if m else None


def test_every_python_example_in_the_readme_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save (save_pretrained("out"), checkpoints) save here
    blocks = [b for b in _readme_blocks() if _torchrun_file(b) is None]
    assert len(blocks) >= 3
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), {})
    assert capsys.readouterr().out  # each example prints what it shows


def test_the_readme_torchrun_example_runs_under_torchrun_on_two_processes(tmp_path):
    import os
    import subprocess
    import sys

    found = [(name, b) for b in _readme_blocks() if (name := _torchrun_file(b))]
    assert found, "the README shows a torchrun example"
    for name, code in found:
        (tmp_path / name).write_text(code)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert (tmp_path / "ckpt" / "step-1").is_dir()  # the checkpoint the example saves from both ranks
