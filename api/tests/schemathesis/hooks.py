"""schemathesis hooks for api/tests/it/schemathesis.rs.

`POST /v1/documents/batch` takes NDJSON: its OpenAPI body is the array of
lines, each an `UploadRequest`; the serializer sends one JSON value per line
(a body that is no array is one line). The batch answers 200 with each
line's outcome, so refusing what the schema forbids happens line by line:
`batch_lines_judged_by_their_schema` checks every outcome against the
line's own verdict under the `UploadRequest` schema.
"""

import json

import jsonschema_rs
import schemathesis

BATCH = ("POST", "/v1/documents/batch")

# Refusals of a line the schema allows: rules of the account and its care
# teams, and the batch's size limits (send the line again in another batch).
RULES = {
    "unknown_care_team",
    "care_team_forbidden",
    "care_team_not_bound",
    "missing_lawful_basis",
    "too_many_lines",
    "batch_too_large",
    "line_too_large",
}


def lines(body):
    if body is None:
        return []
    return body if isinstance(body, list) else [body]


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if value is None:
        return None
    return "".join(json.dumps(line) + "\n" for line in lines(value)).encode()


_validators = {}


def line_validator(case):
    schema = case.operation.schema.raw_schema
    key = id(schema)
    if key not in _validators:
        upload = dict(schema["components"]["schemas"]["UploadRequest"])
        _validators[key] = jsonschema_rs.Draft202012Validator(upload, validate_formats=True)
    return _validators[key]


@schemathesis.check
def batch_lines_judged_by_their_schema(ctx, response, case):
    if (case.method.upper(), case.operation.path) != BATCH or response.status_code != 200:
        return None
    validator = line_validator(case)
    outcomes = {o["line"]: o for o in response.json()["outcomes"]}
    for number, line in enumerate(lines(case.body), start=1):
        outcome = outcomes.get(number)
        assert outcome is not None, f"line {number} has no outcome"
        if not validator.is_valid(line):
            assert outcome["outcome"] == "rejected", (
                f"line {number} breaks the UploadRequest schema and was {outcome['outcome']}"
            )
        elif outcome["outcome"] == "rejected":
            assert outcome["code"] in RULES, (
                f"line {number} fits the UploadRequest schema and was rejected: {outcome['code']}"
            )
    return None
