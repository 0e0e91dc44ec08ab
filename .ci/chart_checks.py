"""Checks on the rendered chart that need parsing: RBAC against the operator's API calls, and ScalingDecision
objects against the CRD's openAPIV3Schema.

usage: chart_checks.py RENDERED_DIR API_CALLS_FILE CRD_FILE EXAMPLE...
"""

import glob
import sys

import jsonschema
import yaml


def fail(message):
    print(f"FAILED: {message}")
    sys.exit(1)


def rules_of(path):
    """(group, resource, verb) granted by every Role and ClusterRole in a rendered file."""
    granted = set()
    for document in yaml.safe_load_all(open(path)):
        if not document or document.get("kind") not in ("Role", "ClusterRole"):
            continue
        for rule in document.get("rules", []):
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        if "*" in (group, resource, verb):
                            fail(f"{path}: a wildcard rule {rule}")
                        granted.add((group, resource, verb))
    return granted


def main():
    rendered, calls_file, crd_file, *examples = sys.argv[1:]
    calls = set()
    for line in open(calls_file):
        parts = line.split()
        if len(parts) == 2:  # the core group prints as an empty first field
            parts = [""] + parts
        calls.add(tuple(parts))
    for path in sorted(glob.glob(f"{rendered}/*.yaml")):
        granted = rules_of(path)
        if granted != calls:
            fail(f"{path}: RBAC grants {sorted(granted - calls)} beyond the operator's calls "
                 f"and misses {sorted(calls - granted)}")
        print(f"ok: {path}: RBAC == the operator's {len(calls)} API calls")
    crd = yaml.safe_load(open(crd_file))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for example in examples:
        for document in yaml.safe_load_all(open(example)):
            try:
                jsonschema.validate(document, schema)
            except jsonschema.ValidationError as error:
                fail(f"{example}: {error.message}")
            broken = dict(document, status=dict(document["status"], desiredReplicas="six"))
            try:
                jsonschema.validate(broken, schema)
                fail(f"{example}: the schema accepted desiredReplicas: six")
            except jsonschema.ValidationError:
                pass
            print(f"ok: {example} matches the CRD schema, and a wrong type does not")


main()
