"""``dicomflow serve``: the registered model behind MLflow's scoring app, verified first and bounded.

    dicomflow serve [--model models:/NAME@champion] [--host 127.0.0.1] [--port 5001] [limits...]

What it does, in order (:func:`serve`):

1. downloads the model version and verifies its signature over the downloaded files
   (:func:`dicomflow.signing.download_verified`) before any of its code is loaded: loading an
   MLflow pyfunc runs its code;
2. loads that verified local copy, which must be a :class:`~dicomflow.serving.pyfunc.DicomClassifier`,
   bounds its decoding (:meth:`~dicomflow.serving.pyfunc.DicomClassifier.limit_decoding`) and starts
   its decoder processes and Keras call;
3. serves MLflow's scoring app (``mlflow.pyfunc.scoring_server.init``: ``/ping``, ``/health``,
   ``/version``) inside :class:`Guard`, an ASGI middleware that answers ``/invocations`` itself in
   MLflow's scoring protocol (the four JSON forms, ``{"predictions": [...]}`` as MLflow writes it):
   it caps the body (413) and the files (413), reads the request's table (:func:`request_table`),
   answers every refusal with one JSON line of its own words (never a piece of the request), and
   with a token set, wants ``Authorization: Bearer <token>``.

Why the middleware reads the JSON and not MLflow's app: MLflow's parsing of a one-file request
(pandas, schema, base64) took about 12 of the 30 ms a request cost, under the GIL, which alone
held 8 clients near twice one client's throughput; MLflow's errors also quote the request.

Concurrency: one process; each request is predicted in a thread, the classifier decodes files
in a set of decoder processes without a lock around them and scores the images of concurrent
requests in one Keras call (``DecoderSet``, ``BatchScorer`` in ``pyfunc.py``). Measured with
``bench/serving.py``; see ``docs/security/serving-limits.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import io
import ipaddress
import json
import logging
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from dicomflow.errors import SettingsError

logger = logging.getLogger(__name__)

TOKEN_ENV = "DICOMFLOW_SERVE_TOKEN"  # the bearer token clients must send; never a command-line argument
TOKEN_MIN_CHARS = 32
# The forms MLflow's scoring server takes as JSON (mlflow/pyfunc/scoring_server), each a table of rows.
FORMS = ("dataframe_split", "dataframe_records", "inputs", "instances")
COLUMNS = ("dicom", "path")
OPEN_PATHS = ("/ping", "/health")  # health checks answer without a token: they say nothing of the model
HOW_TO = ('send {"dataframe_split": {"columns": ["dicom"], "data": [["<the file in base64>"]]}} as '
          "`dicomflow request FILE > request.json` writes it")

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    """What one request may cost the server; each has a ``dicomflow serve`` option of its name.

    Parameters
    ----------
    max_body_mib : int, default 64
        Largest request body (413 above). base64 makes a file 4/3 larger: 64 MiB carries a
        48 MiB file, more than a chest radiograph or CT slice; bigger studies go by ``path``
        under ``DICOMFLOW_SERVING_ROOT``. Bodies are held in memory while parsed (about 3 times
        their size with MLflow's DataFrame), so this times ``max_requests`` bounds that memory.
    max_files : int, default 64
        Rows per request (413 above): one Keras batch (``PREDICT_BATCH``); a request of more
        would hold the decoders longer than the other clients should wait.
    max_decoded_mib : int, default 256
        A file larger than this, inflating (deflate) to more, or decoding to more working
        pixels is answered ``too_large`` before the work: 256 MiB holds a 4096 x 4096 image in
        float32 four times over, while the 2,048 MiB that ingest allows took 36 s and 7 GiB per file.
        At most ``decoders`` files decode at once, so this bounds decoding memory.
    decode_timeout_s : float, default 30
        A file still decoding after this long is answered ``timeout`` (its decoder is replaced).
        Below ``request_timeout_s``, so that such a file costs its row, never the answer.
    request_timeout_s : float, default 60
        MLflow's own request timeout (504 after it); also the time a client has to send its body.
    decoders : int, default 0
        Decoder processes; 0: the cores this process may use (at least 2).
    max_requests : int, default 32
        Requests in progress at once (per worker); uvicorn answers 503 beyond.
    workers : int, default 1
        Server processes, each with its own copy of the model and its decoders. Parsing, base64
        and the answer's JSON run under one process's GIL: more workers use more cores, at the
        cost of the model's memory per worker and of Keras batches shared only within a worker.
    """

    max_body_mib: int = 64
    max_files: int = 64
    max_decoded_mib: int = 256
    decode_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    decoders: int = 0
    max_requests: int = 32
    workers: int = 1

    def __post_init__(self) -> None:
        for name in ("max_body_mib", "max_files", "max_decoded_mib", "max_requests", "workers"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        if self.decoders < 0:
            raise SettingsError(f"--decoders must be 0 (every core) or more; got {self.decoders}")
        if not 0 < self.decode_timeout_s < self.request_timeout_s:
            raise SettingsError(f"--decode-timeout-s must be above 0 and below --request-timeout-s "
                                f"({self.request_timeout_s:g}), so that a slow file costs its row and not the "
                                f"answer; got {self.decode_timeout_s:g}")

    @property
    def max_body_bytes(self) -> int:
        return self.max_body_mib << 20

    def decoder_processes(self) -> int:
        return self.decoders or max(2, len(os.sched_getaffinity(0)))


class Refusal(Exception):
    """A request answered with ``status`` and one line, before MLflow sees it."""

    def __init__(self, status: int, code: str, line: str) -> None:
        super().__init__(line)
        self.status, self.code, self.line = status, code, line


def error_body(code: str, line: str) -> bytes:
    """The JSON of every refusal: MLflow's shape (``error_code``, ``message``), one line."""
    return json.dumps({"error_code": code, "message": line}).encode()


# What a client is told for errors of MLflow's app (other paths) and of prediction: MLflow's own
# messages repeat the request (a DataFrame's repr, the content type), so they are never sent.
INNER_ERRORS = {
    400: ("BAD_REQUEST", "the request's values do not fit the model's input: 'dicom' values must be base64 text "
                         f"of a DICOM file and 'path' values text; {HOW_TO}"),
    415: ("UNSUPPORTED_MEDIA_TYPE", "send the request as Content-Type: application/json (UTF-8)"),
    504: ("TIMEOUT", "the request took longer than the server's time limit (--request-timeout-s); send fewer "
                     "files per request"),
}
INTERNAL = ("INTERNAL_ERROR", "the server failed on this request; its log says why (nothing of the request is "
                              "repeated here)")


def request_table(body: Any, *, max_files: int) -> pd.DataFrame:
    """The rows of a parsed scoring request as the model's input, or :class:`Refusal` saying what
    is wrong with it (never quoting it).

    Reads the four JSON forms of MLflow's scoring protocol (:data:`FORMS`) for the model's two
    columns, as MLflow's scoring server does, and keeps the values as sent: a ``dicom`` value is
    base64 text, which the model decodes (``pyfunc.dicom_content``). Columns of other names are
    ignored, as MLflow ignores what the signature does not name.
    """
    if not isinstance(body, dict):
        raise Refusal(400, "BAD_REQUEST", f"the request must be a JSON object with one of the keys "
                                          f"{', '.join(FORMS)}; {HOW_TO}")
    forms = [key for key in FORMS if key in body]
    if len(forms) != 1:
        got = "none of them" if not forms else f"{len(forms)} of them"
        raise Refusal(400, "BAD_REQUEST", f"the request must hold exactly one of the keys {', '.join(FORMS)}; "
                                          f"got {got}; {HOW_TO}")
    form, table = forms[0], body[forms[0]]
    columns: dict[str, list] | None = None
    if form == "dataframe_split" and isinstance(table, dict) and isinstance(table.get("columns"), list) \
            and isinstance(table.get("data"), list) and all(isinstance(row, list) for row in table["data"]):
        names = table["columns"]
        if any(len(row) != len(names) for row in table["data"]):
            raise Refusal(400, "BAD_REQUEST", f"each row of 'dataframe_split' must hold one value per column "
                                              f"({len(names)}); {HOW_TO}")
        columns = {name: [row[i] for row in table["data"]] for i, name in enumerate(names) if name in COLUMNS}
        rows = len(table["data"])
    elif form in ("dataframe_records", "instances") and isinstance(table, list) \
            and all(isinstance(row, dict) for row in table):
        present = [name for name in COLUMNS if any(name in row for row in table)]
        columns = {name: [row.get(name) for row in table] for name in present}
        rows = len(table)
    elif form in ("inputs", "instances") and isinstance(table, dict) \
            and all(isinstance(value, list) for value in table.values()):
        columns = {name: value for name, value in table.items() if name in COLUMNS}
        rows = max((len(value) for value in table.values()), default=0)
        if any(len(value) != rows for value in columns.values()):
            raise Refusal(400, "BAD_REQUEST", f"the lists under {form!r} must all have one value per file; {HOW_TO}")
    elif form == "inputs" and isinstance(table, list):  # values without a column name
        columns, rows = {}, len(table)
    if columns is None:
        raise Refusal(400, "BAD_REQUEST", f"the request's {form!r} is not a table of rows in a form the server "
                                          f"reads; {HOW_TO}")
    if not columns:
        raise Refusal(400, "BAD_REQUEST", "the model needs a 'dicom' column (the DICOM file's bytes, base64 in "
                                          "JSON) or a 'path' column (a file under DICOMFLOW_SERVING_ROOT on the "
                                          f"machine that runs the model); got neither; {HOW_TO}")
    if rows > max_files:
        raise Refusal(413, "REQUEST_TOO_LARGE", f"the request holds {rows} files, more than the server's "
                                                f"--max-files {max_files}; send them in several requests")
    for name, values in columns.items():
        if not all(value is None or isinstance(value, str) for value in values):
            raise Refusal(400, "BAD_REQUEST", f"every {name!r} value must be text ("
                                              + ("the file's bytes in base64" if name == "dicom" else
                                                 "a path under DICOMFLOW_SERVING_ROOT") + f") or null; {HOW_TO}")
    return pd.DataFrame(columns, index=pd.RangeIndex(rows))


class Guard:
    """ASGI middleware around MLflow's scoring app: token, body cap, request form, error shape.

    Parameters
    ----------
    app : ASGI application
        ``mlflow.pyfunc.scoring_server.init(model)``: every path but ``/invocations``.
    predict : callable
        The model on a request's table (``DicomClassifier.predict``): a DataFrame of its answers.
    limits : ServingLimits
    token : str or None
        When set, every path but :data:`OPEN_PATHS` wants ``Authorization: Bearer <token>`` (401).

    Notes
    -----
    For ``/invocations`` the body is read here, at most ``limits.max_body_mib`` (413 as soon as a
    ``Content-Length`` or the bytes received say more), within ``limits.request_timeout_s``
    (408), then parsed (:func:`request_table`) and predicted by ``predict`` in a thread (504
    after ``limits.request_timeout_s``). Other paths go to ``app``; any error it answers is
    replaced by one line of :data:`INNER_ERRORS`: MLflow's own messages quote the request.
    """

    def __init__(self, app: ASGIApp, *, predict: Callable[[pd.DataFrame], pd.DataFrame], limits: ServingLimits,
                 token: str | None = None) -> None:
        self.app, self.predict, self.limits, self.token = app, predict, limits, token

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._authenticate(scope)
            if scope["path"] != "/invocations":
                await self.app(scope, receive, _errors_replaced(send))
                return
            if scope.get("method") != "POST":
                raise Refusal(405, "METHOD_NOT_ALLOWED", "use POST for /invocations")
            body = await self._body(scope, receive)
            table = self._table(scope, body)
            del body
            answer = await self._predict(table)
        except Refusal as refusal:
            await _answer(send, refusal.status, error_body(refusal.code, refusal.line),
                          extra=[(b"www-authenticate", b"Bearer")] if refusal.status == 401 else [])
            return
        await _answer(send, 200, answer)

    async def _predict(self, table: pd.DataFrame) -> bytes:
        """The model's answer as MLflow's scoring server writes it (``{"predictions": [...]}``), in a
        thread (the decoders and Keras work outside the event loop), within the request time limit."""
        from mlflow.pyfunc.scoring_server import predictions_to_json

        def predict() -> bytes:
            output = io.StringIO()
            predictions_to_json(self.predict(table), output)
            return output.getvalue().encode()

        try:
            return await asyncio.wait_for(asyncio.to_thread(predict), timeout=self.limits.request_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise Refusal(504, *INNER_ERRORS[504]) from None
        except Exception as err:  # noqa: BLE001  the client gets one line; the log the type
            logger.error("prediction failed (%s); the client was told: %s", type(err).__name__, INTERNAL[1])
            raise Refusal(500, *INTERNAL) from None

    def _authenticate(self, scope: dict) -> None:
        if self.token is None or scope["path"] in OPEN_PATHS:
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        expected = f"Bearer {self.token}".encode()
        if not hmac.compare_digest(given, expected):
            raise Refusal(401, "UNAUTHENTICATED", "this server wants 'Authorization: Bearer <token>' with the token "
                                                  f"it was started with ({TOKEN_ENV})")

    async def _body(self, scope: dict, receive: Callable) -> bytes:
        cap = self.limits.max_body_bytes
        too_large = Refusal(413, "REQUEST_TOO_LARGE", f"the request body is larger than the server's "
                                                      f"--max-body-mib {self.limits.max_body_mib}; send fewer files "
                                                      "per request, or large files by path under "
                                                      "DICOMFLOW_SERVING_ROOT")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise too_large  # refused before a byte of it is read
        parts, size = [], 0

        async def read_all() -> None:
            nonlocal size
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise Refusal(400, "BAD_REQUEST", "the client closed the connection before the body ended")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > cap:
                    raise too_large
                parts.append(chunk)
                if not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(read_all(), timeout=self.limits.request_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise Refusal(408, "REQUEST_TIMEOUT", f"the request body did not arrive within "
                                                  f"{self.limits.request_timeout_s:g} s") from None
        return b"".join(parts)

    def _table(self, scope: dict, body: bytes) -> pd.DataFrame:
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            raise Refusal(415, *INNER_ERRORS[415])
        try:
            parsed = json.loads(body)
        except UnicodeDecodeError:
            raise Refusal(400, "BAD_REQUEST", "the request body is not UTF-8 text; send JSON") from None
        except json.JSONDecodeError as err:
            # err.msg names the problem ("Expecting ',' delimiter") without quoting the document.
            raise Refusal(400, "BAD_REQUEST", f"the request body is not valid JSON: {err.msg} at line {err.lineno} "
                                              f"column {err.colno}; {HOW_TO}") from None
        except RecursionError:
            raise Refusal(400, "BAD_REQUEST", "the request body nests JSON deeper than can be read") from None
        return request_table(parsed, max_files=self.limits.max_files)


def _errors_replaced(send: Callable) -> Callable:
    """A ``send`` that passes successful answers through and replaces an error's body by one line."""
    state: dict[str, Any] = {}

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                state["pass"] = True
                await send(message)
            else:
                state["status"] = message["status"]
            return
        if state.get("pass") or message["type"] != "http.response.body":
            await send(message)
            return
        if message.get("more_body", False):
            return  # the error's own body is dropped, whatever its length
        status = state["status"]
        if status == 404:
            code, line = "NOT_FOUND", "no such endpoint: POST /invocations scores, GET /ping checks"
        elif status == 405:
            code, line = "METHOD_NOT_ALLOWED", "no such method for this endpoint"
        else:
            code, line = INNER_ERRORS.get(status, INTERNAL)
        if status >= 500 and status != 504:
            logger.error("MLflow's scoring app answered %d; the client was told: %s", status, line)
        await _answer(send, status, error_body(code, line))

    return wrapped


async def _answer(send: Callable, status: int, body: bytes, *, extra: list | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:  # a name: loopback only when every address it resolves to is
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            return False
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def token_from_env(environ: Mapping[str, str], *, host: str) -> str | None:
    """The bearer token from :data:`TOKEN_ENV`; SettingsError when binding beyond loopback without one,
    or when it is too short to resist guessing."""
    token = environ.get(TOKEN_ENV, "")
    if token and len(token) < TOKEN_MIN_CHARS:
        raise SettingsError(f"{TOKEN_ENV} must be at least {TOKEN_MIN_CHARS} characters; got {len(token)}; make one "
                            "with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    if not token and not is_loopback(host):
        raise SettingsError(f"refusing to serve on --host {host} without authentication: anyone who can reach it "
                            f"could use the model; set {TOKEN_ENV} (clients then send 'Authorization: Bearer "
                            "<token>'), or serve on 127.0.0.1 behind your own authenticating proxy")
    return token or None


def build_app(model: Any, *, limits: ServingLimits, token: str | None = None) -> Guard:
    """MLflow's scoring app for the loaded ``model`` (a pyfunc holding a DicomClassifier), its
    decoding bounded and started, inside :class:`Guard`."""
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.pyfunc import scoring_server

    from dicomflow.serving.pyfunc import DicomClassifier

    classifier = model.unwrap_python_model()
    if not isinstance(classifier, DicomClassifier):
        raise SettingsError(f"the model is a {type(classifier).__name__}, not dicomflow's DicomClassifier: "
                            "dicomflow serve serves the models the pipeline registers")
    classifier.limit_decoding(max_decoded_mib=limits.max_decoded_mib, timeout_s=limits.decode_timeout_s,
                              processes=limits.decoder_processes(),
                              setting="the server's --max-decoded-mib")
    classifier.warm_up()
    # Read by init(): MLflow answers 504 after this long.
    os.environ[MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name] = str(int(limits.request_timeout_s))
    app = scoring_server.init(model)  # /ping, /health, /version; sets MLflow's serving flag
    return Guard(app, predict=lambda table: classifier.predict(None, table), limits=limits, token=token)


# How serve_folder tells its worker processes (--workers > 1) what to load: uvicorn starts them
# from an import string, so the folder (already verified), the limits and the token go by environment.
WORKER_FOLDER_ENV = "DICOMFLOW_SERVE_WORKER_FOLDER"
WORKER_LIMITS_ENV = "DICOMFLOW_SERVE_WORKER_LIMITS"


def worker_app() -> Guard:
    """The app of one worker process (uvicorn's factory when ``limits.workers`` > 1)."""
    import mlflow

    limits = ServingLimits(**json.loads(os.environ[WORKER_LIMITS_ENV]))
    model = mlflow.pyfunc.load_model(os.environ[WORKER_FOLDER_ENV])
    return build_app(model, limits=limits, token=os.environ.get(TOKEN_ENV) or None)


def serve_folder(folder: Path, *, host: str, port: int, limits: ServingLimits, token: str | None) -> None:
    """Load the model in ``folder`` (already verified) and serve it until interrupted."""
    import uvicorn

    from mlflow.models import Model

    from dicomflow.serving.pyfunc import describe_privacy, describe_task

    metadata = Model.load(str(folder)).metadata
    logger.info("the model: %s", describe_task(metadata))
    logger.info("the model's privacy: %s", describe_privacy(metadata))
    logger.info("serving on http://%s:%d/invocations (%s, %d worker(s) with %d decoder processes each, %s)",
                host, port, "bearer token required" if token else "no token: loopback only", limits.workers,
                limits.decoder_processes(),
                ", ".join(f"{name} {value}" for name, value in dataclasses.asdict(limits).items()))
    options = {"host": host, "port": port, "limit_concurrency": limits.max_requests, "timeout_keep_alive": 5,
               "log_level": "info"}
    if limits.workers == 1:
        import mlflow

        uvicorn.run(build_app(mlflow.pyfunc.load_model(str(folder)), limits=limits, token=token), **options)
        return
    os.environ[WORKER_FOLDER_ENV] = str(folder)
    os.environ[WORKER_LIMITS_ENV] = json.dumps(dataclasses.asdict(limits))
    if token:
        os.environ[TOKEN_ENV] = token
    uvicorn.run("dicomflow.serving.server:worker_app", factory=True, workers=limits.workers, **options)


def serve(model_uri: str, *, host: str, port: int, limits: ServingLimits, environ: Mapping[str, str]) -> None:
    """``dicomflow serve``: check the binding, download and verify ``model_uri``, then serve it.

    Raises
    ------
    SettingsError
        A non-loopback ``host`` without :data:`TOKEN_ENV`, a short token, no verification key.
    dicomflow.signing.SignatureError
        The model is unsigned, altered or signed with another key: nothing of it was loaded.
    """
    from dicomflow import signing

    token = token_from_env(environ, host=host)  # before anything is downloaded
    key = signing.verify_key_from_env(environ)
    with tempfile.TemporaryDirectory(prefix="dicomflow-serve-") as folder:
        local = signing.download_verified(model_uri, Path(folder), key=key)
        logger.info("verified the signature of %s", model_uri)
        serve_folder(local, host=host, port=port, limits=limits, token=token)
