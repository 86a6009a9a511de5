"""The commands that read the store: leaderboard, ablation, and the dashboard (app)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from core.errors import ClipkdError


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from results.queries import leaderboard, render
    from results.store import Store

    frame = leaderboard(Store(args.db, readonly=True), args.metric, args.benchmark, args.teacher, args.student,
                        args.dataset, args.method)
    sys.stdout.write(render(frame, args.format))
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    from results.queries import ablation, render
    from results.store import Store

    frame = ablation(Store(args.db, readonly=True), args.teacher, args.student, args.dataset)
    if args.paper and not frame.empty:
        from results.paper import table1_by_method

        paper = table1_by_method(frame) / 100  # fractions, shown as percentages like every accuracy
        frame = frame.join(paper.rename(columns={"paper top1": "paper ImageNet top1",
                                                 "paper Δ": "paper ImageNet top1_delta"}))
    sys.stdout.write(render(frame, args.format))
    return 0


def cmd_findings(args: argparse.Namespace) -> int:
    from results import findings
    from results.store import Store

    if not 0 < args.margin < 100:
        raise ClipkdError(f"--margin {args.margin}: points of top-1, above 0 and below 100")
    if args.similarity not in findings.SIMILARITIES:
        raise ClipkdError(f"--similarity {args.similarity!r}: one of {', '.join(findings.SIMILARITIES)}")
    grid = args.grid
    if grid and Path(grid).is_file():
        from harness.grids.expansion import load_grid

        grid = load_grid(grid).name
    margin = args.margin / 100
    report = findings.findings(Store(args.db, readonly=True), args.benchmark, grid, margin, args.similarity)
    sys.stdout.write(findings.render(report, args.format, margin))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    """Serve the dashboard; a store that does not exist yet shows what to run, so it is not an error here."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from results.store import resolve_url

    url = resolve_url(args.db)
    try:
        make_url(url)
    except ArgumentError:
        raise ClipkdError(f"--db {url!r} is not an SQLAlchemy URL (e.g. sqlite:///results/clipkd.db, "
                          "postgresql+psycopg://host/clipkd) or a SQLite file path") from None
    if not 0 < args.port < 65536:
        raise ClipkdError(f"--port {args.port}: a TCP port is 1-65535")
    main_script = Path(__file__).resolve().parents[2] / "app" / "main.py"
    print(f"clipkd dashboard on http://{args.host}:{args.port} (store {url}, read-only); Ctrl-C stops it", flush=True)
    command = [sys.executable, "-m", "streamlit", "run", str(main_script), "--server.address", args.host,
               "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer"]
    os.execve(sys.executable, command, {**os.environ, "CLIPKD_DB": url})  # Ctrl-C and signals go to streamlit
