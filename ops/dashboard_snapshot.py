"""The Grafana dashboard's panels, rendered without Grafana: `python -m ops.dashboard_snapshot`.

For machines where Grafana cannot run (no container engine). It reads the dashboard that compose
provisions (ops/grafana/dashboards/switchyard.json), asks a real Prometheus for every panel's PromQL,
unchanged except for Grafana's `$__rate_interval` (replaced by --rate-interval), over the last
--minutes, draws each panel with matplotlib in the dashboard's rows and order, and writes one HTML
page; with --screenshot, headless Chromium photographs it into a PNG.

    python -m ops.dashboard_snapshot --prometheus http://127.0.0.1:9090 --minutes 15 \\
        --out docs/observability/dashboard.html --screenshot docs/observability/dashboard.png
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "switchyard.json"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """Prometheus's /api/v1/query_range result: [{metric: {labels}, values: [[t, "v"], ...]}, ...]."""
    query = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{query}", timeout=30) as resp:
        answer = json.load(resp)
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def legend(template: str, labels: dict) -> str:
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out.replace("{{", "").replace("}}", "") or json.dumps(labels)


def _unit_axis(ax, unit: str) -> None:
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    if unit == "percentunit":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif unit == "s":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v * 1000:.0f} ms" if v < 1 else f"{v:.3g} s"))
    elif unit in ("reqps", "ops"):
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.3g}/s"))


def draw(panel: dict, series: list[tuple[str, list[float], list[float]]], start: float, end: float) -> str:
    """One panel as a PNG, base64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 2.6), dpi=110)
    fig.patch.set_facecolor("#181b1f")
    ax.set_facecolor("#181b1f")
    for spine in ax.spines.values():
        spine.set_color("#3a3d42")
    ax.tick_params(colors="#ccccdc", labelsize=7)
    ax.grid(color="#2c3036", linewidth=0.6)
    for name, times, values in series:
        ax.plot([t - end for t in times], values, linewidth=1.2, label=name[:48])
    ax.set_xlim((start - end), 0)
    ax.set_xlabel("seconds before the snapshot", color="#8e8e9a", fontsize=7)
    _unit_axis(ax, panel["fieldConfig"]["defaults"].get("unit", ""))
    if series:
        ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", edgecolor="#3a3d42", labelcolor="#ccccdc",
                  ncol=2 if len(series) > 4 else 1)
    else:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, ha="center", va="center", color="#8e8e9a")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def panel_series(prometheus: str, panel: dict, start: float, end: float, step: float,
                 rate_interval: str) -> list[tuple[str, list[float], list[float]]]:
    series = []
    for target in panel["targets"]:
        expr = target["expr"].replace("$__rate_interval", rate_interval)
        for result in query_range(prometheus, expr, start, end, step):
            points = [(float(t), float(v)) for t, v in result["values"] if v not in ("NaN", "+Inf", "-Inf")]
            if points:
                series.append((legend(target.get("legendFormat", ""), result["metric"]),
                               [t for t, _ in points], [v for _, v in points]))
    return series


def render(dashboard: dict, prometheus: str, minutes: float, rate_interval: str, caption: str) -> str:
    end = time.time()
    start, step = end - minutes * 60, max(5.0, minutes * 60 / 240)
    parts = [f"<h1>{dashboard['title']}</h1><p class='caption'>{caption}</p>"]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            parts.append(f"<h2>{panel['title']}</h2>")
            continue
        image = draw(panel, panel_series(prometheus, panel, start, end, step, rate_interval), start, end)
        parts.append(f"<div class='panel'><div class='title'>{panel['title']}</div>"
                     f"<img src='data:image/png;base64,{image}'></div>")
    style = ("body{background:#111217;color:#ccccdc;font-family:DejaVu Sans,sans-serif;margin:16px;width:1740px}"
             "h1{font-size:20px;margin:4px 0}h2{font-size:15px;margin:14px 0 4px;clear:both;color:#e0e0ea}"
             ".caption{font-size:12px;color:#8e8e9a;margin:0 0 6px}"
             ".panel{float:left;width:566px;margin:0 8px 8px 0;background:#181b1f;border:1px solid #2c3036}"
             ".title{font-size:12px;padding:4px 8px}.panel img{width:566px;display:block}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def page_height(dashboard: dict) -> int:
    """Pixels the page needs: a heading per row, then its panels three abreast (as render lays them)."""
    sections, panels = 0, [0]
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            sections += 1
            panels.append(0)
        else:
            panels[-1] += 1
    return 100 + sections * 40 + sum(-(-n // 3) for n in panels) * 318


def screenshot(html: Path, png: Path, height: int, *, width: int = 1790) -> None:
    """Headless Chromium's photograph of the page."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise SystemExit("no Chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png}", html.resolve().as_uri()], check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.dashboard_snapshot", description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (Grafana: 4 scrapes)")
    parser.add_argument("--caption", default="")
    parser.add_argument("--out", type=Path, required=True, help="the HTML page")
    parser.add_argument("--screenshot", type=Path, help="a PNG of the page, taken with headless Chromium")
    args = parser.parse_args(argv)
    dashboard = json.loads(args.dashboard.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(dashboard, args.prometheus.rstrip("/"), args.minutes, args.rate_interval, args.caption))
    print(f"wrote {args.out}")
    if args.screenshot:
        screenshot(args.out, args.screenshot, page_height(dashboard))
        print(f"wrote {args.screenshot}")


if __name__ == "__main__":
    main()
