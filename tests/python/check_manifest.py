#!/usr/bin/env python3
"""Validate carrot.json files against docs/carrot.schema.json (JSON Schema 2020-12).

    python tests/python/check_manifest.py SCHEMA MANIFEST...

Prints every violation with its JSON path and exits 1 if there is one.
"""
import json
import sys

import jsonschema


def main() -> int:
    schema_path, *manifests = sys.argv[1:]
    schema = json.load(open(schema_path))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    failed = 0
    for path in manifests:
        for error in sorted(validator.iter_errors(json.load(open(path))), key=lambda e: list(e.path)):
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            print(f"{path}: {where}: {error.message}")
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
