"""Signed models: every version dicomflow registers is signed, and nothing loads one unverified.

Loading an MLflow pyfunc runs its code (``python_model.pkl`` is a pickle, ``code/`` is imported),
so a registry anyone could write to would be code execution. evaluate signs each version it
registers (:func:`sign_model_version`); evaluate (the champion it compares with), ``dicomflow
predict`` and ``dicomflow serve`` download a version, verify its signature over the downloaded
files and load only that verified local copy (:func:`download_verified`). The keys come from a
file or the environment, never from MLflow.

The scheme: Ed25519 over a manifest
-----------------------------------
The signature covers every file of the version as stored (``MLmodel``, ``python_model.pkl``,
``code/``, ``artifacts/``, the requirements...) by relative path and SHA-256 digest. The
manifest and the signature are the version's :data:`SIGNATURE_TAG` tag, a JSON object (about
3 KB for the pipeline's model, 28 files; MLflow allows 100,000 characters): it is no secret, and
anyone may read it. A verifier checks the signature over the manifest, then compares the
manifest with the files it downloaded, so it can say which file is extra, missing or changed.

Chosen by measuring (``bench/`` has no timing test of this; figures from a 2-core machine,
2026-12, the pipeline's ``resnet_small`` logged with its code: 28 files, 1.2 MB; medians of 20):

====================================  =======  ========  ========  =================
scheme                                import   sign      verify    signature
====================================  =======  ========  ========  =================
OpenSSF model-signing 1.1.1, EC P-256  350-520  19-21 ms  18-20 ms  7.9 KB bundle file
Ed25519 (``cryptography``) manifest    10 ms    1.4 ms    1.5 ms    64 B + 2.8 KB
HMAC-SHA256 manifest                   10 ms    1.3 ms    1.3 ms    32 B + 2.8 KB
====================================  =======  ========  ========  =================

With a 200 MB weights file all three take 170-240 ms (hashing). model-signing resolves against
``constraints.txt`` but adds about 15 packages (sigstore, tuf, securesystemslib, rfc3161-client,
in-toto-attestation, blake3, ...), fails on import unless pyOpenSSL, which it does not declare,
is installed too, reads keys only from files, and by default leaves ``.gitignore``,
``.gitattributes`` and similar files unsigned (an added ``.gitattributes`` verified). HMAC needs
the same key to verify as to sign, so every server that checks a model could also sign one. An
Ed25519 key pair keeps that apart (the verifying servers hold only the public key), needs no new
dependency (``cryptography`` comes with MLflow) and signs every file.

What the signature does not say: which version is the champion. Moving an alias to another
signed version is an authorisation matter of the registry (the team server's permissions).

Keys
----
``DICOMFLOW_SIGNING_KEY`` (PEM text) or ``DICOMFLOW_SIGNING_KEY_FILE`` (a PEM file that only its
owner may read) sign; ``DICOMFLOW_VERIFY_KEY`` or ``DICOMFLOW_VERIFY_KEY_FILE`` (the public key)
verify; the text wins over the file, as for ``DICOMFLOW_SECRET``. With none of them and a local
tracking store (``MLFLOW_TRACKING_URI`` unset, ``sqlite:`` or ``file:``), a key pair of this clone is
made on first use in ``.dicomflow/keys/`` (git-ignored, folder 0700, private key 0600), so that a
fresh clone's ``make repro`` and tests sign and verify without set-up: a model signed there is
trusted by that clone only. With a team server (``http(s)://``, or a shared database such as
``postgresql://``) the keys must be given: a clone-local key would sign
versions that nobody else can verify, and a machine that makes its own key trusts whatever it signs.
``dicomflow keygen`` writes a key pair.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dicomflow.errors import DataError, SettingsError

logger = logging.getLogger(__name__)

SIGNATURE_TAG = "dicomflow.signature"  # model version tag holding the signature (not a secret)
SIGNATURE_FORMAT = "dicomflow-signature/1"  # also the signed payload's first line (domain separation)

SIGNING_KEY_ENV = "DICOMFLOW_SIGNING_KEY"
SIGNING_KEY_FILE_ENV = "DICOMFLOW_SIGNING_KEY_FILE"
VERIFY_KEY_ENV = "DICOMFLOW_VERIFY_KEY"
VERIFY_KEY_FILE_ENV = "DICOMFLOW_VERIFY_KEY_FILE"
# The clone's own key pair, relative to the repository root (git-ignored).
LOCAL_KEY_FOLDER = Path(".dicomflow") / "keys"
LOCAL_STORE_SCHEMES = ("", "sqlite", "file")  # MLFLOW_TRACKING_URI schemes that get the clone's own key
PRIVATE_KEY_NAME = "signing.pem"
PUBLIC_KEY_NAME = "verify.pub"
MAX_TAG_LENGTH = 100_000  # MLflow's MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH (3.17)
KEY_ID_LENGTH = 16  # hex characters of the SHA-256 of the raw public key shown as its id
_CHUNK = 1 << 20


class SignatureError(DataError):
    """A model is unsigned, altered, or signed with another key: it is not loaded."""


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key and where it came from (a variable or file name, never its value)."""

    private: object  # cryptography's Ed25519PrivateKey (imported lazily)
    source: str

    @property
    def key_id(self) -> str:
        return _key_id(self.private.public_key())

    def verify_key(self) -> VerifyKey:
        """The matching public key (for tests and ``keygen``; servers get theirs from a file)."""
        return VerifyKey(self.private.public_key(), self.source)


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key and where it came from."""

    public: object  # cryptography's Ed25519PublicKey
    source: str

    @property
    def key_id(self) -> str:
        return _key_id(self.public)


# ---------------------------------------------------------------------------------------------
# Keys


def signing_key_from_env(environ: Mapping[str, str]) -> SigningKey:
    """The key that signs new versions (evaluate).

    Parameters
    ----------
    environ : Mapping
        ``os.environ`` or a copy: ``DICOMFLOW_SIGNING_KEY`` (PEM text) wins over
        ``DICOMFLOW_SIGNING_KEY_FILE``; with neither and a local tracking store, the clone's own
        key (:data:`LOCAL_KEY_FOLDER`, made on first use).

    Returns
    -------
    SigningKey

    Raises
    ------
    SettingsError
        Neither variable with a team server (``MLFLOW_TRACKING_URI`` http(s)); a key that is not
        an Ed25519 private key in PEM; a key file readable by group or others (the message names
        the file and the ``chmod``).
    """
    pem, where = _key_pem(environ, SIGNING_KEY_ENV, SIGNING_KEY_FILE_ENV, "sign", read=_read_private_file,
                          local=0)
    return SigningKey(_load_private(pem, where), where)


def verify_key_from_env(environ: Mapping[str, str]) -> VerifyKey:
    """The key that verifies versions (evaluate, predict, serve).

    Parameters
    ----------
    environ : Mapping
        ``DICOMFLOW_VERIFY_KEY`` (PEM text) wins over ``DICOMFLOW_VERIFY_KEY_FILE``; with neither
        and a local tracking store, the clone's own public key (made with its private key on
        first use: a fresh clone then refuses every version it did not sign itself).

    Returns
    -------
    VerifyKey

    Raises
    ------
    SettingsError
        Neither variable with a team server; a key that is not an Ed25519 public key in PEM.
    """
    pem, where = _key_pem(environ, VERIFY_KEY_ENV, VERIFY_KEY_FILE_ENV, "verify", read=_read_file, local=1)
    return VerifyKey(_load_public(pem, where), where)


def _key_pem(environ: Mapping[str, str], text_env: str, file_env: str, action: str, *,
             read: Callable[[Path, str], bytes], local: int) -> tuple[bytes, str]:
    """A key's PEM bytes and where they came from: ``text_env``'s text, else ``file_env``'s file
    (read by ``read``), else, with a local store only, this clone's pair (``local``: 0 the private
    key, 1 the public one)."""
    if text_env in environ:
        return environ[text_env].encode(), text_env
    if file_env in environ:
        path = Path(environ[file_env])
        where = f"{file_env}={path}"
        return read(path, where), where
    _refuse_in_team_mode(environ, text_env, file_env, action)
    path = ensure_local_key_pair(_local_key_folder(environ))[local]
    return read(path, str(path)), str(path)


def write_key_pair(folder: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``folder``: ``signing.pem`` (PKCS#8, mode 0600) and
    ``verify.pub`` (SubjectPublicKeyInfo, 0644); the folder is made with mode 0700 when new.

    Returns
    -------
    (Path, Path)
        The private and the public key's paths.

    Raises
    ------
    SettingsError
        Either file exists already (a key is never overwritten: versions signed with it would
        no longer verify).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(folder)
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise SettingsError(f"{path} exists: a key is never overwritten (versions signed with it would no "
                                "longer verify); choose another folder or remove it yourself")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # O_EXCL with the mode at creation: the private key is never readable by others, not even
    # for a moment, and a file that appeared meanwhile is not overwritten.
    with os.fdopen(os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as stream:
        stream.write(pem)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    with os.fdopen(os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as stream:
        stream.write(public)
    return private_path, public_path


def ensure_local_key_pair(folder: Path) -> tuple[Path, Path]:
    """The clone's key pair in ``folder``, written on first use (:func:`write_key_pair`).

    Processes that start at once (queued experiments, parallel tests) agree on one pair: each
    writes its pair into a folder of its own and renames it into place, and a rename onto a
    folder that another process put there first fails, so the loser uses the winner's pair.
    """
    folder = Path(folder)
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if not folder.exists():
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".keys-", dir=folder.parent))
        write_key_pair(scratch)
        try:
            os.rename(scratch, folder)
        except OSError:  # another process made the pair first
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            logger.info("made this clone's model signing key pair in %s (local store only; see "
                        "docs/security/signed-models.md)", folder)
    if not (private_path.is_file() and public_path.is_file()):
        missing = public_path if private_path.is_file() else private_path
        raise SettingsError(f"{missing} is missing: remove {folder} to make a new key pair "
                            "(versions signed with the old one will then be refused)")
    return private_path, public_path


def _local_key_folder(environ: Mapping[str, str]) -> Path:
    """The clone's key folder: beside the SQLite store ``MLFLOW_TRACKING_URI`` names (the project's
    ``mlflow.db``, so that ``dicomflow predict`` run from another folder verifies with the key
    that signed), else under the repository this runs in."""
    from dicomflow.tracking import repository_root

    uri = environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return Path(uri.removeprefix("sqlite:///")).absolute().parent / LOCAL_KEY_FOLDER
    return repository_root() / LOCAL_KEY_FOLDER


def _refuse_in_team_mode(environ: Mapping[str, str], text_env: str, file_env: str, action: str) -> None:
    """SettingsError unless the tracking store is local (unset, ``sqlite:``, ``file:`` or a
    path): with a team server (``http(s)://``, or a shared database) keys must be given."""
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    scheme = uri.split(":", 1)[0].lower() if ":" in uri and not uri.startswith(("/", ".")) else ""
    if scheme not in LOCAL_STORE_SCHEMES:
        raise SettingsError(f"no key to {action} models with: set {file_env} (or {text_env}) when "
                            f"MLFLOW_TRACKING_URI is a team server ({scheme}:); a clone's own key is for a local "
                            "store only (see docs/security/signed-models.md)")


def _read_file(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise SettingsError(f"{where}: cannot read the key file ({err.strerror})") from None


def _read_private_file(path: Path, where: str) -> bytes:
    """The file's bytes, or SettingsError when group or others may read or write it (the mode of
    the file as opened, so that it cannot change between the check and the read)."""
    try:
        with open(path, "rb") as stream:
            mode = os.fstat(stream.fileno()).st_mode
            if mode & 0o077:
                raise SettingsError(f"{where}: the private key is open to group or others (mode "
                                    f"{stat.S_IMODE(mode):04o}); run `chmod 600 {path}`")
            return stream.read()
    except OSError as err:
        raise SettingsError(f"{where}: cannot read the key file ({err.strerror})") from None


def _load_private(pem: bytes, where: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(pem.strip() + b"\n", password=None)
    except (ValueError, TypeError):  # not PEM, encrypted, or another format: never quote it
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise SettingsError(f"{where}: not an unencrypted Ed25519 private key in PEM; "
                            "make a key pair with `dicomflow keygen`")
    return key


def _load_public(pem: bytes, where: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(pem.strip() + b"\n")
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise SettingsError(f"{where}: not an Ed25519 public key in PEM; give the verify.pub that "
                            "`dicomflow keygen` wrote beside the signing key")
    return key


def _key_id(public) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_LENGTH]


# ---------------------------------------------------------------------------------------------
# Manifests and signatures


def folder_manifest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative POSIX path, with its SHA-256 (hex).

    Raises
    ------
    SignatureError
        The folder holds a link or anything else that is not a regular file or folder: a link
        could point a loader at files that were never signed.
    """
    folder = Path(folder)
    manifest: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            relative = path.relative_to(folder).as_posix()
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise SignatureError(f"{_printable(relative)} is a link or special file, not a regular file")
            manifest[relative] = _file_digest(path)
    return dict(sorted(manifest.items()))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _payload(files: Mapping[str, str]) -> bytes:
    """The signed bytes: the format line, then the manifest as canonical JSON."""
    rows = sorted([path, digest] for path, digest in files.items())
    return (SIGNATURE_FORMAT + "\n").encode() + json.dumps(rows, separators=(",", ":"), ensure_ascii=True).encode()


def sign_manifest(files: Mapping[str, str], *, key: SigningKey) -> str:
    """The :data:`SIGNATURE_TAG` value for a manifest (:func:`folder_manifest`): JSON with the
    format, the algorithm, the key id, the files and the signature (base64)."""
    signature = key.private.sign(_payload(files))
    return json.dumps({"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "key_id": key.key_id,
                       "files": dict(sorted(files.items())),
                       "signature": base64.b64encode(signature).decode("ascii")}, separators=(",", ":"))


def sign_folder(folder: Path, *, key: SigningKey) -> str:
    """The :data:`SIGNATURE_TAG` value for every file under ``folder``."""
    return sign_manifest(folder_manifest(folder), key=key)


def check_folder(folder: Path, signature: str | None, *, key: VerifyKey) -> None:
    """Verify ``signature`` (a :data:`SIGNATURE_TAG` value) over exactly the files under ``folder``.

    Raises
    ------
    SignatureError
        With the reason alone (the caller adds the model's URI): unsigned, unreadable
        signature, another key, a signature that does not match its manifest, or a file extra,
        missing or changed (named by its path in the model; never its content).
    """
    from cryptography.exceptions import InvalidSignature

    if not signature:
        raise SignatureError(f"not signed (no {SIGNATURE_TAG} tag)")
    try:
        record = json.loads(signature)
        signed_files = dict(record["files"])
        raw = base64.b64decode(record["signature"], validate=True)
        if record["format"] != SIGNATURE_FORMAT or record["algorithm"] != "ed25519":
            raise ValueError("unknown format")
        if not all(isinstance(p, str) and isinstance(d, str) for p, d in signed_files.items()):
            raise ValueError("bad manifest")
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise SignatureError(f"the {SIGNATURE_TAG} tag is not a {SIGNATURE_FORMAT} signature") from None
    if record.get("key_id") != key.key_id:
        # A hint only: the signature check below decides. An id is shown only when it looks like
        # one (a public key's hash): the tag is anyone's text.
        signed_by = str(record.get("key_id"))
        shown = signed_by if re.fullmatch(f"[0-9a-f]{{{KEY_ID_LENGTH}}}", signed_by) else "not a key id"
        raise SignatureError(f"signed with another key (key id {shown}; the verify key from {key.source} "
                             f"is {key.key_id})")
    try:
        key.public.verify(raw, _payload(signed_files))
    except InvalidSignature:
        raise SignatureError(f"the signature does not match its manifest (the {SIGNATURE_TAG} tag was altered, "
                             "or made with another key)") from None
    found = folder_manifest(folder)
    extra = sorted(set(found) - set(signed_files))
    missing = sorted(set(signed_files) - set(found))
    changed = sorted(path for path in set(found) & set(signed_files) if found[path] != signed_files[path])
    problems = [f"{label} {_some(paths)}" for label, paths in
                (("changed:", changed), ("not signed:", extra), ("missing:", missing)) if paths]
    if problems:
        raise SignatureError("its files differ from the signed ones (" + "; ".join(problems) + ")")


def _some(paths: list[str], shown: int = 3) -> str:
    """The first paths, printable on one line (anyone can name a file in a model: a newline or
    a control character is shown escaped), and how many more."""
    text = ", ".join(_printable(path) for path in paths[:shown])
    return text + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _printable(path: str, longest: int = 120) -> str:
    text = path.encode("unicode_escape", errors="backslashreplace").decode("ascii")
    return text if len(text) <= longest else text[:longest] + "..."


# ---------------------------------------------------------------------------------------------
# Registered versions


def resolve_version(model_uri: str) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (the alias
    resolved now, once: the version that is verified is the version that is loaded).

    Raises
    ------
    SignatureError
        Any other URI (a run's or a folder's model has no registered signature).
    DataError
        No such model, version or alias in the registry.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    prefix = "models:/"
    body = model_uri[len(prefix):] if model_uri.startswith(prefix) else ""
    if "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
        version = None
    elif body.count("/") == 1 and body.split("/")[1].isdigit():
        (name, version), alias = body.split("/"), None
    else:
        raise SignatureError(f"{model_uri}: only a registered version carries a signature; give "
                             "models:/NAME/VERSION or models:/NAME@ALIAS")
    if not name or (alias is not None and not alias):
        raise SignatureError(f"{model_uri}: give models:/NAME/VERSION or models:/NAME@ALIAS")
    client = MlflowClient()
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        else:
            client.get_model_version(name, version)
    except MlflowException as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise DataError(f"cannot load model {model_uri}: {first_line}") from None
    return name, str(version)


def download_version(name: str, version: str, destination: Path) -> Path:
    """The files of ``name`` version ``version`` exactly as stored, copied into a new folder under
    ``destination`` (mode 0700); its path.

    MLflow's ``models:/`` download would add a ``registered_model_meta`` file of its own, so the
    version's storage location is read instead. DataError when the download fails (MLflow
    refuses, for one, a link that leads out of the artifact store).
    """
    return _download_version(name, version, destination)[1]


def _download_version(name: str, version: str, destination: Path) -> tuple[Path, Path]:
    """The new folder under ``destination`` and the model's folder in it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix="model-", dir=destination))  # 0700: no one else writes to it
    source = MlflowClient().get_model_version_download_uri(name, version)
    # With dst_path a local store is copied as well, never handed back in place: verifying the
    # store's files and then loading them could read files changed in between.
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(holder)))
    except (MlflowException, OSError) as err:
        shutil.rmtree(holder, ignore_errors=True)
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise DataError(f"cannot download models:/{name}/{version}: {type(err).__name__}: {first_line}") from None
    if holder.resolve() not in (downloaded.resolve(), *downloaded.resolve().parents):
        shutil.rmtree(holder, ignore_errors=True)
        raise SignatureError(f"models:/{name}/{version}: the download did not land in {holder}")
    return holder, downloaded


def sign_model_version(name: str, version: str, *, key: SigningKey) -> None:
    """Sign registered model ``name`` version ``version`` (its files as stored) and record the
    signature as its :data:`SIGNATURE_TAG` tag.

    The files are downloaded once and signed as downloaded: the signature vouches for what the
    registry serves now, so call this right after registering what you logged.
    """
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as scratch:
        local = download_version(name, version, Path(scratch))
        value = sign_folder(local, key=key)
    if len(value) > MAX_TAG_LENGTH:
        raise DataError(f"models:/{name}/{version}: its {len(json.loads(value)['files'])} files make a signature of "
                        f"{len(value):,} characters, over the {MAX_TAG_LENGTH:,} a registry tag holds; "
                        "log fewer files (e.g. one archive of the code)")
    MlflowClient().set_model_version_tag(name, version, SIGNATURE_TAG, value)
    logger.info("signed %s version %s (%d files) with key %s", name, version,
                len(json.loads(value)["files"]), key.key_id)


def download_verified(model_uri: str, destination: Path, *, key: VerifyKey) -> Path:
    """Download ``model_uri`` (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) into
    ``destination``, verify its signature over exactly the downloaded files, and return the local
    folder to load from.

    Parameters
    ----------
    model_uri : str
        An alias is resolved to its version first; that version is downloaded and verified.
    destination : Path
        A folder (made when missing) that will hold a new folder with the model's files; load
        the model from the returned path, never from the registry again.
    key : VerifyKey
        :func:`verify_key_from_env`.

    Returns
    -------
    Path
        The verified local copy.

    Raises
    ------
    SignatureError
        One line, ``refused <uri> (version N): <reason>``: unsigned, signed with another key, or
        a file extra, missing or changed. The downloaded copy is removed first.
    DataError
        No such model, version or alias.
    """
    name, version = resolve_version(model_uri)
    signature = _version_tag(name, version)  # read before the download: verified against these bytes
    holder, local = _download_version(name, version, destination)
    try:
        _drop_registry_note(local, name, version, signature)
        check_folder(local, signature, key=key)
    except SignatureError as err:
        shutil.rmtree(holder, ignore_errors=True)  # nothing refused stays where it could be loaded
        shown = model_uri if model_uri.endswith(f"/{version}") else f"{model_uri} (version {version})"
        raise SignatureError(f"refused {shown}: {err}; {_what_to_do(str(err))}") from None
    logger.info("verified %s version %s: %d files signed with key %s", name, version,
                len(json.loads(signature)["files"]), key.key_id)
    return local


REGISTRY_NOTE = "registered_model_meta"


def _drop_registry_note(folder: Path, name: str, version: str, signature: str | None) -> None:
    """Remove MLflow's own note of the version from the downloaded copy, when it is exactly that.

    ``mlflow.pyfunc.load_model("models:/...")`` without ``dst_path`` on a local artifact store
    loads the stored folder in place and writes ``registered_model_meta`` (``{model_name,
    model_version}``) into it, so one ordinary load by a user would make the stored version fail
    its signature for good. A file of that name that holds exactly this version's name and number
    carries nothing of the model's, and goes; any other content stays and is refused as not signed.
    """
    import yaml

    note = folder / REGISTRY_NOTE
    signed = bool(signature) and REGISTRY_NOTE in signature
    if signed or note.is_symlink() or not note.is_file() or note.stat().st_size > 1024:
        return
    try:
        content = yaml.safe_load(note.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return
    if content == {"model_name": name, "model_version": str(version)} or content == {
            "model_name": name, "model_version": int(version)}:
        note.unlink()


def _version_tag(name: str, version: str) -> str | None:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version).tags.get(SIGNATURE_TAG)


def _what_to_do(reason: str) -> str:
    if reason.startswith("not signed"):
        return "only versions registered by evaluate are signed (docs/security/signed-models.md)"
    if reason.startswith("signed with another key"):
        return "give the verify key of the key that signs the registry's versions"
    return "do not use this version; register the model again (docs/security/signed-models.md)"
