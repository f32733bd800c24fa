#!/usr/bin/env python3
"""Validates a FHIR R4 Bundle (JSON on stdin) with the maintained
`fhir.resources` library (R4B models: R4's resources as published for R4B),
the Bundle and then each entry's resource with its own model. Prints a
one-line verdict; exit 0 only when valid. Run with the venv that
dev/fhir/setup makes."""
import json
import sys

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle


def main():
    data = json.load(sys.stdin)
    try:
        Bundle.model_validate(data)
        counts = {}
        for entry in data.get("entry", []):
            resource = entry["resource"]
            kind = resource["resourceType"]
            get_fhir_model_class(kind).model_validate(resource)
            counts[kind] = counts.get(kind, 0) + 1
    except Exception as e:  # the library's own validation errors
        print(f"INVALID: {type(e).__name__}: {str(e)[:2000]}")
        sys.exit(1)
    import fhir.resources
    print(f"VALID (fhir.resources {fhir.resources.__version__}, R4B): "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
