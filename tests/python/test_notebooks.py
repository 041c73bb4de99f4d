"""The notebooks of examples/notebooks run from top to bottom without an error.

Each is executed with nbclient on the ``python3`` kernel (ipykernel's own spec runs the current
interpreter) in a temporary working directory, so nothing they might write lands in the tree;
plots stay in the executed copy, which is discarded. Each notebook has a time limit (90 s for all
its cells; each takes seconds); all of them together take about 30 s here. The committed files
carry no outputs and match their generator (examples/notebooks/make_notebooks.py). Skipped
without nbclient, ipykernel or matplotlib.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
NOTEBOOK_TIMEOUT_S = 90  # all of a notebook's cells together (each runs in seconds)
NEEDS = {"transformers.ipynb": ("torch", "transformers")}


def test_the_notebooks_are_there():
    names = {path.name for path in NOTEBOOKS}
    expected = {"getting_started", "sparsek", "pde_ssm", "spade", "vq_collapse", "transformers"}
    assert names == {f"{name}.ipynb" for name in expected}


def test_notebooks_are_stripped_and_match_their_generator():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name
    check = [sys.executable, str(FOLDER / "make_notebooks.py"), "--check"]
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_python3_kernel_runs_this_interpreter():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail("no python3 kernel spec: install ipykernel (scripts/setup.sh does)")
    # "python" in a spec's command stands for the interpreter that starts the kernel (this one);
    # an installed spec naming another interpreter would run the notebooks without foveal.
    launcher = spec.argv[0]
    assert (
        launcher in ("python", "python3")
        or Path(launcher).resolve() == Path(sys.executable).resolve()
    ), f"the python3 kernel spec runs {launcher}, not {sys.executable}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    for module in NEEDS.get(path.name, ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    notebook = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + NOTEBOOK_TIMEOUT_S
    client = nbclient.NotebookClient(
        notebook,
        # Each cell may wait for what is left of the notebook's budget: a per-notebook limit.
        timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
        startup_timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} draws no plot"
    assert not list(tmp_path.iterdir()), "a notebook wrote files"
