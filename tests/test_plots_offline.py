"""Every plot the docs tell a user about is a declared DVC plot, and ``dvc plots show`` renders all
of them with no network (``.dvc/plots.html``: Vega inlined, dicomflow/devtools/plots_page.py).

The slow test builds a real DVC repository with the project's ``dvc.yaml``, ``params.yaml`` and
``.dvc/`` page, writes every plot file with the functions the stages use (on synthetic scores and
images: no training), runs the real ``dvc plots show`` and opens its page in headless Chromium
with the network cut off, counting the Vega charts drawn.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dicomflow.devtools.plots_page import plots_page
from test_docs import external_assets

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A path under reports/ ending in .png, as the docs write it ("reports/plots/" folders aside).
NAMED_PNG = re.compile(r"reports/[\w/.-]+?\.png")


def declared_plots() -> set[str]:
    """Every plot file dvc.yaml declares (top level and per stage), ``${paths.*}`` resolved."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = next(item["paths"] for item in spec["vars"] if "paths" in item)

    def resolve(text: str) -> str:
        return re.sub(r"\$\{paths\.(\w+)\}", lambda match: paths[match.group(1)], text)

    declared = set()
    for entry in spec.get("plots", []):
        if isinstance(entry, str):
            declared.add(resolve(entry))
            continue
        for name, props in entry.items():
            files = (props or {}).get("y") if isinstance(props, dict) else None
            declared.update(resolve(file) for file in files) if isinstance(files, dict) else declared.add(resolve(name))
    for stage in spec["stages"].values():
        for entry in stage.get("plots", []):
            declared.update(resolve(name) for name in (entry if isinstance(entry, dict) else {entry: None}))
    return declared


def documented_pngs() -> set[str]:
    """Every ``reports/...png`` that README.md or a page of docs/ names."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return {name for page in pages for name in NAMED_PNG.findall(page.read_text(encoding="utf-8"))}


def test_every_png_the_docs_name_is_a_declared_plot():
    documented = documented_pngs()
    assert "reports/plots/grad_cam.png" in documented  # the scan finds what the docs name
    assert documented - declared_plots() == set()


class TestPlotsPage:
    def test_the_page_is_the_pinned_release_and_loads_nothing(self):
        page = (ROOT / ".dvc" / "plots.html").read_text(encoding="utf-8")
        assert external_assets(page) == []
        assert "{plot_divs}" in page and "{scripts}" not in page  # DVC adds no CDN script
        for name, version in (("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2")):
            assert f"{name} {version}" in page
        # What dvc_render asks for; a DVC upgrade that moves it needs a new page.
        from dvc_render.vega import VegaRenderer
        assert re.findall(r"npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS) == [
            ("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2")]

    def test_refuses_a_script_that_would_break_the_page(self):
        with pytest.raises(ValueError, match="'</script'"):
            plots_page({"bad": "var s = '</script>';"})
        with pytest.raises(ValueError, match=r"\{plot_divs\}"):
            plots_page({"bad": "var s = '{plot_divs}';"})


def write_every_plot(repo: Path) -> None:
    """The plot files of a pipeline run, written by the stages' own functions on synthetic data."""
    from dicomflow.evaluation.explain import write_grad_cam_grid
    from dicomflow.evaluation.plots import (
        write_class_reliability,
        write_confusion_matrix,
        write_plot_data,
        write_reliability_diagram,
    )
    from dicomflow.model.augment import build_policy, write_preview
    from dicomflow.model.curves import write_training_curves
    from dicomflow.config.params import load_params

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 120)
    y_score = np.clip(y_true * 0.6 + rng.normal(0.2, 0.2, 120), 0, 1)
    plots = repo / "reports" / "plots"
    write_plot_data(y_true, y_score, threshold=0.5, out_dir=plots)
    write_reliability_diagram(y_true, y_score, np.clip(y_score * 1.2, 0, 1), out_dir=plots)
    grades = rng.integers(0, 5, 120)  # the plots of more than two classes, from a five-grade run
    write_confusion_matrix(grades, np.clip(grades + rng.integers(-1, 2, 120), 0, 4), classes=[0, 1, 2, 3, 4],
                           out_dir=plots)
    write_class_reliability(grades, rng.dirichlet(np.ones(5), 120), classes=[0, 1, 2, 3, 4], out_dir=plots)
    images = rng.uniform(0, 1, (4, 16, 16, 1)).astype(np.float32)
    write_grad_cam_grid(images, rng.uniform(0, 1, (4, 16, 16)), {"true_positives": np.array([0, 1]),
                        "false_negatives": np.array([2])}, y_score[:4], plots / "grad_cam.png")
    history = pd.DataFrame({"epoch": [1, 2, 3], "member": 0, "kept": [False, True, False],
                            **{name: [0.5, 0.4, 0.45] for name in (
                                "loss", "auc", "accuracy", "brier", "ece", "val_loss", "val_auc",
                                "val_accuracy", "val_brier", "val_ece")}})
    history.to_csv(repo / "reports" / "train_history.csv", index=False)
    write_training_curves(history, repo / "reports" / "train_curves.png")
    stored = rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)
    write_preview(stored, build_policy(load_params("augment", path=repo / "params.yaml")),
                  repo / "reports" / "augment_preview.png", seed=0, n_images=2, n_variants=2)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_dvc_plots_show_renders_every_declared_plot_offline(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=repo, check=True)
    shutil.copy(ROOT / ".dvc" / "plots.html", repo / ".dvc" / "plots.html")
    subprocess.run([DVC, "config", "plots.html_template", "plots.html"], cwd=repo, check=True)
    write_every_plot(repo)

    shown = subprocess.run([DVC, "plots", "show", "-o", "shown"], cwd=repo, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0, shown.stderr
    page = (repo / "shown" / "index.html").read_text(encoding="utf-8")
    assert external_assets(page) == []
    assert "cdn.jsdelivr" not in page
    declared = declared_plots()
    images = {name for name in declared if name.endswith(".png")}
    charts = declared - images - {f"reports/plots/{name}.csv" for name in ("roc", "confusion", "pr", "calibration")}
    # Vega charts: four of the test split, three of train_history.csv.
    assert charts == {"reports/train_history.csv"}
    vega_divs = re.findall(r"vegaEmbed\('#([\w-]+)'", page)
    assert len(vega_divs) == 7
    for image in images:
        assert f'static/workspace_{image.replace("/", "_")}' in page, image

    # Rendered with the network off: each chart's canvas drawn by the inlined Vega.
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
                          "--virtual-time-budget=15000", "--dump-dom",
                          (repo / "shown" / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="vega-embed') == 7
    assert dom.count("<canvas") == 7
    assert len(re.findall(r'<img src="static/workspace_[\w.]+\.png"', dom)) == len(images) == 8
