"""A PACS's address, and the credentials and TLS settings the environment gives for it.

An address is a DICOMweb base URL (``https://pacs.example.org/dicom-web``) or a DIMSE peer
(``dicom://AET@HOST:PORT``, ``dicoms://`` for TLS). Credentials and TLS files come from the
environment only (:data:`ENVIRONMENT`), never from an address, ``params.yaml``, MLflow or the command
line, and never appear in a ``repr``, a log line or an error message. Credentials are refused over
plain ``http://`` (or ``dicom://``) to a host that is not loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from dicomflow.errors import DicomflowError, SettingsError

USERNAME_ENV = "DICOMFLOW_PACS_USERNAME"
PASSWORD_ENV = "DICOMFLOW_PACS_PASSWORD"
PASSWORD_FILE_ENV = "DICOMFLOW_PACS_PASSWORD_FILE"
TOKEN_ENV = "DICOMFLOW_PACS_TOKEN"
TOKEN_FILE_ENV = "DICOMFLOW_PACS_TOKEN_FILE"
CA_BUNDLE_ENV = "DICOMFLOW_PACS_CA_BUNDLE"
CLIENT_CERT_ENV = "DICOMFLOW_PACS_CLIENT_CERT"
CLIENT_KEY_ENV = "DICOMFLOW_PACS_CLIENT_KEY"
AE_TITLE_ENV = "DICOMFLOW_AE_TITLE"
DEFAULT_AE_TITLE = "DICOMFLOW"
# Every variable this module reads, with what it is for (docs/pacs.md lists the same).
ENVIRONMENT = {
    USERNAME_ENV: "user name (HTTP basic auth; DIMSE user identity)",
    PASSWORD_ENV: "its password",
    PASSWORD_FILE_ENV: "a file holding the password (instead of the variable)",
    TOKEN_ENV: "a bearer token (HTTP Authorization: Bearer; DIMSE JWT user identity)",
    TOKEN_FILE_ENV: "a file holding the token",
    CA_BUNDLE_ENV: "PEM file of the CAs to trust for https:// and dicoms:// (default: the system's)",
    CLIENT_CERT_ENV: "PEM client certificate for mutual TLS",
    CLIENT_KEY_ENV: "its private key (PEM)",
    AE_TITLE_ENV: f"our calling AE title for DIMSE (default {DEFAULT_AE_TITLE})",
}
DICOMWEB, DIMSE = "dicomweb", "dimse"
DIMSE_DEFAULT_PORT = 104
HTTP_TIMEOUT_S = 60.0
# The most bytes one HTTP answer may carry (a WADO-RS instance, a QIDO-RS page): a peer that sends
# more, or never stops, is cut off there instead of filling this process's memory.
MAX_ANSWER_BYTES = 2 * 1024 ** 3
DIMSE_TIMEOUT_S = 60.0
# Libraries whose INFO and DEBUG records quote UIDs and query keys (dicomweb-client logs every
# URL it fetches; pynetdicom every identifier it sends at DEBUG).
CHATTY_LOGGERS = ("dicomweb_client", "pynetdicom")


class PacsError(DicomflowError):
    """The PACS cannot be reached, or refused us; the message says which and what to do, never a
    credential or a study's identifier."""


class AnswerTooLarge(requests.exceptions.RequestException):
    """An HTTP answer went past :data:`MAX_ANSWER_BYTES` (raised while it is read): a
    ``requests`` failure like a reset connection, so that every caller's handling applies."""


