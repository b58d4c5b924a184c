"""The control vector store: list, download, register (upload) and delete named vectors, per tenant or global.

A vector is uploaded as a file, GGUF (llama.cpp / repeng control vectors) or safetensors (`direction.N` tensors),
told apart by its magic bytes: as the raw body (`Content-Type: application/octet-stream`) or as the multipart
field `file`; or as JSON `{"data": {"<layer>": [floats]}, "model_hint": "..."}`. It is checked against the
served model (hidden size, layer count, finite and non-zero values) before it is stored; a failed check is a 400
naming it. `GET ...?format=gguf|safetensors` returns the file, `?format=json` the values too.
"""
from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request, Response

from steerserve.server.stores.vectors import StoredVector, validate_vector_name
from steerserve.steering.control_vectors import ControlVector, VectorError
from steerserve.steering.model import ModelFacts
from steerserve.steering.vector_files import FORMATS, VectorFileError, read_vector, to_bytes

from ..body import JSONRoute, described, parse_json
from ..errors import APIError, BadRequest, NotFound
from ..state import Caller, State, owner_of

router = APIRouter(route_class=JSONRoute, tags=["steering"])

# The largest upload accepted, in bytes, whatever its form: 16 MiB holds an fp32 vector for every layer of an
# 80-layer, 16k-wide model (80 * 16384 * 4 = 5 MiB) three times over, in any of the three encodings' overhead.
MAX_VECTOR_UPLOAD_BYTES = 16 << 20
OCTET_STREAM, MULTIPART, JSON_TYPE = "application/octet-stream", "multipart/form-data", "application/json"
MEDIA_TYPES = {"gguf": OCTET_STREAM, "safetensors": OCTET_STREAM}

VECTOR_BODY = described(
    {OCTET_STREAM: {"schema": {"type": "string", "format": "binary",
                               "description": "A GGUF control vector or a safetensors file of direction.N tensors "
                                              "(the format is told by its first bytes)."}},
     MULTIPART: {"schema": {"type": "object", "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}}}},
     JSON_TYPE: {"schema": {"type": "object", "required": ["data"], "properties": {
         "data": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "number"}},
                  "description": "{0-based decoder layer: direction}"},
         "model_hint": {"type": "string"}}}}},
    f"The vector, at most {MAX_VECTOR_UPLOAD_BYTES} bytes.")


class PayloadTooLarge(APIError):
    status = 413


class UnsupportedMediaType(APIError):
    status = 415


def not_found(name: str, param: str = "name") -> NotFound:
    return NotFound(f"steering vector '{name}' not found", param=param, code="vector_not_found")


def model_sizes(facts: ModelFacts) -> tuple[int, int]:
    """(hidden size, decoder layers) of the served model, as vectors are checked against."""
    return int((facts.extra.get("vectors") or {}).get("hidden_size", 0)), facts.num_layers  # methods/vectors.py


def check_vector(vector: ControlVector, facts: ModelFacts, param: str = "file") -> None:
    """400 naming the failed check unless `vector` fits the served model."""
    hidden, layers = model_sizes(facts)
    try:
        vector.check(hidden, layers)
    except VectorError as exc:
        raise BadRequest(f"the vector fails the '{exc.check}' check: {exc.reason}", param=param,
                         code="invalid_vector") from None


@router.get("/v1/steering/vectors")
async def list_vectors(who: Caller, state: State) -> dict:
    return {"object": "list", "data": [r.public() for r in state.vectors.list(who.tenant)]}


@router.get("/v1/steering/vectors/{name}", response_model=None)
async def get_vector(name: str, who: Caller, state: State, scope: str | None = None,
                     format: str | None = None) -> dict | Response:
    """The vector's metadata; with `format=json` its values too, with `format=gguf|safetensors` the file."""
    validate_vector_name(name)
    if format not in (None, "json", *FORMATS):
        raise BadRequest(f"format must be one of json, {', '.join(FORMATS)}", param="format", code="invalid_value")
    found = state.vectors.resolve(who.tenant, name) if scope is None else \
        state.vectors.get(owner_of(who, scope, writing=False, what="vectors"), name)
    if found is None:
        raise not_found(name)
    record, vector = found
    if format in FORMATS:
        try:
            data = to_bytes(vector, format)
        except VectorFileError as exc:
            raise BadRequest(exc.reason, param="format", code="invalid_value") from None
        return Response(data, media_type=MEDIA_TYPES[format], headers={
            "Content-Disposition": f'attachment; filename="{name}.{format}"', "X-Vector-Digest": record.digest})
    body = record.public()
    if format == "json":
        body["data"] = {str(layer): vector.directions[layer].tolist() for layer in vector.layers}
    return body


