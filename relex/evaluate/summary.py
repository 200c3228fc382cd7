"""The Markdown summary of ``relex eval``: accuracy of every checkpoint, its difference to the first, the gate."""

from __future__ import annotations

from relex.evaluate.results import format_difference
from relex.summaries import ICONS, md, table


def eval_markdown(results, gate=None, title: str = "relex eval") -> str:
    """The summary of ``relex eval``: accuracy of every checkpoint and its difference to the first, per
    task and mean, headed by the ``--fail-if-worse`` gate's status when there is one."""
    if gate is None:
        headline = f"### {title}"
    else:
        status = "passed" if gate.passed else "failed"
        headline = f"### {ICONS[status]} {title}: {md(gate.reason())}"
    columns = results.columns
    header = ["checkpoint"] + [md(task) for task in columns]
    if gate is not None:
        header.append("gate")
    rows = []
    judged = {c.label: c for c in gate.checkpoints} if gate is not None else {}
    for index, label in enumerate(results.labels):
        row = [md(label) + (" (baseline)" if index == 0 and len(results.labels) > 1 else "")]
        for task in columns:
            cell = results.percent(task, label)
            difference = results.difference(task, label)
            if difference:
                cell += f" ({md(format_difference(difference))})"
            row.append(cell)
        if gate is not None:
            row.append("baseline" if index == 0 else "❌ worse" if judged[label].worse else "ok")
        rows.append(row)
    parts = [headline, "", table(header, rows, ["---"] + ["--:"] * (len(header) - 1))]
    confidence = next((d.get("confidence") for task in columns for label in results.labels[1:]
                       if (d := results.difference(task, label))), None)
    settings = results.settings
    metric = f"avg@{settings.get('samples', 1)}"
    note = f"accuracy in % ({metric})"
    if confidence:
        note += (f"; in brackets: difference to {md(results.labels[0])} in points, "
                 f"[{100 * confidence:.0f}% paired-bootstrap interval over problems]")
    if gate is not None:
        note += (f". Gate: a checkpoint fails when the upper end of its interval on "
                 f"{'the mean over tasks' if gate.judged == 'mean' else md(gate.judged)} is below "
                 f"−{100 * gate.margin:g} points")
    parts += ["", note + "."]
    return "\n".join(parts) + "\n"