@dataclass(frozen=True)
class PacsAddress:
    """Where a PACS is and how to talk to it; credentials are left out of ``repr`` and ``str``.

    Attributes
    ----------
    kind : str
        ``"dicomweb"`` or ``"dimse"``.
    url : str
        DICOMweb: the service's base URL (empty for DIMSE).
    host, port : str, int
        The peer (for DICOMweb, the URL's).
    called_aet : str
        DIMSE: the PACS's AE title (empty for DICOMweb).
    calling_aet : str
        Ours (``DICOMFLOW_AE_TITLE``, default ``DICOMFLOW``).
    tls : bool
        ``https://`` or ``dicoms://``.
    ca_bundle, client_cert, client_key : Path or None
        TLS files from the environment.
    """

    kind: str
    url: str
    host: str
    port: int
    called_aet: str
    calling_aet: str
    tls: bool
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.kind == DICOMWEB:
            return self.url
        return f"{'dicoms' if self.tls else 'dicom'}://{self.called_aet}@{self.host}:{self.port}"

    @property
    def has_credentials(self) -> bool:
        return bool(self.username or self.password or self.token)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _secret(environ: Mapping[str, str], name: str, file_name: str) -> str | None:
    """A secret from its variable or from the file its ``_FILE`` variable names (not both)."""
    value, path = environ.get(name) or None, environ.get(file_name) or None
    if value and path:
        raise SettingsError(f"both {name} and {file_name} are set; keep one")
    if path is None:
        return value
    try:
        # The mode of the file as opened, so that it cannot change between the check and the read
        # (as dicomflow.signing does for private keys).
        with open(path, "rb") as stream:
            mode = os.fstat(stream.fileno()).st_mode
            if mode & 0o077:
                raise SettingsError(f"{file_name}: the secret's file is open to group or others (mode "
                                    f"{stat.S_IMODE(mode):04o}); run `chmod 600` on it")
            text = stream.read().decode("utf-8")
    except OSError as err:
        raise SettingsError(f"{file_name} names a file that cannot be read ({err.strerror}); "
                            "point it at a readable file holding only the secret") from None
    except UnicodeDecodeError:
        raise SettingsError(f"the file {file_name} names is not UTF-8 text; write the secret into it as text") from None
    secret = text.strip("\r\n")
    if not secret:
        raise SettingsError(f"the file {file_name} names is empty; write the secret into it")
    return secret


def _tls_file(environ: Mapping[str, str], name: str) -> Path | None:
    value = environ.get(name) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise SettingsError(f"{name}={value} is not a file; point it at a PEM file")
    return path


def _ae_title(value: str, what: str) -> str:
    if not value or len(value) > 16 or "\\" in value or not value.isprintable() or value != value.strip():
        raise SettingsError(f"{what} {value!r} is not an AE title: 1 to 16 printable characters, no backslash, "
                            "no leading or trailing space")
    return value


