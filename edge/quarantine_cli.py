"""``firstcare edge quarantine list|retry|drop``: the messages the upstream refused for good.

It works on the spool file itself (``--spool`` or ``FC_EDGE_SPOOL_PATH``), on the gateway's
machine, whether the gateway runs or not: a running gateway notices the change (SQLite's
``data_version``) and forwards what was retried, and its status upstream clears the
``gateway.quarantine`` alarm once nothing is left.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from edge.config import EdgeSettings

EPILOG = """examples:
  firstcare edge quarantine list                      what is held, why, since when
  firstcare edge quarantine list --payload            ... with each payload (patient data: mind who reads)
  firstcare edge quarantine retry --id 3 --id 4       send these again (after fixing the ACL, say)
  firstcare edge quarantine retry --all
  firstcare edge quarantine drop --id 7               delete for good (counted)
exit status: 0 done, 2 no spool there or bad arguments"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firstcare edge quarantine", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Messages the upstream broker refused for good, held in the "
                                                 "gateway's spool: list them, send them again, or drop them.")
    parser.add_argument("action", choices=["list", "retry", "drop"])
    parser.add_argument("--spool", help="the spool file (default FC_EDGE_SPOOL_PATH, else data/edge-spool.db)")
    parser.add_argument("--id", dest="ids", type=int, action="append", default=[],
                        help="a quarantined message (repeat)")
    parser.add_argument("--all", action="store_true", help="retry or drop every quarantined message")
    parser.add_argument("--limit", type=int, default=1000, help="list at most this many (default 1000)")
    parser.add_argument("--payload", action="store_true", help="list: print each payload too")
    return parser


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str]) -> int:
    from edge.spool import Spool

    args = build_parser().parse_args(argv)
    path = args.spool or os.environ.get("FC_EDGE_SPOOL_PATH") or EdgeSettings.spool_path
    if not Path(path).is_file():
        print(f"firstcare edge quarantine: no spool at {path} (set --spool or FC_EDGE_SPOOL_PATH)", file=sys.stderr)
        return 2
    if args.action != "list" and not (args.ids or args.all):
        print(f"firstcare edge quarantine {args.action}: name messages with --id N (repeat) or say --all",
              file=sys.stderr)
        return 2
    spool = Spool(path, 0, 0)
    try:
        if args.action == "list":
            items = spool.quarantined(max(1, args.limit))
            for q in items:
                print(f"{q.id}\t{_when(q.quarantined_ms)}\t{q.reason}\t{q.topic}\t{q.size} bytes\t{q.detail}")
                if args.payload:
                    print(f"\t{q.payload.decode('utf-8', 'replace')}")
            summary = spool.quarantine_summary()
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary["reasons"].items()))
            print(f"{summary['depth']} quarantined" + (f" ({reasons})" if reasons else ""))
            return 0
        ids = None if args.all else args.ids
        if args.action == "retry":
            print(f"{spool.retry_quarantined(ids)} moved back to the spool, to be sent again")
        else:
            print(f"{spool.drop_quarantined(ids)} dropped")
        return 0
    finally:
        spool.close()
