"""The ``dicomflow`` command: what a user runs besides the pipeline's stages.

    dicomflow predict INPUT... [--output predictions.csv] [--model NAME|models:/NAME@champion] [--tracking-uri URI]
                      [--per-study]
    dicomflow keygen [--out .dicomflow/keys]
    dicomflow request FILE... > request.json
    dicomflow serve [--model models:/NAME@champion] [--host 127.0.0.1] [--port 5001] [limits...]
    dicomflow scan-leaks [PATH ...] [--run RUN_ID]
    dicomflow sample-data OUT_DIR [--kind chest|fundus|ct] [--patients N] [--seed 2026] [--force]
    dicomflow check-names [FOLDER]
    dicomflow import-photos FOLDER --table photos.csv --kind dermoscopy|fundus|photo [--out data] [--classes 0 1 ...]
    dicomflow pacs pull --from ADDRESS (--labels CSV [--key KEY] | --modality M [--date-from D] [--date-to D])
                        [--out data]
    dicomflow pacs push DIR --to ADDRESS [--attempts 3] [--report CSV]
    dicomflow listen --allow AET [--allow AET ...] --to ADDRESS [--port 11112] [--spool DIR] [--model URI]
    dicomflow team-server [--backend-store-uri URI] [--artifacts-destination DIR] [--host H] [--port P] ...
    dicomflow team-users --credentials-dir DIR [--ci NAME] [--reader NAME ...] [--admin NAME ...]

Each subcommand is glue, like a stage's ``main()``: it reads ``params.yaml`` where it needs to
and calls the library. Errors are one line (:func:`dicomflow.runtime.stage.run_stage`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from dicomflow.errors import DataError
from dicomflow.runtime.stage import run_stage

logger = logging.getLogger("dicomflow.predict")
SAMPLE_PATIENTS = {"chest": 240, "fundus": 80, "ct": 24}  # sample-data's kinds and their default sizes


def predict(args: argparse.Namespace) -> None:
    """The registered model on DICOM files and every file under folders, to one CSV (bad files get
    their reason in its ``error`` column and never stop the run); fails only when an input does not
    exist or no file could be predicted."""
    from collections import Counter

    import mlflow

    from dicomflow import tracking
    from dicomflow.config.params import load_params
    from dicomflow.runtime.outputs import write_text
    from dicomflow.serving.pyfunc import describe_task
    from dicomflow.errors import SettingsError
    from dicomflow.serving.predict import (
        StudySettings,
        champion_models,
        describe_skipped,
        error_counts,
        list_inputs,
        load_verified_model,
        model_uri,
        predict_files,
        study_instance_uids,
        study_settings,
        tracking_store,
        with_studies,
        with_unread,
    )
    from dicomflow.signing import verify_key_from_env

    inputs = list_inputs(args.inputs, exclude={args.output.resolve()})
    named = " ".join(str(path) for path in args.inputs)
    if inputs.skipped:
        logger.info("%s", describe_skipped(inputs.skipped))
    if not inputs.files:
        unread = Counter(reason for _, reason, _ in inputs.unread) + inputs.skipped  # kinds only: names can carry PHI
        raise DataError(f"no files to predict in {named}"
                         + (f" (not read: {', '.join(f'{n} {reason}' for reason, n in unread.most_common())})"
                            if unread else ""))
    # The model: from the store the user points at, named by --model, this project's params.yaml
    # or, outside a project, the store's one model with a champion.
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    store = tracking_store(os.environ, cwd=Path.cwd())  # one line when there is none to read
    tracking.configure_mlflow(experiment=None)
    evaluate = load_params("evaluate") if Path("params.yaml").is_file() else None
    project = evaluate.registered_model_name if evaluate else None
    uri = model_uri(args.model, project_model=project, store=store,
                    champions=lambda: champion_models(mlflow.MlflowClient()))
    key = verify_key_from_env(os.environ)
    # The version is verified over a private copy and loaded from it: nothing of an unsigned or
    # altered model runs here (dicomflow/signing.py). The copy lives as long as the model is used.
    with tempfile.TemporaryDirectory(prefix="dicomflow-predict-") as workdir:
        model = load_verified_model(uri, key=key, workdir=Path(workdir))
        metadata = model.metadata.metadata or {}  # a model logged without dicomflow's metadata has none
        logger.info("the model: %s", describe_task(metadata))
        if args.per_study and metadata.get("volume"):
            raise SettingsError("--per-study: this model scores CT series (its answer is per series "
                                "already); leave --per-study out")
        scored = predict_files(model, inputs.files, names=inputs.names)
        if args.dicom_out:  # an SR and a SEG per answered image, named by their new UIDs
            from dicomflow.pacs.results import describe_results, dicom_results
            from dicomflow.signing import resolve_version

            model_name, model_version = resolve_version(uri)
            made = dicom_results(model, inputs.files, scored, args.dicom_out, model_name=model_name,
                                 model_version=model_version)
            logger.info("%s in %s", describe_results(made), args.dicom_out)  # counts only: PHI rules
            scored = scored.assign(dicom_results=[result.describe(args.dicom_out) for result in made])
        predictions = with_unread(scored, inputs.unread)
        if args.dicom_out:  # files not read at all, and per-series or per-study rows, get no object
            unread = predictions["dicom_results"].isna()
            predictions.loc[unread, "dicom_results"] = "not_predicted: the file could not be read (see error)"
        if metadata.get("volume"):  # one row per series too, numbered; its files carry its score
            uid_of = dict(zip(inputs.names, study_instance_uids(inputs.files, "SeriesInstanceUID")))
            predictions = with_studies(
                predictions, [uid_of.get(name) for name in predictions["path"]], unit="series",
                settings=StudySettings("mean", 1, metadata.get("threshold"), metadata.get("referable_threshold"),
                                       "the series' own score"), model_metadata=metadata)
            logger.info("per series: %d series scored", int((predictions["unit"] == "series").sum()))
        if args.per_study:  # grouped by Study Instance UID; the CSV numbers the studies, never names them
            settings = study_settings(metadata, params_aggregation=evaluate and (
                evaluate.study_aggregation, evaluate.study_top_k))
            uid_of = dict(zip(inputs.names, study_instance_uids(inputs.files)))
            predictions = with_studies(predictions, [uid_of.get(name) for name in predictions["path"]],
                                       settings=settings, model_metadata=metadata)
            logger.info("per study: %d studies, %s of their files' probabilities (%s)",
                        int((predictions["unit"] == "study").sum()), settings.aggregation, settings.source)
    write_text(args.output, predictions.to_csv(index=False))
    per_file = predictions[predictions["unit"] == "file"] if "unit" in predictions else predictions
    failed = error_counts(per_file)
    summary = ", ".join(f"{count} {reason}" for reason, count in failed.most_common())
    # Counts only: paths and reader messages can carry PHI, so they stay in the CSV.
    logger.info("predicted %d of %d files with %s; wrote %s", len(per_file) - sum(failed.values()),
                len(per_file), uri, args.output)
    if failed:
        logger.warning("%d files not predicted (%s): see the error column of %s", sum(failed.values()),
                       summary, args.output)
    if sum(failed.values()) == len(per_file):
        raise DataError(f"none of the {len(per_file)} files in {named} could be predicted "
                         f"({summary}); see {args.output}")


def keygen(args: argparse.Namespace) -> None:
    """Write a model signing key pair (``signing.pem`` 0600, ``verify.pub``) into ``--out``; never
    overwrites a key."""
    from dicomflow.signing import (
        SIGNING_KEY_FILE_ENV,
        VERIFY_KEY_FILE_ENV,
        SigningKey,
        signing_key_from_env,
        write_key_pair,
    )

    log = logging.getLogger("dicomflow.keygen")
    private_path, public_path = write_key_pair(args.out)
    key: SigningKey = signing_key_from_env({SIGNING_KEY_FILE_ENV: str(private_path)})
    log.info("wrote %s (private, mode 0600) and %s (public), key id %s", private_path, public_path, key.key_id)
    log.info("sign with %s=%s (CI: keep it as a secret); verify with %s=%s (copy it to every server)",
                SIGNING_KEY_FILE_ENV, private_path, VERIFY_KEY_FILE_ENV, public_path)


def request(args: argparse.Namespace) -> None:
    """The JSON body for a served model's ``/invocations`` with FILE... (base64, ``dataframe_split``)
    on stdout: ``dicomflow request IM0001.dcm > request.json; curl ... -d @request.json``."""
    import json

    from dicomflow.serving.predict import request_body

    body = request_body(args.files)  # every file read before anything is written
    json.dump(body, sys.stdout)
    sys.stdout.write("\n")


def serve(args: argparse.Namespace) -> None:
    """The registered model over HTTP (MLflow's scoring protocol), its signature verified before its
    code is loaded, each request bounded (dicomflow/serving/server.py); runs until interrupted."""
    import os

    from dicomflow import tracking
    from dicomflow.config.params import load_params
    from dicomflow.serving.server import ServingLimits
    from dicomflow.serving.server import serve as serve_model

    limits = ServingLimits(max_body_mib=args.max_body_mib, max_files=args.max_files,
                           max_decoded_mib=args.max_decoded_mib, decode_timeout_s=args.decode_timeout_s,
                           request_timeout_s=args.request_timeout_s, decoders=args.decoders,
                           max_requests=args.max_requests, workers=args.workers)
    uri = args.model or f"models:/{load_params('evaluate').registered_model_name}@champion"
    tracking.configure_mlflow(experiment=None)
    serve_model(uri, host=args.host, port=args.port, limits=limits, environ=os.environ)


def scan_leaks(args: argparse.Namespace) -> int:
    """Search the identifying values of the ingested sources in files, folders and MLflow runs;
    1 on any hit, or on any file whose pixels could not be decoded (not searched, so not known to
    be clean). Hits name the place and the kind of value, never the value."""
    from dicomflow.config.params import load_params
    from dicomflow.deid.leaks import UNREAD, identifiers_at_ingest, scan_mlflow_run, scan_paths
    from dicomflow.tracking import configure_mlflow

    paths = load_params("paths")
    identifiers = identifiers_at_ingest(Path(paths.ingest_dir), Path(paths.data))
    leaks = scan_paths(identifiers, args.paths)
    if args.run:
        configure_mlflow(experiment=None)
        for run_id in args.run:
            leaks += scan_mlflow_run(identifiers, run_id)
    for leak in leaks:
        if leak.source.startswith(UNREAD):
            print(f"NOT READ {leak.output}: {leak.location}: {leak.source}")
        else:
            print(f"LEAK {leak.output}: {leak.location}: a {leak.source} value")
    unread = sum(leak.source.startswith(UNREAD) for leak in leaks)
    print(f"{len(leaks) - unread} hit(s) for {len(identifiers):,} identifying values"
          + (f"; {unread} file(s) whose pixels could not be read, so not searched" if unread else ""))
    return 1 if leaks else 0


def sample_data(args: argparse.Namespace) -> int:
    """Write an embedded sample to OUT_DIR: ``chest`` (synthetic radiographs with fake PHI, the
    pipeline's default data), ``fundus`` (synthetic graded fundus photos with fake EXIF and
    their table, for ``import-photos``) or ``ct`` (synthetic chest CT series with and without a
    nodule, broken series among them)."""
    from dicomflow.devtools.ct_sample import generate_ct_sample
    from dicomflow.devtools.fundus_sample import generate_fundus_sample
    from dicomflow.devtools.sample_data import generate_sample

    generate = {"chest": generate_sample, "fundus": generate_fundus_sample, "ct": generate_ct_sample}[args.kind]
    patients = args.patients if args.patients is not None else SAMPLE_PATIENTS[args.kind]
    try:
        generate(args.out_dir, patients=patients, seed=args.seed, force=args.force)
    except (FileExistsError, ValueError) as error:
        logger.error("%s", error)
        return 1
    return 0


def check_names(args: argparse.Namespace) -> int:
    """Print every name under FOLDER that is not UTF-8 (DVC cannot track them); 1 when there is any."""
    from dicomflow.dicom.sources import list_sources

    folder = args.folder
    bad = [text for text, reason, _ in list_sources(folder).unread if reason == "non_utf8_name"]
    for text in bad:
        print(f"{folder}/{text}", file=sys.stderr)
    if bad:
        print(f"{len(bad)} name(s) under {folder}/ are not valid UTF-8 (shown with \\xNN for the "
              "bytes that are not): DVC cannot track them. Rename them, e.g. with "
              f"`convmv -f latin1 -t utf8 -r --notest {folder}`", file=sys.stderr)
    return 1 if bad else 0


def import_photos(args: argparse.Namespace) -> int:
    """JPEG and PNG photos with a table to DICOM objects and the labels file under --out, and a
    report beside the table (:mod:`dicomflow.dicom.photos`); 1 when no photo could be imported."""
    from dicomflow.dicom.photos import import_photos as run_import

    classes = args.classes
    if classes is None:
        from dicomflow.config.params import PARAMS_FILE, load_params

        if not PARAMS_FILE.exists():
            from dicomflow.errors import SettingsError

            raise SettingsError("import-photos: no --classes and no params.yaml here to read ingest.classes "
                                "from; give the classes, e.g. --classes 0 1 2 3 4")
        classes = load_params("ingest").classes
    result = run_import(args.folder, args.table, kind=args.kind, out=args.out, classes=classes,
                        orientation=args.orientation, allow_unknown_laterality=args.unknown_laterality,
                        workers=args.workers, report=args.report, prune=args.prune)
    level = logging.WARNING if result.failed else logging.INFO  # the report names the files; logs never do
    logging.getLogger("dicomflow.import_photos").log(level, "%s", result.summary())
    imported = result.written + result.present
    return 0 if imported or not result.rows else 1


def team_server(args: argparse.Namespace) -> int:
    """Start the team's MLflow server (:mod:`dicomflow.team`): with basic-auth unless --no-auth,
    which only loopback may have; this process becomes ``mlflow server``."""
    import os

    from dicomflow import team

    authenticated = not args.no_auth
    team.check_binding(args.host, authenticated=authenticated)
    environ = dict(os.environ)
    if authenticated:
        team.check_auth_environment(args.auth_dir.resolve(), environ)
        environ["MLFLOW_AUTH_CONFIG_PATH"] = str(team.write_auth_config(
            args.auth_dir, default_permission=args.default_permission,
            admin_username=environ.get(team.ADMIN_USERNAME_ENV) or "admin"))
        if not team.is_loopback(args.host):
            team.logger.warning("basic-auth sends passwords with every request: beyond loopback, serve it "
                           "through a TLS proxy only (docs/security/team-server.md)")
    else:
        team.logger.warning("no authentication: any local user can change the registry; for one person's "
                       "machine only")
    command = team.server_command(backend_store_uri=args.backend_store_uri,
                                  artifacts_destination=str(args.artifacts_destination.resolve()),
                                  host=args.host, port=args.port, authenticated=authenticated,
                                  workers=args.workers, allowed_hosts=args.allowed_hosts)
    # MLflow's own command from the same environment as this one (the repository's .venv).
    beside = Path(sys.executable).with_name("mlflow")
    command[0] = str(beside) if beside.exists() else "mlflow"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, environ)
    return 1  # not reached


def team_users(args: argparse.Namespace) -> int:
    """Create the project's experiment, registered model and users on the team server, as its
    admin (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."""
    import os

    from dicomflow import team
    from dicomflow.config.params import load_params
    from dicomflow.errors import SettingsError
    from dicomflow.tracking import EXPERIMENT_NAME, configure_mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise SettingsError(f"MLFLOW_TRACKING_URI must name the team server (http://HOST:PORT); got "
                            f"{uri or 'nothing'}")
    missing = [name for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if not os.environ.get(name)]
    if missing:
        raise SettingsError(f"{' and '.join(missing)} not set: export an admin's user name and password "
                            "(the password with read -s, never on the command line)")
    configure_mlflow(experiment=None)
    identities = team.set_up_team(uri, experiment=EXPERIMENT_NAME,
                                  registered_model=load_params("evaluate").registered_model_name,
                                  ci=args.ci, readers=args.reader, admins=args.admin,
                                  credentials=args.credentials_dir)
    for identity in identities:
        where = (f"new; password in {identity.password_file}" if identity.password_file
                 else "existed; password unchanged")
        print(f"{identity.name}: {identity.role} ({where})")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dicomflow",
                                  description="dicomflow: what a user runs besides the pipeline's stages.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command = commands.add_parser("predict", help="the registered model on DICOM files and folders, to a CSV")
    command.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                         help="DICOM files, or folders of them (searched recursively)")
    command.add_argument("--output", type=Path, default=Path("predictions.csv"), help="CSV to write")
    command.add_argument("--model", help="a registered model's NAME (its champion) or URI (models:/NAME@ALIAS, "
                         "models:/NAME/VERSION); default: models:/<evaluate.registered_model_name>@champion in a "
                         "project, else the store's one model with a champion")
    command.add_argument("--tracking-uri", help="the MLflow tracking store holding the model (default: "
                         "MLFLOW_TRACKING_URI, else the mlflow.db of the project this runs in), e.g. "
                         "sqlite:////path/to/project/mlflow.db")
    command.add_argument("--dicom-out", type=Path, metavar="DIR",
                         help="also write, for each file the model answers, a DICOM Comprehensive 3D SR (the "
                         "finding, its probability, the threshold, the model) and a FRACTIONAL Segmentation of its "
                         "Grad-CAM map, in the source's patient and study (docs/pacs.md)")
    command.add_argument("--per-study", action="store_true",
                         help="also one row per study (files grouped by Study Instance UID, numbered, never "
                         "named): the files' probabilities combined by the model's registered study aggregation, "
                         "else evaluate.study_aggregation")
    command.set_defaults(handler=predict)

    command = commands.add_parser("keygen", help="write a key pair that signs and verifies registered models")
    command.add_argument("--out", type=Path, default=Path(".dicomflow/keys"),
                         help="folder for signing.pem and verify.pub (default: .dicomflow/keys, this clone's own)")
    command.set_defaults(handler=keygen)

    command = commands.add_parser("request", help="the JSON body that sends DICOM files to a served model")
    command.add_argument("files", nargs="+", type=Path, metavar="FILE", help="DICOM files")
    command.set_defaults(handler=request)

    command = commands.add_parser("serve", help="serve the registered model over HTTP, verified and bounded")
    command.add_argument("--model", help="model URI (default: models:/<evaluate.registered_model_name>@champion)")
    command.add_argument("--host", default="127.0.0.1",
                         help="address to bind (default 127.0.0.1; any other needs DICOMFLOW_SERVE_TOKEN)")
    command.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    defaults = _serving_defaults()
    for name, kind, text in (
            ("max_body_mib", int, "largest request body in MiB (413 above)"),
            ("max_files", int, "most files per request (413 above)"),
            ("max_decoded_mib", int, "most MiB one file may be, inflate to or decode to (too_large above)"),
            ("decode_timeout_s", float, "seconds one file may decode (timeout after)"),
            ("request_timeout_s", float, "seconds one request may take (504 after)"),
            ("decoders", int, "decoder processes (0: one per core, at least 2)"),
            ("max_requests", int, "requests in progress at once, per worker (503 beyond)"),
            ("workers", int, "server processes, each with the model and its decoders")):
        command.add_argument(f"--{name.replace('_', '-')}", type=kind, default=defaults[name],
                             help=f"{text}; default {defaults[name]}")
    command.set_defaults(handler=serve)

    command = commands.add_parser("scan-leaks", help="search the sources' identifying values in outputs and runs")
    command.add_argument("paths", nargs="*", type=Path, help="files or folders to search")
    command.add_argument("--run", action="append", default=[], metavar="RUN_ID",
                         help="an MLflow run to search, with its child runs (repeatable)")
    command.set_defaults(handler=scan_leaks)

    command = commands.add_parser("sample-data", help="write an embedded sample data set (developer tool)")
    command.add_argument("out_dir", type=Path, help="output directory (must be empty unless --force)")
    command.add_argument("--kind", choices=tuple(SAMPLE_PATIENTS), default="chest",
                         help="chest: DICOM radiographs and labels.csv (default, what data.dvc pins); "
                              "fundus: graded JPEG fundus photos and photos.csv, for import-photos; "
                              "ct: axial chest CT series (5 of them broken on purpose) and labels.csv")
    command.add_argument("--patients", type=int, default=None,
                         help="number of patients (default 240 for chest, 80 for fundus, 24 for ct "
                              "plus one per broken series)")
    command.add_argument("--seed", type=int, default=2026, help="random seed (default 2026)")
    command.add_argument("--force", action="store_true", help="remove existing content of OUT_DIR first")
    command.set_defaults(handler=sample_data)

    command = commands.add_parser("check-names", help="list the file names under FOLDER that are not UTF-8")
    command.add_argument("folder", type=Path, nargs="?", default=Path("data"), help="default: data")
    command.set_defaults(handler=check_names)

    command = commands.add_parser("import-photos", help="JPEG and PNG photos with a table, to DICOM objects")
    command.add_argument("folder", type=Path, metavar="FOLDER", help="the photos (the table's file column is "
                         "relative to it)")
    command.add_argument("--table", type=Path, required=True, help="CSV: file, patient_id, study_date, label "
                         "(optional: study_id, laterality L/R, body_site)")
    command.add_argument("--kind", required=True, choices=["dermoscopy", "fundus", "photo"],
                         help="dermoscopy and photo: VL Photographic (XC); fundus: Ophthalmic Photography (OP)")
    command.add_argument("--out", type=Path, default=Path("data"), help="data folder: photos/ and labels.csv "
                         "(default: data)")
    command.add_argument("--report", type=Path, help="the report CSV, one row per photo (it names the source "
                         "files; default: beside the table, TABLE.import_report.csv)")
    command.add_argument("--classes", nargs="+", metavar="CLASS",
                         help="the allowed labels (default: ingest.classes of params.yaml here)")
    command.add_argument("--orientation", choices=["apply", "keep"], default="apply",
                         help="photos with an EXIF orientation flag: apply (decoded, turned upright, stored "
                         "losslessly; the default) or keep (the JPEG as encoded)")
    command.add_argument("--unknown-laterality", action="store_true",
                         help="import fundus rows without laterality, with Image Laterality U (not standard)")
    command.add_argument("--workers", type=int, default=0, help="processes (default 0: every core)")
    command.add_argument("--prune", action="store_true", help="remove objects under OUT/photos that the table no "
                         "longer gives, and their labels (OUT holding this table's photos only)")
    command.set_defaults(handler=import_photos)

    pacs = commands.add_parser("pacs", help="pull studies from a PACS into data/, push result objects to one")
    pacs_commands = pacs.add_subparsers(dest="pacs_command", required=True, metavar="ACTION")
    command = pacs_commands.add_parser("pull", help="the studies a labels table names, or a query's, into a folder")
    command.add_argument("--from", dest="source", required=True, metavar="ADDRESS", help=PACS_ADDRESS_HELP)
    command.add_argument("--labels", type=Path, help="labels table: pull the studies its --key column names")
    command.add_argument("--key", choices=["accession_number", "study_instance_uid"], default=None,
                         help="the labels table's column naming studies (default: ingest.label_key of "
                         "params.yaml here when it is one of these, else accession_number)")
    command.add_argument("--modality", help="query instead of a table: studies with this modality (e.g. DX, CT)")
    command.add_argument("--date-from", help="query: studies on or after this date (YYYYMMDD)")
    command.add_argument("--date-to", help="query: studies on or before this date (YYYYMMDD)")
    command.add_argument("--out", type=Path, default=Path("data"), help="folder to write to (default: data)")
    command.add_argument("--retrieve", choices=["get", "move"], default="get",
                         help="DIMSE only: C-GET (default) or C-MOVE to this command's own storage SCP")
    command.add_argument("--move-port", type=int, default=0,
                         help="DIMSE C-MOVE: the port of this command's storage SCP (the PACS must know it)")
    command.add_argument("--report", type=Path, default=Path("pull_report.csv"),
                         help="CSV: one row per study, what was fetched and why anything was not; it names the "
                         "study keys, as the labels table does (default pull_report.csv)")
    command.set_defaults(handler=pacs_pull)

    command = pacs_commands.add_parser("push", help="store DICOM objects (results) in a PACS, per object reported")
    command.add_argument("folder", type=Path, metavar="DIR", help="DICOM files, or folders of them")
    command.add_argument("--to", dest="destination", required=True, metavar="ADDRESS", help=PACS_ADDRESS_HELP)
    command.add_argument("--attempts", type=int, default=3, help="tries per object before it is listed as "
                         "failed (default 3, with back-off)")
    command.add_argument("--report", type=Path, default=Path("push_report.csv"),
                         help="CSV: one row per object, what the PACS answered (default push_report.csv)")
    command.set_defaults(handler=pacs_push)

    command = commands.add_parser("listen", help="a DICOM storage SCP that answers received images with SR and SEG")
    command.add_argument("--allow", action="append", required=True, metavar="AET",
                         help="a calling AE title allowed to send (repeatable); every other is refused")
    command.add_argument("--to", dest="destination", required=True, metavar="ADDRESS",
                         help="where results go: " + PACS_ADDRESS_HELP)
    command.add_argument("--ae-title", default="DICOMFLOW", help="this listener's AE title (default DICOMFLOW)")
    command.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    command.add_argument("--port", type=int, default=11112, help="port (default 11112)")
    command.add_argument("--spool", type=Path, default=Path(".dicomflow/spool"),
                         help="received files and queued results, kept across restarts (default .dicomflow/spool)")
    command.add_argument("--model", help="model URI (default: models:/<evaluate.registered_model_name>@champion)")
    command.add_argument("--tracking-uri", help="the MLflow tracking store holding the model (default: "
                         "MLFLOW_TRACKING_URI, else the mlflow.db of the project this runs in)")
    command.add_argument("--batch", type=int, default=16, help="images scored together (default 16)")
    command.add_argument("--queue", type=int, default=256,
                         help="received images waiting to be scored before senders are asked to wait (default 256)")
    command.add_argument("--max-instance-mib", type=float, default=1024.0,
                         help="the largest instance taken, in MiB; a larger one is refused (C-STORE failure "
                         "0xC001) and never written (default 1024)")
    command.set_defaults(handler=listen)

    command = commands.add_parser("team-server", help="the team's MLflow server, with authentication")
    command.add_argument("--backend-store-uri", required=True, help="runs and registry (postgresql://...)")
    command.add_argument("--artifacts-destination", type=Path, default=Path("mlartifacts"),
                         help="where the server keeps artifacts (clients reach them through it)")
    command.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    command.add_argument("--port", type=int, default=5000)
    command.add_argument("--workers", type=int, help="server processes (MLflow's default: 4)")
    command.add_argument("--allowed-hosts", help="Host headers to accept, comma-separated (a TLS proxy's name)")
    command.add_argument("--auth-dir", type=Path, default=Path("mlflow-auth"),
                         help="the auth app's ini file and user database (default mlflow-auth/)")
    command.add_argument("--default-permission", choices=["NO_PERMISSIONS", "READ"], default="NO_PERMISSIONS",
                         help="what a user may do where nothing was granted (default NO_PERMISSIONS)")
    command.add_argument("--no-auth", action="store_true",
                         help="no authentication (loopback only; refused beyond it)")
    command.set_defaults(handler=team_server)

    command = commands.add_parser("team-users", help="create the team's users and grants (as the admin)")
    command.add_argument("--credentials-dir", type=Path, required=True,
                         help="where new users' generated passwords are written (NAME.password, 0600)")
    command.add_argument("--ci", action="append", default=[], metavar="NAME",
                         help="an identity that logs runs, registers and moves aliases (repeatable)")
    command.add_argument("--reader", action="append", default=[], metavar="NAME", help="read-only (repeatable)")
    command.add_argument("--admin", action="append", default=[], metavar="NAME", help="another admin (repeatable)")
    command.set_defaults(handler=team_users)
    return top


PACS_ADDRESS_HELP = ("a DICOMweb base URL (https://HOST/dicom-web) or a DIMSE peer dicom://AET@HOST:PORT; "
                     "credentials and TLS from the environment only (docs/pacs.md)")


def pacs_pull(args: argparse.Namespace) -> int:
    """``dicomflow pacs pull``: the studies of a labels table or a query, from a PACS into --out
    (:mod:`dicomflow.pacs.pull`), with a report; 1 when anything could not be got."""
    from dicomflow.errors import SettingsError
    from dicomflow.pacs.connection import parse_address
    from dicomflow.pacs.pull import STUDY_KEYS, StudyQuery, keys_from_labels, pull_studies, write_pull_report

    if (args.labels is None) == (args.modality is None):
        raise SettingsError("pacs pull: give either --labels CSV (the studies it names) or --modality M (a query)")
    if args.labels is None and args.key:
        raise SettingsError("pacs pull: --key goes with --labels")
    if args.labels is not None and (args.date_from or args.date_to):
        raise SettingsError("pacs pull: --date-from and --date-to go with --modality, not --labels")
    address = parse_address(args.source, os.environ)
    if args.labels is not None:
        key = args.key
        if key is None:
            from dicomflow.config.params import PARAMS_FILE, load_params

            configured = load_params("ingest").label_key if PARAMS_FILE.exists() else None
            key = configured if configured in STUDY_KEYS else "accession_number"
        result = pull_studies(address, out=args.out, keys=keys_from_labels(args.labels, key), key=key,
                              retrieve=args.retrieve, move_port=args.move_port)
    else:
        query = StudyQuery(args.modality, args.date_from, args.date_to)
        result = pull_studies(address, out=args.out, query=query, retrieve=args.retrieve, move_port=args.move_port)
    write_pull_report(result, args.report)
    pull_logger = logging.getLogger("dicomflow.pacs.pull")
    if result.incomplete:  # counts and the PACS's reasons only: the report names the studies
        pull_logger.error("%s; %d study row(s) incomplete, listed in %s", result.summary(), len(result.incomplete),
                          args.report)
        return 1
    pull_logger.info("%s into %s; report %s (then: dvc add %s)", result.summary(), result.folder, args.report,
                     args.out)
    return 0


def pacs_push(args: argparse.Namespace) -> int:
    """``dicomflow pacs push``: the objects under DIR stored in the PACS (:mod:`dicomflow.pacs.push`),
    one report row each; 1 when any was not stored (after ``--attempts`` tries)."""
    from collections import Counter

    from dicomflow.pacs.connection import parse_address
    from dicomflow.pacs.push import dicom_files, store_objects, write_push_report

    address = parse_address(args.destination, os.environ)
    paths = dicom_files(args.folder)
    if not paths:
        raise DataError(f"no files to push under {args.folder}")
    outcomes = store_objects(address, paths, attempts=args.attempts)
    write_push_report(outcomes, args.report)
    push_logger = logging.getLogger("dicomflow.pacs.push")
    failed = Counter(outcome.detail for outcome in outcomes if not outcome.stored)
    stored = len(outcomes) - sum(failed.values())
    if not failed:
        push_logger.info("push: %d of %d object(s) stored in %s; report %s", stored, len(outcomes), address,
                         args.report)
        return 0
    # The PACS's answers name statuses and reasons, never the objects (the report does).
    push_logger.error("push: %d of %d object(s) NOT stored in %s (%s); each listed in %s", sum(failed.values()),
                      len(outcomes), address, "; ".join(f"{n}: {detail}" for detail, n in failed.most_common()),
                      args.report)
    return 1


def listen(args: argparse.Namespace) -> int:
    """``dicomflow listen``: a storage SCP that scores what the allowed AE titles send and stores the
    results at ``--to``, until SIGTERM or SIGINT (docs/listener.md). The model is resolved as
    ``predict`` resolves it and verified before it is loaded."""
    import mlflow

    from dicomflow import tracking
    from dicomflow.config.params import load_params
    from dicomflow.pacs.connection import parse_address
    from dicomflow.pacs.listener import Listener, run_until_signalled, server_ssl_context
    from dicomflow.serving.predict import champion_models, load_verified_model, model_uri, tracking_store
    from dicomflow.serving.pyfunc import describe_task
    from dicomflow.signing import resolve_version, verify_key_from_env

    destination = parse_address(args.destination, os.environ)  # a bad address fails before the model loads
    ssl_context = server_ssl_context(os.environ)
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    store = tracking_store(os.environ, cwd=Path.cwd())
    tracking.configure_mlflow(experiment=None)
    project = load_params("evaluate").registered_model_name if Path("params.yaml").is_file() else None
    uri = model_uri(args.model, project_model=project, store=store,
                    champions=lambda: champion_models(mlflow.MlflowClient()))
    name, version = resolve_version(uri)  # once: the version verified is the one named in the results
    with tempfile.TemporaryDirectory(prefix="dicomflow-listen-") as workdir:
        model = load_verified_model(f"models:/{name}/{version}", key=verify_key_from_env(os.environ),
                                    workdir=Path(workdir))
        logging.getLogger("dicomflow.listen").info("the model: %s version %s, %s", name, version,
                                                   describe_task(model.metadata.metadata or {}))
        listener = Listener(spool=args.spool, destination=destination, model=model, model_name=name,
                            model_version=version, allow=args.allow, ae_title=args.ae_title, host=args.host,
                            port=args.port, batch=args.batch, queue=args.queue, ssl_context=ssl_context,
                            max_instance_mib=args.max_instance_mib)
        run_until_signalled(listener)
    return 0


def _serving_defaults() -> dict:
    import dataclasses

    from dicomflow.serving.server import ServingLimits

    return {field.name: field.default for field in dataclasses.fields(ServingLimits)}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "scan-leaks" and not args.paths and not args.run:
        parser().error("scan-leaks: give at least one path or --run")
    status: list[int] = []
    run_stage(lambda: status.append(args.handler(args) or 0))
    return status[0] if status else 1


if __name__ == "__main__":
    sys.exit(main())
