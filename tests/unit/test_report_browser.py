"""The report's heatmap renders in a real browser (headless Chromium), and the check can fail:
a damaged image is caught."""

from __future__ import annotations

import base64

from browser import rendered_images

from branchout.orchestrator.run.report import PLOTS, write_report

HEATMAP = PLOTS["cross.png"]


def _report_with_heatmap(tmp_path):
    from branchout.core.graph import build_graph
    from branchout.orchestrator.config.loader import load_spec
    from branchout.orchestrator.run.driver import create_run

    from conftest import REPO

    spec = load_spec(REPO / "examples" / "quickstart.yaml")
    spec.storage = str(tmp_path / "runs")
    graph = build_graph(spec)
    record = create_run(spec, graph, "r1")
    sets = ["general", *graph.domains]
    models = ["base", *(f"{k}/{d}" for d in graph.domains for k in ("finetune", "scratch"))]
    cross = {m: {s: 20.0 + 7 * i + 3 * j for j, s in enumerate(sets)} for i, m in enumerate(models)}
    run = tmp_path / "runs" / "quickstart" / "r1"
    (run / "eval").mkdir(parents=True)
    write_report(record, {"domains": {}, "cross": cross, "forgetting": {}})
    return run / "report.html"


def test_the_cross_heatmap_is_decoded_and_painted_by_chromium(tmp_path):
    page = _report_with_heatmap(tmp_path)
    images = {row["alt"]: row for row in rendered_images(page)}
    heatmap = images[HEATMAP]
    assert heatmap["complete"] and heatmap["width"] > 300 and heatmap["height"] > 200, heatmap
    # every pixel painted (matplotlib's background is opaque white); a colour scale with a label
    # in every cell: many colours, much of the image not white
    assert heatmap["opaque"] == 1.0 and heatmap["colours"] > 100 and heatmap["non_white"] > 0.3, heatmap


def test_a_damaged_image_is_reported_as_not_rendered(tmp_path):
    page = _report_with_heatmap(tmp_path)
    text = page.read_text()
    start = text.index("data:image/png;base64,", text.index(f'alt="{HEATMAP}"')) + len("data:image/png;base64,")
    end = text.index('"', start)
    png = base64.b64decode(text[start:end])
    cut = base64.b64encode(png[: len(png) // 3]).decode()  # a truncated PNG: header fine, pixels gone
    page.write_text(text[:start] + cut + text[end:])
    heatmap = {row["alt"]: row for row in rendered_images(page)}[HEATMAP]
    assert heatmap["width"] == 0 or heatmap["opaque"] < 0.9, heatmap
