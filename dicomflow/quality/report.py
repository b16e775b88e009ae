"""Running the data-quality checks with Great Expectations, and the HTML report and summary of their results."""

from __future__ import annotations

import html
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dicomflow.config import layout
from dicomflow.quality.expectations import (
    COMPUTED_CHECKS,
    CRITICAL,
    WARNING,
    Check,
    CheckResult,
)

logger = logging.getLogger(__name__)

N_EXAMPLES = 3


def run_checks(manifest: pd.DataFrame, checks: Sequence[Check]) -> list[CheckResult]:
    """Run ``checks`` on ``manifest`` with Great Expectations.

    Parameters
    ----------
    manifest : DataFrame
        The de-identified manifest, one row per image.
    checks : sequence of Check
        The suite, from :func:`dicomflow.quality.expectations.build_checks`.

    Returns
    -------
    list of CheckResult, one per check in the same order.

    Notes
    -----
    A check on an absent column is ``skipped``: ``columns_present`` already fails critically for
    that column, so the stage stops with one line for the cause instead of one per check.
    """
    manifest = manifest.reset_index(drop=True)  # GX reports index labels; make them row numbers
    runnable = [c for c in checks if c.expectation and (c.column is None or c.column in manifest)]
    outcomes = _run_suite(manifest, runnable) if runnable else {}
    results = []
    for check in checks:
        if check.expectation is None:
            found = COMPUTED_CHECKS[check.name](manifest)
            results.append(CheckResult(check, "failed" if found else "passed", len(found),
                                       detail=f"columns: {', '.join(found)}" if found else ""))
        elif check.name in outcomes:
            results.append(_to_result(check, outcomes[check.name], manifest))
        else:
            results.append(CheckResult(check, "skipped", detail=f"column {check.column!r} missing"))
    return results


def _run_suite(manifest: pd.DataFrame, checks: Sequence[Check]) -> dict[str, Any]:
    """Validate ``manifest`` against the GX form of ``checks``; results keyed by check name."""
    # GX logs hundreds of INFO lines while importing and building a context: keep its warnings only.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx  # about 3 s: imported only when the suite runs
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.row_conditions import Column

    logging.getLogger(ProgressBarsConfig.__module__).setLevel(logging.WARNING)  # GX sets it to INFO

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("deidentified")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    labelled = Column("label") != layout.UNLABELLED_LABEL  # the rows of a labelled_only check
    expectations = [
        getattr(gxe, c.expectation)(
            **({"column": c.column} if c.column else {}), **c.kwargs,
            **({"row_condition": labelled} if c.labelled_only else {}),
            severity=c.severity, meta={"check": c.name}, description=c.description,
        )
        for c in checks
    ]
    # Suite and definition must be added to the context before a run, even an ephemeral one.
    suite = context.suites.add(gx.ExpectationSuite(name="manifest", expectations=expectations))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch_definition, suite=suite)
    )
    outcome = definition.run(
        batch_parameters={"dataframe": manifest},
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20},
    )
    # GX returns results sorted its own way; the meta tag maps them back.
    return {r.expectation_config.meta["check"]: r for r in outcome.results}


def _to_result(check: Check, outcome: Any, manifest: pd.DataFrame) -> CheckResult:
    """Turn a GX ExpectationValidationResult into a CheckResult."""
    status = "passed" if outcome.success else "failed"
    error = _exception_message(outcome.exception_info)
    if error:
        return CheckResult(check, "failed", detail=f"could not run: {error}")
    res = outcome.result
    if check.kind == "table":
        return CheckResult(check, status, detail=f"{res.get('observed_value')} rows")
    if check.kind == "columns":
        missing = res.get("details", {}).get("mismatched", {}).get("missing", [])
        return CheckResult(check, status, len(missing),
                           detail=f"missing columns: {', '.join(missing)}" if missing else "")
    labelled = res["element_count"] - res.get("missing_count", 0)
    if check.kind == "class_share":
        in_class = labelled - res["unexpected_count"]
        share = in_class / labelled if labelled else 0.0
        return CheckResult(check, status, 0 if outcome.success else in_class, detail=(
            f"{in_class} of {labelled} labelled rows ({share:.1%}); "
            f"minimum {check.kwargs['mostly']:.1%}"))
    count = res["unexpected_count"]
    examples = _example_keys(manifest, res.get("partial_unexpected_index_list", []))
    return CheckResult(check, status, count, examples, detail=f"{count} of {res['element_count']} rows")


