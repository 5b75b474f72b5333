"""A small seeded, schema-based fuzzer for the Serve API: bodies derived from the request models in /openapi.json.

Each case is (method, path, headers, raw body). Most start from a valid instance of a route's
request schema and break one thing: a field's type, a bound (one past minItems, maxItems,
maxLength, minimum, maximum), a required key, an extra key (ASCII, non-ASCII, a lone surrogate);
others are random JSON of any shape (deep nesting, huge numbers, odd strings), raw bytes, a
wrong Content-Type, or another method and path.
"""

from __future__ import annotations

import json
import random
from typing import Any

ODD_STRINGS = ["", " ", "\t\n", "\ud800", "a\udfffb", "\u00e9", "\u202e", "\x00", "\U0001f600" * 3, "x" * 5000,
               "null", "{}", "../../etc/passwd", "%s%n", "\u3000"]
ODD_NUMBERS = [0, -1, 1, 2**31, -(2**63), 2**64, 1.5, -0.0, 1e308, True, False]


def resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def valid_instance(spec: dict, schema: dict, rng: random.Random) -> Any:
    schema = resolve(spec, schema)
    kind = schema.get("type")
    if "anyOf" in schema:
        return valid_instance(spec, rng.choice(schema["anyOf"]), rng)
    if kind == "object":
        out = {}
        for name, sub in schema.get("properties", {}).items():
            if name in schema.get("required", []) or rng.random() < 0.5:
                out[name] = valid_instance(spec, sub, rng)
        return out
    if kind == "array":
        low, high = schema.get("minItems", 0), min(schema.get("maxItems", 4), 4)
        return [valid_instance(spec, schema.get("items", {}), rng) for _ in range(rng.randint(low, max(low, high)))]
    if kind == "string":
        words = ["show", "flights", "boston", "denver", "Peter", "visited", "Brussels", "cheap", "fare"]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        return text[: schema.get("maxLength", len(text))] or "a"
    if kind == "integer":
        return rng.randint(schema.get("minimum", 0), schema.get("maximum", 10))
    if kind == "number":
        return rng.uniform(0, 1)
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def random_json(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([None, rng.choice(ODD_NUMBERS), rng.choice(ODD_STRINGS), rng.randint(-5, 5)])
    if roll < 0.6:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(ODD_STRINGS + ["texts", "max_layers", "k"]): random_json(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def boundary_mutations(spec: dict, schema: dict, rng: random.Random) -> list[Any]:
    """Values one step outside each bound the schema states, and values of the wrong type."""
    schema = resolve(spec, schema)
    out: list[Any] = [random_json(rng)]
    if "maxItems" in schema:
        out.append(["a"] * (schema["maxItems"] + 1))
    if "minItems" in schema:
        out.append(["a"] * max(0, schema["minItems"] - 1))
    if "maxLength" in schema:
        out.append("y" * (schema["maxLength"] + 1))
    if "minLength" in schema:
        out.append("")
    if "maximum" in schema:
        out.append(schema["maximum"] + 1)
    if "minimum" in schema:
        out.append(schema["minimum"] - 1)
    if schema.get("type") == "array" and "items" in schema:
        for bad in boundary_mutations(spec, schema["items"], rng):
            out.append([bad])
    return out


def encode(value: Any, rng: random.Random) -> bytes:
    text = json.dumps(value)  # ASCII with escapes, lone surrogates included
    if rng.random() < 0.2:
        return text.encode("utf-8", "surrogatepass")  # the same as raw (invalid) UTF-8 bytes
    return text.encode()


def cases(spec: dict, count: int, seed: int) -> list[tuple[str, str, dict, bytes]]:
    rng = random.Random(seed)
    routes = {}
    for path, methods in spec["paths"].items():
        post = methods.get("post")
        if post and "requestBody" in post:
            routes[path] = post["requestBody"]["content"]["application/json"]["schema"]
    json_type = {"Content-Type": "application/json"}
    out = []
    for _ in range(count):
        path = rng.choice(sorted(routes))
        schema = resolve(spec, routes[path])
        roll = rng.random()
        body = valid_instance(spec, schema, rng)
        headers = dict(json_type)
        method = "POST"
        if roll < 0.45:  # one property broken
            name = rng.choice(sorted(schema["properties"]))
            body[name] = rng.choice(boundary_mutations(spec, schema["properties"][name], rng))
            raw = encode(body, rng)
        elif roll < 0.55:  # a required key gone, or an extra key
            if rng.random() < 0.5:
                body.pop(rng.choice(schema.get("required", ["texts"])), None)
            else:
                body[rng.choice(ODD_STRINGS + ["extra", "é", "\ud800"])] = random_json(rng)
            raw = encode(body, rng)
        elif roll < 0.7:  # any JSON at all
            raw = encode(random_json(rng), rng)
        elif roll < 0.78:  # deep nesting or huge numbers
            if rng.random() < 0.5:
                depth = rng.choice([100, 1000, 20_000, 50_000])
                raw = b"[" * depth + b"]" * depth
            else:
                digits = rng.choice([20, 4300, 4301, 9000])
                raw = b'{"texts": ["a"], "max_layers": ' + b"9" * digits + b"}"
        elif roll < 0.84:  # not JSON
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        elif roll < 0.9:  # a content type that is not JSON
            raw = encode(body, rng)
            headers = rng.choice([{}, {"Content-Type": "text/plain"}, {"Content-Type": "application/json-seq"},
                                  {"Content-Type": "application/x-www-form-urlencoded"}])
        elif roll < 0.95:  # another method
            raw = encode(body, rng)
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
        else:  # another path
            raw = encode(body, rng)
            path = rng.choice(["/v2/classify", "/v1/classify/extra", "/%2e%2e/etc", "/v1/model", "/docs"])
        out.append((method, path, headers, raw))
    return out