def parse_address(address: str, environ: Mapping[str, str]) -> PacsAddress:
    """'https://host/dicom-web' or 'http://127.0.0.1:8042/dicom-web' -> DICOMweb; 'dicom://AET@host:port'
    (or 'dicoms://' for TLS) -> DIMSE. Credentials and TLS from environ only.

    Parameters
    ----------
    address : str
        The PACS: a DICOMweb base URL, or ``dicom://AET@HOST[:PORT]`` (port 104 when left out).
    environ : mapping
        The environment (``os.environ``): the variables of :data:`ENVIRONMENT`.

    Returns
    -------
    PacsAddress
        The peer, our AE title, the credentials and TLS files.

    Raises
    ------
    SettingsError
        The address is malformed or carries credentials; a variable is inconsistent or names a
        missing file; credentials would go over plain http (or dicom) to a host beyond loopback.
    """
    try:
        parts = urlsplit(address.strip())
        port = parts.port
    except ValueError:
        raise SettingsError(f"PACS address {address!r} is not a URL; give https://HOST/dicom-web or "
                            "dicom://AET@HOST:PORT") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "dicom", "dicoms") or not parts.hostname:
        raise SettingsError(f"PACS address {address!r} is neither a DICOMweb URL (https://HOST/dicom-web) nor a "
                            "DIMSE peer (dicom://AET@HOST:PORT or dicoms://...)")
    if parts.password is not None or (scheme.startswith("http") and parts.username is not None):
        # Never echo the address: it holds a secret.
        raise SettingsError(f"the PACS address carries credentials; give them in {USERNAME_ENV} and "
                            f"{PASSWORD_ENV} (or {TOKEN_ENV}) instead, never on the command line")
    username = environ.get(USERNAME_ENV) or None
    password = _secret(environ, PASSWORD_ENV, PASSWORD_FILE_ENV)
    token = _secret(environ, TOKEN_ENV, TOKEN_FILE_ENV)
    if password and not username:
        raise SettingsError(f"a PACS password is set but {USERNAME_ENV} is not; set both, or neither")
    if username and not password:
        raise SettingsError(f"{USERNAME_ENV} is set without {PASSWORD_ENV} or {PASSWORD_FILE_ENV}; set the password")
    if token and username:
        raise SettingsError(f"both a bearer token ({TOKEN_ENV}) and a user name ({USERNAME_ENV}) are set; keep one")
    client_cert, client_key = _tls_file(environ, CLIENT_CERT_ENV), _tls_file(environ, CLIENT_KEY_ENV)
    if client_key and not client_cert:
        raise SettingsError(f"{CLIENT_KEY_ENV} is set without {CLIENT_CERT_ENV}; set the certificate too")
    host = parts.hostname
    tls = scheme in ("https", "dicoms")
    calling_aet = _ae_title(environ.get(AE_TITLE_ENV) or DEFAULT_AE_TITLE, AE_TITLE_ENV)
    if (username or token) and not tls and not is_loopback(host):
        secure = "https" if scheme == "http" else "dicoms"
        raise SettingsError(f"refusing to send PACS credentials over plain {scheme} to {host}; use {secure}://")
    common = dict(host=host, calling_aet=calling_aet, tls=tls, ca_bundle=_tls_file(environ, CA_BUNDLE_ENV),
                  client_cert=client_cert, client_key=client_key, username=username, password=password, token=token)
    if scheme.startswith("http"):
        url = f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        return PacsAddress(kind=DICOMWEB, url=url, port=port or (443 if tls else 80), called_aet="", **common)
    if not parts.username:
        raise SettingsError(f"DIMSE address {address!r} names no AE title; give dicom://AET@HOST:PORT")
    return PacsAddress(kind=DIMSE, url="", port=port or DIMSE_DEFAULT_PORT,
                       called_aet=_ae_title(parts.username, "the address's AE title"), **common)


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: list[int] = []


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hold dicomweb-client's and pynetdicom's records below WARNING while a PACS is talked to:
    theirs name the UIDs and keys of every request. Nested and concurrent uses (a listener pushing
    from several threads) restore the levels once the last one ends."""
    global _quiet_depth
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved[:] = [each.level for each in loggers]
            for each in loggers:
                each.setLevel(logging.WARNING if each.name == "dicomweb_client" else logging.CRITICAL)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for each, level in zip(loggers, _quiet_saved):
                    each.setLevel(level)


# DICOMweb


def http_session(address: PacsAddress):
    """A ``requests.Session`` with the address's credentials and TLS files."""
    import requests

    session = requests.Session()
    # No ~/.netrc: its credentials would go to a host nobody chose them for (over plain http too) and
    # would replace a bearer token. The proxy variables still apply.
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(address.url))
    if address.username:
        session.auth = (address.username, address.password or "")
    elif address.token:
        session.headers["Authorization"] = f"Bearer {address.token}"
    if address.ca_bundle:
        session.verify = str(address.ca_bundle)
    elif system_bundle := _system_ca_file():
        session.verify = system_bundle  # as dicoms:// does (requests would use certifi's list)
    if address.client_cert:
        session.cert = (str(address.client_cert), str(address.client_key)) if address.client_key \
            else str(address.client_cert)
    session.hooks["response"].append(_capped)
    return session


