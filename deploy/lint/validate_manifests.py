"""Run `kubernetes-validate --strict` on rendered manifests, and close its one gap.

kubernetes-validate reports a resource whose kind/apiVersion it has no schema for as
a WARN and still exits 0. That is right for the Prometheus Operator's CRDs (their
schemas are not shipped), but the same WARN also hides a typo such as `apps/v2` or
`kind: Deploymnet`. So: its exit code must be 0, every WARN must be about one of the
expected CRDs, and every document in the file must be accounted for. The expected
CRD objects are then validated against their own CRD schemas by validate_crds.mjs.

Usage: validate_manifests.py KUBERNETES_VERSION NODE_MODULES_DIR FILE...
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

# Custom resources the chart may render, whose schemas kubernetes-validate lacks.
EXPECTED_CRDS = {
    ("ServiceMonitor", "monitoring.coreos.com/v1"),
    ("PrometheusRule", "monitoring.coreos.com/v1"),
}
PASSED = re.compile(r"^INFO (?P<file>\S+) passed for resource (?P<kind>[^/]+)/(?P<name>\S+) against")
NO_SCHEMA = re.compile(r"^WARN \S+ Couldn't find schema for kind (?P<kind>\S+) with api version (?P<api>\S+)")


def check(tool: str, version: str, node_modules: str, path: Path) -> list[str]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    proc = subprocess.run(
        [tool, "--strict", "-k", version, str(path)], capture_output=True, text=True, check=False
    )
    out = proc.stdout + proc.stderr
    sys.stdout.write(out)
    problems = []
    if proc.returncode != 0:
        problems.append(f"{path}: kubernetes-validate exited {proc.returncode}")
    passed: list[str] = []
    crds: list[str] = []
    for line in out.splitlines():
        if m := PASSED.match(line):
            passed.append(f"{m['kind']}/{m['name']}")
        elif m := NO_SCHEMA.match(line):
            if (m["kind"], m["api"]) in EXPECTED_CRDS:
                crds.append(m["kind"])
            else:
                problems.append(f"{path}: no schema for {m['kind']} {m['api']}: typo in kind or apiVersion?")
        elif line.startswith(("WARN", "ERROR", "FATAL")):
            problems.append(f"{path}: {line}")
    if len(passed) + len(crds) != len(docs):
        problems.append(
            f"{path}: {len(docs)} documents, but {len(passed)} validated and {len(crds)} expected CRDs"
        )
    custom = [d for d in docs if (d.get("kind"), d.get("apiVersion")) in EXPECTED_CRDS]
    if custom:
        crd = subprocess.run(
            ["node", str(Path(__file__).with_name("validate_crds.mjs")), node_modules],
            input=json.dumps(custom),
            capture_output=True,
            text=True,
            check=False,
        )
        sys.stdout.write(crd.stdout + crd.stderr)
        if crd.returncode != 0:
            problems.append(f"{path}: a Prometheus Operator object does not match its CRD schema")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    tool = str(Path(sys.executable).with_name("kubernetes-validate"))
    problems = [p for f in argv[3:] for p in check(tool, argv[1], argv[2], Path(f))]
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