def _exception_message(info: dict) -> str:
    """GX's exception_info is flat or keyed by metric; return the first message raised, if any."""
    info = info or {}
    infos = [info] if "raised_exception" in info else list(info.values())
    return next((i["exception_message"] for i in infos if i.get("raised_exception")), "")


def _example_keys(manifest: pd.DataFrame, rows: Sequence[int]) -> tuple[str, ...]:
    """Distinct image_keys of ``rows`` (``row N`` where the key is missing), at most N_EXAMPLES."""
    keys: list[str] = []
    for row in rows:
        key = manifest["image_key"].iloc[row] if "image_key" in manifest else None
        text = f"row {row}" if pd.isna(key) else str(key)
        if text not in keys:
            keys.append(text)
    return tuple(keys[:N_EXAMPLES])


def summarise(results: Sequence[CheckResult], *, n_rows: int, n_unlabelled: int | None = None) -> dict[str, int]:
    """Flat metrics; ``success`` is 1 when no critical check failed (warnings allowed).

    ``n_unlabelled``: rows kept without a label (``ingest.unlabelled: pretrain``), reported
    after ``n_rows``; None leaves the key out.
    """
    failed = [r.check.severity for r in results if r.failed]
    summary = {
        "n_rows": n_rows,
        **({"n_unlabelled": n_unlabelled} if n_unlabelled is not None else {}),
        "expectations": len(results),
        "passed": sum(r.status == "passed" for r in results),
        "failed_critical": failed.count(CRITICAL),
        "failed_warning": failed.count(WARNING),
        "skipped": sum(r.status == "skipped" for r in results),
    }
    summary["success"] = int(summary["failed_critical"] == 0)
    return summary


def expectation_type(check: Check) -> str:
    """GX's snake_case name of the check's expectation, or ``pandas`` for a computed check."""
    if check.expectation is None:
        return "pandas"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", check.expectation).lower()


def format_failures(results: Sequence[CheckResult], *, severity: str = CRITICAL) -> str:
    """One line per failed check of ``severity``: name, column, count and example image_keys."""
    lines = []
    for r in results:
        if r.failed and r.check.severity == severity:
            column = r.check.column or "-"
            line = f"{r.check.name} ({expectation_type(r.check)}), column {column}: {r.detail}"
            if r.examples:
                line += f"; e.g. {', '.join(r.examples)}"
            lines.append(line)
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5rem; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #eee; }
tr.failed.critical td { background: #fbdada; }
tr.failed.warning td { background: #fff1cc; }
tr.skipped td { color: #777; }
.verdict { font-weight: bold; }
"""


def render_report(results: Sequence[CheckResult], *, n_rows: int, source: str,
                  n_unlabelled: int | None = None) -> str:
    """The validation report as one HTML page.

    Parameters
    ----------
    results : sequence of CheckResult
        From :func:`run_checks`; every one gets a table row.
    n_rows : int
        Rows in the manifest.
    source : str
        The manifest's path, shown in the heading.
    n_unlabelled : int or None, default=None
        Rows kept without a label, shown in the summary (None: not shown, as in quarantine mode).

    Returns
    -------
    str: self-contained HTML (inline CSS, no scripts, no external links), every value escaped.
    """
    summary = summarise(results, n_rows=n_rows, n_unlabelled=n_unlabelled)
    verdict = "passed" if summary["success"] else "failed (critical expectations)"
    summary_rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in summary.items())
    header = ("check", "expectation", "column", "severity", "status", "unexpected", "detail",
              "examples", "expects")
    check_rows = "".join(
        f'<tr class="{r.status} {r.check.severity}">'
        + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            r.check.name, expectation_type(r.check), r.check.column or "", r.check.severity,
            r.status, r.unexpected_count, r.detail, ", ".join(r.examples), r.check.description))
        + "</tr>\n"
        for r in results
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Manifest validation</title><style>{_CSS}</style></head><body>"
        f"<h1>Manifest validation</h1><p>Source: <code>{html.escape(source)}</code>. "
        f'Verdict: <span class="verdict">{verdict}</span>.</p>'
        f"<h2>Summary</h2><table>{summary_rows}</table>\n"
        f"<h2>Expectations</h2><table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>\n"
        f"{check_rows}</table></body></html>\n"
    )


def read_reference_profile(path: Path) -> dict[str, Any] | None:
    """The profile of the last accepted data set, or None on the first run."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