@router.put("/v1/steering/vectors/{name}", openapi_extra=VECTOR_BODY)
async def put_vector(request: Request, name: str, who: Caller, state: State, scope: str = "tenant") -> dict:
    """Register (or replace) a vector, checked against the served model first."""
    validate_vector_name(name)
    owner = owner_of(who, scope, writing=True, what="vectors")
    facts = state.ready_engine().facts
    vector = await _uploaded_vector(request)
    check_vector(vector, facts)
    record: StoredVector = state.vectors.put(owner, name, vector)
    return record.public()


@router.delete("/v1/steering/vectors/{name}")
async def delete_vector(name: str, who: Caller, state: State, scope: str = "tenant") -> dict:
    validate_vector_name(name)
    if not state.vectors.delete(owner_of(who, scope, writing=True, what="vectors"), name):
        raise not_found(name)
    return {"name": name, "deleted": True}


async def _uploaded_vector(request: Request) -> ControlVector:
    raw = await read_bounded(request, MAX_VECTOR_UPLOAD_BYTES)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == MULTIPART:
        data = await _multipart_file(request, raw)
    elif media == JSON_TYPE:
        return _json_vector(parse_json(raw, "the vector"))
    elif media in (OCTET_STREAM, ""):
        data = raw
    else:
        raise UnsupportedMediaType(f"send the vector as {OCTET_STREAM}, as the {MULTIPART} field 'file', or as "
                                   f"{JSON_TYPE}; got {media!r}", param="content-type", code="unsupported_media_type")
    if not data:
        raise BadRequest("the upload is empty", param="file", code="invalid_vector")
    try:
        return read_vector(data)
    except VectorFileError as exc:
        raise BadRequest(f"the vector fails the 'format' check: {exc.reason}", param="file",
                         code="invalid_vector") from None


async def read_bounded(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to exceed `limit` bytes (from Content-Length, else while
    reading); the body is then cached on the request, so `request.form()` can parse it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {limit}", param="file",
                              code="upload_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes", param="file",
                                  code="upload_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    request._body = raw  # what Request.stream() and .form() read from once set
    return raw


async def _multipart_file(request: Request, raw: bytes) -> bytes:
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as exc:  # starlette: MultiPartException / HTTPException on malformed or oversized forms
        raise BadRequest(f"malformed multipart body: {getattr(exc, 'detail', exc)}", param="file",
                         code="invalid_vector") from None
    try:
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            raise BadRequest("the multipart body has no file field 'file'", param="file", code="invalid_vector")
        return await upload.read()
    finally:
        await form.close()


def _json_vector(body: Any) -> ControlVector:
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise BadRequest('expected {"data": {"<layer>": [floats, ...]}, "model_hint": "..."}', param="data",
                         code="invalid_vector")
    unknown = sorted(set(body) - {"data", "model_hint"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", param=unknown[0], code="invalid_value")
    hint = body.get("model_hint", "")
    if not isinstance(hint, str):
        raise BadRequest("model_hint must be a string", param="model_hint", code="invalid_value")
    directions = {}
    for key, values in body["data"].items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 6):
            raise BadRequest(f"layer {key!r} is not a 0-based decoder layer number", param=f"data.{key}",
                             code="invalid_value")
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise BadRequest("must be a non-empty list of finite numbers", param=f"data.{key}", code="invalid_value")
        directions[int(key)] = values
    if not directions:
        raise BadRequest("the vector has no layers", param="data", code="invalid_vector")
    if len({len(v) for v in directions.values()}) > 1:
        raise BadRequest("the layers' directions differ in length", param="data", code="invalid_vector")
    return ControlVector.of(directions, hint)