class _CappedRaw:
    """A response's raw stream that raises :class:`AnswerTooLarge` past :data:`MAX_ANSWER_BYTES`."""

    def __init__(self, raw, limit: int) -> None:
        self._raw, self._limit, self._read = raw, limit, 0

    def stream(self, amount: int = 2 ** 16, decode_content: bool | None = None):
        for chunk in self._raw.stream(amount, decode_content=decode_content):
            self._read += len(chunk)
            if self._read > self._limit:
                self._raw.close()
                raise AnswerTooLarge(f"the answer is larger than {self._limit // 1024 ** 2} MiB")
            yield chunk

    def read(self, amount: int | None = None, *args, **kwargs) -> bytes:
        data = self._raw.read(amount if amount is not None else self._limit + 1, *args, **kwargs)
        self._read += len(data)
        if self._read > self._limit:
            self._raw.close()
            raise AnswerTooLarge(f"the answer is larger than {self._limit // 1024 ** 2} MiB")
        return data

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


def _capped(response, *args, **kwargs):
    """requests' response hook (run before the body is read): a declared length past the cap is
    refused at once, and the body is cut off where it passes the cap (a peer that never stops)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
        response.close()
        raise AnswerTooLarge(f"the answer declares {int(declared) // 1024 ** 2} MiB, more than "
                             f"{MAX_ANSWER_BYTES // 1024 ** 2}")
    if response.raw is not None and not isinstance(response.raw, _CappedRaw):
        response.raw = _CappedRaw(response.raw, MAX_ANSWER_BYTES)
    return response


def _system_ca_file() -> str | None:
    """The system's CA file (OpenSSL's default), None where it has none."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def dicomweb_client(address: PacsAddress, *, session=None):
    """A ``dicomweb_client.DICOMwebClient`` for the address (its own retries off: callers retry), on
    ``session`` or a new :func:`http_session`."""
    from dicomweb_client.api import DICOMwebClient

    if address.kind != DICOMWEB:
        raise SettingsError(f"{address} is not a DICOMweb address")
    # permissive_uid: a PACS's UIDs are taken as it gives them (some are not conformant).
    client = DICOMwebClient(address.url, session=session or http_session(address), timeout=HTTP_TIMEOUT_S,
                            permissive_uid=True)
    client.set_http_retry_params(retry=False)
    return client


def http_failure(err: BaseException) -> str:
    """What an HTTP exchange ended with, without its URL (which names UIDs): ``HTTP 404 Not Found``,
    ``connection refused``, ``timed out``..."""
    import requests

    from http import HTTPStatus

    if isinstance(err, AnswerTooLarge):
        return f"answer too large ({err})"
    response = getattr(err, "response", None)
    if response is not None:
        # The standard phrase, never the peer's: a reason phrase (like a body) is the peer's text and
        # may quote the patient or study it did not find.
        try:
            phrase = HTTPStatus(response.status_code).phrase
        except ValueError:
            phrase = ""
        return f"HTTP {response.status_code} {phrase}".strip()
    if isinstance(err, requests.exceptions.SSLError):
        return "TLS handshake failed (check DICOMFLOW_PACS_CA_BUNDLE and the client certificate)"
    if isinstance(err, requests.exceptions.Timeout):
        return "timed out"
    if isinstance(err, requests.exceptions.ConnectionError):
        return "connection failed (refused, reset or unreachable)"
    return type(err).__name__


def credentials_hint(address: PacsAddress) -> str:
    """Which variables to check after a refusal (never their values)."""
    if address.username:
        return f"check {USERNAME_ENV} and {PASSWORD_ENV}"
    if address.token:
        return f"check {TOKEN_ENV}"
    return f"no credentials were given: set {USERNAME_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV}"


def refused_credentials(address: PacsAddress, status: int) -> PacsError:
    """The one-line error for a 401 or 403: which variables to check, never their values."""
    if status == 401:
        return PacsError(f"{address} refused the credentials (HTTP 401); {credentials_hint(address)}")
    return PacsError(f"{address} refused access (HTTP 403); {credentials_hint(address)}, and that this user may "
                     "do this")


# DIMSE


