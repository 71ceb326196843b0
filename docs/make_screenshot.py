"""Make docs/dashboard.png, the README's picture of the ward dashboard.

    .venv/bin/python docs/make_screenshot.py [--simulate 20] [--warmup 150] [--out docs/dashboard.png]

Starts `firstcare up --simulate N` in a temporary directory on free ports, lets the simulated
patients run long enough for the sparklines to fill and the scenarios to raise alarms, signs in
as a clinician of h1 through the `#token=` link, and saves a screenshot of the ward. Needs
Debian's chromium (see tests/support/browser.py).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from firstcare.auth import mint_token  # noqa: E402
from tests.support.bridge import wait_until  # noqa: E402
from tests.support.brokers import free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulate", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=150, help="seconds of simulated data before the picture")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()

    from playwright.sync_api import expect, sync_playwright

    from tests.support.browser import ARGS, CHROMIUM

    with tempfile.TemporaryDirectory() as tmp:
        http_port, mqtt_port = free_port(), free_port()
        log = Path(tmp) / "up.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "firstcare.cli", "up", "--simulate", str(args.simulate),
                                     "--http-port", str(http_port), "--mqtt-port", str(mqtt_port)],
                                    cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: re.search(r"admin token\s+(\S+)", log.read_text()), timeout=60, what="firstcare up")
            secret = (Path(tmp) / "data" / "jwt-secret").read_text().strip()
            token = mint_token(secret, "dr.ada", "clinician", ("h1",), (), 3600)
            print(f"simulating {args.simulate} patients for {args.warmup:.0f} s ...", flush=True)
            time.sleep(args.warmup)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(f"http://127.0.0.1:{http_port}/#token={token}&hospital=h1")
                expect(page.get_by_test_id("connection")).to_have_text("connected", timeout=20_000)
                expect(page.get_by_test_id("tile-p-001")).to_be_visible(timeout=20_000)
                time.sleep(5)  # the readings of the last minutes, from the REST API
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
