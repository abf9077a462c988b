#!/usr/bin/env python3
"""Fail a test run in which tests were skipped for a reason CI can meet.

CI runs as root on a machine where CRIU, chromium and the S3 test server are
installed by set-up: a skip there hides a test that did not run. Only skips
whose reason names something CI never has (a GPU) are allowed.

Usage: check-skips.py JUNIT_XML
"""

import re
import sys
import xml.etree.ElementTree as ET

ALLOWED = re.compile(r"\b(gpu|cuda|nvidia)\b", re.IGNORECASE)


def main(path: str) -> int:
    skipped = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for skip in case.findall("skipped"):
            reason = skip.get("message", "")
            skipped.append((f"{case.get('classname')}::{case.get('name')}", reason))
    refused = [(name, reason) for name, reason in skipped if not ALLOWED.search(reason)]
    for name, reason in skipped:
        print(f"skipped: {name}: {reason}")
    if refused:
        print(f"check-skips: {len(refused)} test(s) skipped for a reason CI can meet; they must run", file=sys.stderr)
        return 1
    print(f"check-skips: {len(skipped)} skipped, all for reasons CI cannot meet")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