def ssl_context(address: PacsAddress) -> ssl.SSLContext:
    """The client TLS context for ``dicoms://``: the CA bundle (else the system's), our certificate."""
    context = ssl.create_default_context(cafile=str(address.ca_bundle) if address.ca_bundle else None)
    if address.client_cert:
        context.load_cert_chain(str(address.client_cert), str(address.client_key) if address.client_key else None)
    return context


def user_identity(address: PacsAddress) -> list:
    """The DIMSE User Identity negotiation item for the address's credentials (none without)."""
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    if not (address.username or address.token):
        return []
    item = UserIdentityNegotiation()
    if address.username:
        item.user_identity_type = 2  # username and passcode
        item.primary_field = address.username.encode()
        item.secondary_field = (address.password or "").encode()
    else:
        item.user_identity_type = 5  # JSON Web Token
        item.primary_field = address.token.encode()
    item.positive_response_requested = False
    return [item]


def new_ae(address: PacsAddress):
    """A pynetdicom ``AE`` with our AE title and the timeouts of :data:`DIMSE_TIMEOUT_S`."""
    from pynetdicom import AE

    ae = AE(ae_title=address.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = DIMSE_TIMEOUT_S
    ae.connection_timeout = 15
    return ae


def associate(ae, address: PacsAddress, *, ext_neg: list | None = None, evt_handlers: list | None = None):
    """An established association with the DIMSE peer, or a :class:`PacsError` saying why not.

    Parameters
    ----------
    ae : pynetdicom.AE
        With its requested presentation contexts.
    address : PacsAddress
        A ``dicom://`` or ``dicoms://`` peer.
    ext_neg, evt_handlers : list, optional
        Extended negotiation items (role selection) and event handlers, as pynetdicom takes them.

    Returns
    -------
    pynetdicom.association.Association
        Established; release it when done.

    Raises
    ------
    PacsError
        The connection failed, or the peer rejected or aborted the association.
    """
    if address.kind != DIMSE:
        raise SettingsError(f"{address} is not a DIMSE address")
    tls_args = (ssl_context(address), address.host) if address.tls else None
    assoc = ae.associate(address.host, address.port, ae_title=address.called_aet, tls_args=tls_args,
                         ext_neg=[*user_identity(address), *(ext_neg or [])], evt_handlers=evt_handlers or [])
    if assoc.is_established:
        # pynetdicom writes a message's PDUs one by one: with Nagle's algorithm, against the peer's
        # delayed ACK, each C-STORE or C-GET waited about 40 ms more (measured against Orthanc).
        with contextlib.suppress(AttributeError, OSError):
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return assoc
    if assoc.is_rejected:
        raise PacsError(f"{address} rejected the association from AE title {address.calling_aet}; the PACS must "
                        f"know this AE title (set {AE_TITLE_ENV} to the one it knows)")
    raise PacsError(f"could not associate with {address} (connection refused, aborted or timed out); "
                    "check the host, port and AE title, and that the PACS is up")


def dimse_status(code: int, service: str = "storage") -> str:
    """A DIMSE status as ``0xA700 Failure (Refused: Out of Resources)``, from pynetdicom's tables.

    Parameters
    ----------
    code : int
        The status the peer answered.
    service : str, default="storage"
        Whose table names it: ``storage``, ``find``, ``get`` or ``move``.
    """
    from pynetdicom import status

    tables = {"storage": status.STORAGE_SERVICE_CLASS_STATUS, "find": status.QR_FIND_SERVICE_CLASS_STATUS,
              "get": status.QR_GET_SERVICE_CLASS_STATUS, "move": status.QR_MOVE_SERVICE_CLASS_STATUS}
    category, text = tables[service].get(code) or status.GENERAL_STATUS.get(code) or (
        status.code_to_category(code), "")
    return f"0x{code:04X} {category}" + (f" ({text})" if text else "")


def dicom_status_category(code: int) -> str:
    """``Success``, ``Warning``, ``Pending``, ``Cancel`` or ``Failure`` for a DIMSE status."""
    from pynetdicom.status import code_to_category

    return code_to_category(code)
