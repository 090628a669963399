"""The Grafana dashboards lrwatch ships, generated from code so that they stay consistent.

``lrwatch dashboards generate --out grafana/dashboards`` writes them; the committed JSON in
``grafana/dashboards/`` is this module's output (a test checks that it still is). Every panel
and annotation uses the ``datasource`` template variable (never ``${DS_PROMETHEUS}``), every
query is limited by the ``job`` and ``instance`` variables, and rates use ``$__rate_interval``.

>>> d = training_dashboard()
>>> d["uid"], d["title"]
('lrwatch-training', 'lrwatch / Training')
>>> sorted(v["name"] for v in d["templating"]["list"])
['datasource', 'instance', 'job']
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["DATASOURCE", "training_dashboard", "serving_dashboard", "DASHBOARDS", "render",
           "write_dashboards", "check_dashboards"]

#: The datasource reference of every panel, target and annotation.
DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
SEL = 'job=~"$job", instance=~"$instance"'


# --- building blocks ------------------------------------------------------------------------------

def _target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DATASOURCE, "editorMode": "code", "expr": expr,
                         "legendFormat": legend or "__auto", "range": True, "refId": ref}
    t.update(extra)
    return t


def _targets(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def _new_events(counter: str, selector: str, window: str) -> str:
    """Increases of a counter in ``window``, counting a series that is new in the window in full.

    ``increase()`` cannot see events that happened before a counter's first scrape (a rollback
    at step 3, or a labelled child created by its first event); such a series did not exist one
    window earlier, so its whole value is new.
    """
    s = f"{counter}{{{selector}}}"
    return f"(({s} unless {s} offset {window}) or increase({s}[{window}])) > 0"


def _per_interval(counter: str) -> str:
    """Increases of ``counter`` per ``$__rate_interval``, a series new in it counted in full:
    ``lrwatch_actions_total{action}`` and ``lrwatch_firings_total{rule,severity}`` get a
    series at their first event, which plain ``increase()`` never showed (most runs roll
    back once: the panel stayed empty)."""
    return _new_events(counter, SEL, "$__rate_interval")


def _events_in_range(counter: str) -> str:
    """The events of ``counter`` in the dashboard's time range, summed over the selection, as
    the alerts count them (:func:`_new_events`): a rollback before the first scrape is not 0."""
    s = f"{counter}{{{SEL}}}"
    return f"sum(({s} unless {s} offset $__range) or increase({s}[$__range]))"


class _Layout:
    """Panels in a 24-column grid, left to right, top to bottom, with stable ids."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = 0
        self._y = 0
        self._row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": len(self.panels) + 1,
                            "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}})
        self._y += 1

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_h
            self._x, self._row_h = 0, 0

    def add(self, panel: dict[str, Any], w: int = 12, h: int = 8) -> dict[str, Any]:
        if self._x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self._x, "y": self._y}
        self._x += w
        self._row_h = max(self._row_h, h)
        self.panels.append(panel)
        return panel


def _timeseries(title: str, targets: list[dict[str, Any]], *, unit: str = "short",
                description: str = "", log: bool = False, thresholds: list[Any] | None = None,
                overrides: list[Any] | None = None, min_: float | None = None,
                max_: float | None = None, draw_style: str = "line") -> dict[str, Any]:
    custom: dict[str, Any] = {"drawStyle": draw_style, "lineWidth": 1,
                              "fillOpacity": 80 if draw_style == "bars" else 0,
                              "showPoints": "never", "spanNulls": False}
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    if thresholds:
        custom["thresholdsStyle"] = {"mode": "line+area" if len(thresholds) > 1 else "line"}
    defaults: dict[str, Any] = {"unit": unit, "custom": custom, "color": {"mode": "palette-classic"}}
    if thresholds:
        defaults["thresholds"] = {"mode": "absolute", "steps": thresholds}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {"type": "timeseries", "title": title, "description": description,
            "datasource": DATASOURCE, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def _stat(title: str, targets: list[dict[str, Any]], *, unit: str = "short",
          description: str = "", thresholds: list[Any] | None = None,
          decimals: int | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "color": {"mode": "thresholds"},
                                "thresholds": {"mode": "absolute", "steps": thresholds or [
                                    {"color": "green", "value": None}]}}
    if decimals is not None:
        defaults["decimals"] = decimals
    for t in targets:
        t["instant"], t["range"] = True, False
    return {"type": "stat", "title": title, "description": description,
            "datasource": DATASOURCE, "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                        "textMode": "auto", "orientation": "auto"}}


def _state_timeline(title: str, targets: list[dict[str, Any]], *, description: str = "",
                    panel_type: str = "state-timeline", steps: list[Any] | None = None,
                    mappings: list[Any] | None = None, unit: str = "short") -> dict[str, Any]:
    return {"type": panel_type, "title": title, "description": description,
            "datasource": DATASOURCE, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit,
                                         "color": {"mode": "thresholds"},
                                         "thresholds": {"mode": "absolute", "steps": steps or [
                                             {"color": "transparent", "value": None},
                                             {"color": "red", "value": 1}]},
                                         "mappings": mappings or []},
                            "overrides": []},
            "options": {"showValue": "never", "rowHeight": 0.9, "mergeValues": True,
                        "alignValue": "left",
                        "legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": False},
                        "tooltip": {"mode": "single", "sort": "none"}}}


def _query_var(name: str, label: str, query: str, *, multi: bool, include_all: bool,
               all_value: str | None = None) -> dict[str, Any]:
    v: dict[str, Any] = {
        "type": "query", "name": name, "label": label, "datasource": DATASOURCE,
        "definition": query,
        "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2, "regex": "", "sort": 1, "hide": 0, "multi": multi,
        "includeAll": include_all, "current": {}, "options": [],
    }
    if all_value is not None:
        v["allValue"] = all_value
    return v


def _variables(series: str, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"list": [
        {"type": "datasource", "name": "datasource", "label": "Data source",
         "query": "prometheus", "regex": "", "refresh": 1, "hide": 0, "current": {},
         "options": [], "multi": False, "includeAll": False},
        # not the Pushgateway's end-of-job summaries (instance="" under honor_labels): their
        # job "lrwatch" sorted first, so the dashboard opened on it, with no instance to show
        _query_var("job", "Job", f'label_values({series}{{instance!=""}}, job)', multi=False,
                   include_all=False),
        _query_var("instance", "Instance", f'label_values({series}{{job=~"$job"}}, instance)',
                   multi=True, include_all=True, all_value=".+"),
        *(extra or []),
    ]}


def _annotation(name: str, expr: str, color: str, title: str, text: str,
                tags: str = "job,instance") -> dict[str, Any]:
    return {"name": name, "datasource": DATASOURCE, "enable": True, "hide": False,
            "iconColor": color, "expr": expr, "step": "$__interval", "titleFormat": title,
            "textFormat": text, "tagKeys": tags, "useValueForTime": False}


_BUILTIN_ANNOTATION = {
    "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
    "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
    "type": "dashboard"}


def _alerts_annotation() -> dict[str, Any]:
    return _annotation("Prometheus alerts",
                       'ALERTS{alertname=~"Lrwatch.+", alertstate="firing", ' + SEL + '}',
                       "orange", "{{alertname}}", "{{severity}} alert at {{instance}}",
                       tags="alertname,severity,instance")


def _dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
               templating: dict[str, Any], annotations: list[dict[str, Any]],
               link_uid: str, link_title: str) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description,
        "tags": ["lrwatch"], "editable": True, "graphTooltip": 1, "timezone": "",
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "fiscalYearStartMonth": 0, "liveNow": False, "weekStart": "",
        "links": [{"title": link_title, "type": "link", "url": f"/d/{link_uid}",
                   "icon": "dashboard", "keepTime": True, "includeVars": False,
                   "asDropdown": False, "tags": [], "targetBlank": False, "tooltip": ""}],
        "annotations": {"list": [_BUILTIN_ANNOTATION, *annotations]},
        "templating": templating,
        "panels": panels,
    }


def _firing_panels(lay: _Layout) -> None:
    lay.add(_state_timeline(
        "Firing lrwatch rules",
        _targets((f"lrwatch_rule_firing{{{SEL}}}", "{{rule}} ({{severity}}) {{instance}}")),
        description="lrwatch's own rule engine (inside the Watcher or the daemon): 1 while a "
                    "rule fires. lrwatch_rule_firing{rule,severity}."), w=12, h=8)
    lay.add(_state_timeline(
        "Prometheus alerts (rules/*.rules.yml)",
        _targets(('ALERTS{alertname=~"Lrwatch.+", ' + SEL + "}",
                  "{{alertname}} {{alertstate}} {{instance}}")),
        description="Alerts of the Prometheus rules shipped in rules/: pending and firing.",
        steps=[{"color": "transparent", "value": None}, {"color": "orange", "value": 1}]),
        w=12, h=8)


# --- the dashboards ----------------------------------------------------------------------------------

def _step_rate() -> str:
    """Steps/s of each selected rank. A Watcher's counters move at flushes only, so the rate of
    ``lrwatch_training_steps_total`` over ``$__rate_interval`` (1 min at a 15 s scrape) read 0
    in the windows between flushes further apart (25 steps of 3 s) and overshot in the others.
    It is the rate between the rank's last two flushes (``lrwatch_steps_per_second``) while the
    next is not overdue (three flush intervals, at least 15 minutes: LrwatchTrainingStalled's
    measure), else, and before a second flush, the counter's rate (0 for a stalled run)."""
    return (f"(lrwatch_steps_per_second{{{SEL}}} and on (job, instance) "
            f"(time() - lrwatch_last_step_timestamp_seconds{{{SEL}}} < on (job, instance) "
            f"clamp_min(3 * lrwatch_flush_interval_seconds{{{SEL}}}, 900))) "
            f"or rate(lrwatch_training_steps_total{{{SEL}}}[$__rate_interval])")


def _training_overview(lay: _Layout) -> None:
    """The "Overview" row."""
    lay.row("Overview")
    lay.add(_stat("Step", _targets((f"max(lrwatch_step{{{SEL}}})", "step")),
                  description="Global optimizer step of the last flushed sample "
                              "(lrwatch_step)."), w=4, h=4)
    lay.add(_stat("Steps / s", _targets((f"sum({_step_rate()})", "steps/s")),
        unit="ops", description="Optimizer steps per second, summed over the selected ranks "
                                "(between each rank's last two flushes; 0 once it is overdue)."),
        w=4, h=4)
    lay.add(_stat("Rollbacks in range", _targets(
        (_events_in_range("lrwatch_rollbacks_total"), "rollbacks")),
        decimals=0, thresholds=[{"color": "green", "value": None},
                                {"color": "orange", "value": 1}],
        description="Rollbacks to a known-good snapshot (lrwatch_rollbacks_total)."), w=4, h=4)
    lay.add(_stat("Non-finite steps in range", _targets(
        (_events_in_range("lrwatch_nonfinite_steps_total"), "non-finite")),
        decimals=0, thresholds=[{"color": "green", "value": None},
                                {"color": "red", "value": 1}],
        description="Steps whose loss or gradients were NaN or Inf."), w=4, h=4)
    lay.add(_stat("Eval accuracy", _targets((f"max(lrwatch_eval_accuracy{{{SEL}}})", "eval")),
                  unit="percentunit", description="Accuracy of the last evaluation."), w=4, h=4)
    lay.add(_stat("lrwatch internal errors in range", _targets(
        (_events_in_range("lrwatch_internal_errors_total"), "errors")),
        decimals=0, thresholds=[{"color": "green", "value": None},
                                {"color": "orange", "value": 1}],
        description="Monitoring failures lrwatch absorbed (fail open)."), w=4, h=4)


def _training_optimisation(lay: _Layout) -> None:
    """The "Optimisation" row."""
    lay.row("Optimisation")
    lay.add(_timeseries(
        "Learning rate per parameter group",
        _targets((f"lrwatch_learning_rate{{{SEL}}}", "{{instance}} group {{param_group}}"),
                 (f"lrwatch_momentum{{{SEL}}}", "{{instance}} momentum {{param_group}}")),
        log=True, description="The schedule as the optimizer applied it, per parameter group "
                              "(lrwatch_learning_rate). Annotations: rollbacks (red) and run "
                              "starts with their scheduler (blue).",
        overrides=[{"matcher": {"id": "byRegexp", "options": ".*momentum.*"},
                    "properties": [{"id": "custom.hideFrom",
                                    "value": {"legend": False, "tooltip": False,
                                              "viz": True}}]}]), w=12)
    lay.add(_timeseries(
        "Loss",
        _targets((f"lrwatch_loss{{{SEL}}}", "{{instance}} last flushed step"),
                 (f"instance:lrwatch_step_loss:mean5m{{{SEL}}}", "{{instance}} mean of every step (5m)")),
        description="lrwatch_loss holds the last flushed step; the 5-minute mean comes from "
                    "the per-step histogram lrwatch_step_loss, so steps between scrapes count."),
        w=12)
    lay.add(_timeseries(
        "Gradient norm",
        _targets((f"lrwatch_grad_norm{{{SEL}}}", "{{instance}} global (last step)"),
                 (f"instance:lrwatch_step_grad_norm:p99_rate5m{{{SEL}}}", "{{instance}} p99 of every step (5m)"),
                 (f"lrwatch_layer_grad_norm{{{SEL}}}", "{{instance}} {{layer}}")),
        log=True, description="Global L2 norm before clipping; per-layer norms when the "
                              "Watcher has per_layer=True."), w=12)
    lay.add(_timeseries(
        "Update ratio ‖Δθ‖/‖θ‖",
        _targets((f"lrwatch_update_ratio{{{SEL}}}", "{{instance}}")),
        log=True, unit="percentunit",
        description="Relative size of each update (Watcher(update_ratio=True)); around 1e-3 "
                    "is typical, far above means the learning rate is too high.",
        thresholds=[{"color": "transparent", "value": None}, {"color": "red", "value": 0.01}]),
        w=12)


def _training_evaluation(lay: _Layout) -> None:
    """The "Evaluation" row."""
    lay.row("Evaluation")
    lay.add(_timeseries(
        "Accuracy (train and eval)",
        _targets((f"lrwatch_accuracy{{{SEL}}}", "{{instance}} train"),
                 (f"lrwatch_eval_accuracy{{{SEL}}}", "{{instance}} eval")),
        unit="percentunit", min_=0, max_=1,
        description="Training accuracy of the last flushed step and the last evaluation."), w=12)
    lay.add(_timeseries(
        "Evaluation loss",
        _targets((f"lrwatch_eval_loss{{{SEL}}}", "{{instance}} eval loss")),
        description="Loss of the last evaluation (lrwatch_eval_loss)."), w=12)


def _training_speed(lay: _Layout) -> None:
    """The "Speed" row."""
    lay.row("Speed")
    lay.add(_timeseries(
        "Step rate",
        _targets((_step_rate(), "{{instance}}"),
                 (f"sum by (job) ({_step_rate()})", "{{job}} (selected ranks)")),
        unit="ops", description="Optimizer steps per second, per rank and summed over the "
                                "selected ranks (not over every run of the job): between a "
                                "rank's last two flushes (lrwatch_steps_per_second), 0 once it "
                                "is overdue as LrwatchTrainingStalled judges."), w=8)
    lay.add(_timeseries(
        "Step duration",
        _targets(("histogram_quantile(0.5, sum by (instance, le) "
                  f"(rate(lrwatch_step_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                  "{{instance}} p50"),
                 ("histogram_quantile(0.99, sum by (instance, le) "
                  f"(rate(lrwatch_step_duration_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                  "{{instance}} p99")),
        unit="s", description="Wall time between optimizer steps (every step)."), w=8)
    lay.add(_timeseries(
        "Samples per second",
        _targets((f"lrwatch_samples_per_second{{{SEL}}}", "{{instance}}")),
        unit="short", description="Training throughput at the last flushed step."), w=8)


def _training_rules_and_actions(lay: _Layout) -> None:
    """The "Rules and actions" row."""
    lay.row("Rules and actions")
    _firing_panels(lay)
    lay.add(_timeseries(
        "Actions taken",
        _targets((f"sum by (instance, action) ({_per_interval('lrwatch_actions_total')})",
                  "{{instance}} {{action}}"),
                 (f"sum by (instance, rule) ({_per_interval('lrwatch_firings_total')})",
                  "{{instance}} {{rule}} fired")),
        description="Training-control actions (rollback, skip, reduce_lr, stop) and rule "
                    "firings per interval (the first of each kind too: its series is made "
                    "by it).", draw_style="bars"), w=24, h=7)


def training_dashboard() -> dict[str, Any]:
    """"lrwatch / Training": learning rate, loss, gradients, evaluation, speed, rules."""
    lay = _Layout()
    _training_overview(lay)
    _training_optimisation(lay)
    _training_evaluation(lay)
    _training_speed(lay)
    _training_rules_and_actions(lay)

    annotations = [
        _annotation("Rollbacks", _new_events("lrwatch_rollbacks_total", SEL, "$__rate_interval"),
                    "red", "Rollback", "lrwatch rolled {{instance}} back to a known-good snapshot"),
        _annotation("Run start (schedule)",
                    f"lrwatch_run_info{{{SEL}}} unless lrwatch_run_info{{{SEL}}} offset $__rate_interval",
                    "blue", "Run {{run}} started",
                    "{{optimizer}} with {{scheduler}} on {{instance}}",
                    tags="run,optimizer,scheduler"),
        _alerts_annotation(),
    ]
    return _dashboard("lrwatch-training", "lrwatch / Training",
                      "Training runs watched by lrwatch.Watcher: learning rate, loss, gradients, "
                      "evaluation, speed, rollbacks and firing rules.",
                      lay.panels, _variables("lrwatch_training_steps_total"), annotations,
                      "lrwatch-serving", "lrwatch / Serving")


def _joint_drift_panel(lay: _Layout) -> None:
    lay.add(_timeseries(
        "Joint (multivariate) drift",
        _targets((f"lrwatch_multivariate_drift_score{{{SEL}}}", "{{instance}} evidence / threshold"),
                 (f"lrwatch_multivariate_drift_detected{{{SEL}}}", "{{instance}} detected")),
        thresholds=[{"color": "transparent", "value": None}, {"color": "red", "value": 1}],
        description="The joint test of the numeric input features (their relations, not "
                    "only their marginals; docs/drift-joint.md): its evidence in units of its "
                    "calibrated threshold (>= 1: over), and 1 when it found drift. It counts in "
                    "lrwatch_drift_window_detected and the data_drift rule."), w=24, h=7)


def _prediction_distribution_panels(lay: _Layout) -> None:
    lay.add(_timeseries(
        "Predicted class shares vs reference",
        _targets((f"lrwatch_prediction_class_ratio{{{SEL}}}", "{{instance}} class {{class}}"),
                 (f"lrwatch_prediction_class_reference_ratio{{{SEL}}}",
                  "{{instance}} class {{class}} reference")),
        unit="percentunit", min_=0, max_=1,
        description="Share of each predicted class in the last window (classes the reference "
                    "never predicted, and its rarest beyond 50, are 'other'), and in the "
                    "reference (dashed).",
        overrides=[{"matcher": {"id": "byRegexp", "options": ".*reference"},
                    "properties": [{"id": "custom.lineStyle",
                                    "value": {"fill": "dash", "dash": [10, 10]}}]}]), w=12)
    lay.add(_timeseries(
        "Prediction mean and quantiles",
        _targets((f"lrwatch_prediction_mean{{{SEL}}}", "{{instance}} mean"),
                 (f"lrwatch_prediction_quantile{{{SEL}}}", "{{instance}} q{{q}}")),
        description="Numeric outputs (a probability, a regression): the last window's mean "
                    "and its 5/25/50/75/95% quantiles."), w=12)


def _estimation_panels(lay: _Layout) -> None:
    lay.add(_timeseries(
        "Estimated vs realised accuracy",
        _targets((f"lrwatch_estimated_accuracy{{{SEL}}}", "{{instance}} estimated (no labels)"),
                 (f'lrwatch_estimated_metric{{{SEL}, metric=~"accuracy_low|accuracy_high"}}',
                  "{{instance}} estimate band {{metric}}"),
                 (f"lrwatch_model_accuracy{{{SEL}}}", "{{instance}} realised (labels)"),
                 (f"lrwatch_estimation_error{{{SEL}}}", "{{instance}} estimation error")),
        unit="percentunit",
        description="Accuracy estimated from the predicted probabilities alone, with its ~95% "
                    "band, before any label; the realised accuracy of the labels joined in "
                    "the last window; and the estimate's error (estimated minus realised) of "
                    "the last window whose own labels came in. "
                    "See docs/performance-estimation.md.",
        overrides=[{"matcher": {"id": "byRegexp", "options": ".*band.*"},
                    "properties": [{"id": "custom.lineStyle",
                                    "value": {"fill": "dash", "dash": [4, 6]}}]}]), w=12)
    lay.add(_timeseries(
        "Estimated drop, precision, recall, F1, ROC AUC",
        _targets((f'lrwatch_estimated_metric{{{SEL}, metric=~"precision|recall|f1|roc_auc"}}',
                  "{{instance}} {{metric}}"),
                 (f"lrwatch_estimated_accuracy_drop{{{SEL}}}", "{{instance}} accuracy drop"),
                 (f"lrwatch_estimated_accuracy_drop_zscore{{{SEL}}}",
                  "{{instance}} drop in standard errors"),
                 (f"lrwatch_estimated_disagreement_rise_zscore{{{SEL}}}",
                  "{{instance}} input disagreement rise in standard errors"),
                 (f"increase(lrwatch_estimation_withheld_total{{{SEL}}}[$__rate_interval])",
                  "{{instance}} windows withheld ({{reason}})")),
        description="Binary classifiers: label-free estimates of precision, recall, F1 and "
                    "ROC AUC. The drop is the reference's estimate minus the window's; "
                    "LrwatchAccuracyEstimateDrop fires over 2 points at 3.09 standard errors. "
                    "Windows withheld: windows whose confidences lie outside the range the "
                    "labelled reference calibrated (hard 0/1 or one-hot outputs); their "
                    "estimates are NaN (LrwatchAccuracyEstimateWithheld). Input disagreement: "
                    "how far classifiers fitted on the reference's inputs disagree with the "
                    "model more than on held-out reference rows, a drop the confidences miss "
                    "(LrwatchInputDisagreementHigh fires over 4 for 10 minutes).",
        overrides=[{"matcher": {"id": "byRegexp", "options": ".*(standard errors|withheld.*)"},
                    "properties": [{"id": "custom.axisPlacement", "value": "right"}]}]), w=12)


def _serving_overview(lay: _Layout) -> None:
    """The "Overview" row."""
    lay.row("Overview")
    lay.add(_stat("Predictions / s", _targets(
        (f"sum(rate(lrwatch_predictions_total{{{SEL}}}[$__rate_interval]))", "predictions/s")),
        unit="reqps", description="Prediction records accepted per second."), w=4, h=4)
    lay.add(_stat("Drifted features", _targets(
        (f"sum(instance:lrwatch_drift_detected:sum{{{SEL}}})", "features")),
        decimals=0, thresholds=[{"color": "green", "value": None},
                                {"color": "orange", "value": 1}],
        description="Input features that drifted in the last window."), w=4, h=4)
    lay.add(_stat("Drift score", _targets((f"max(lrwatch_drift_score{{{SEL}}})", "score")),
                  thresholds=[{"color": "green", "value": None},
                              {"color": "orange", "value": 1}],
                  description="Largest drift evidence of the last window in units of its "
                              "calibrated threshold (>= 1: over)."), w=4, h=4)
    lay.add(_stat("Accuracy: realised / estimated", _targets(
        (f"avg(lrwatch_model_accuracy{{{SEL}}})", "realised"),
        (f"avg(lrwatch_estimated_accuracy{{{SEL}}})", "estimated")),
        unit="percentunit",
        description="Accuracy of the labels joined in the last window, and the last window's "
                    "accuracy estimated from its probabilities alone (before labels; needs a "
                    "reference with labels)."), w=4, h=4)
    lay.add(_stat("Label coverage (1h)", _targets(
        (f"avg(instance:lrwatch_label_coverage:ratio_rate1h{{{SEL}}})", "coverage")),
        unit="percentunit", description="Labels joined per prediction over the last hour."),
        w=4, h=4)
    lay.add(_stat("Rejected records (5m)", _targets(
        (f"max(instance:lrwatch_ingest_errors:ratio_rate5m{{{SEL}}})", "rejected")),
        unit="percentunit", thresholds=[{"color": "green", "value": None},
                                        {"color": "orange", "value": 0.05}],
        description="Rejected records per record received."), w=4, h=4)


def _serving_drift(lay: _Layout, fsel: str) -> None:
    """The "Drift" row."""
    lay.row("Drift")
    lay.add(_timeseries(
        "Drift statistic vs threshold: $feature",
        _targets((f'lrwatch_drift_statistic{{{fsel}, method="score"}}', "{{instance}} statistic"),
                 (f'lrwatch_drift_threshold{{{fsel}, method="score"}}', "{{instance}} threshold"),
                 (f'lrwatch_drift_statistic{{{fsel}, method="sequential_z"}}', "{{instance}} sequential"),
                 (f'lrwatch_drift_threshold{{{fsel}, method="sequential_z"}}', "{{instance}} sequential threshold")),
        description="The feature's window score and its calibrated threshold (method=score), "
                    "and the sequential scan over the last 2-16 windows (numeric features).",
        overrides=[{"matcher": {"id": "byRegexp", "options": ".*threshold"},
                    "properties": [{"id": "custom.lineStyle",
                                    "value": {"fill": "dash", "dash": [10, 10]}},
                                   {"id": "color", "value": {"mode": "fixed",
                                                             "fixedColor": "red"}}]}]),
        w=8)
    lay.panels[-1]["repeat"] = "feature"
    lay.panels[-1]["repeatDirection"] = "h"
    lay.panels[-1]["maxPerRow"] = 3
    lay.add(_state_timeline(
        "Drift heat map (evidence / threshold per feature)",
        _targets((f"max by (feature) (feature:lrwatch_drift_statistic:threshold_ratio{{{fsel}}})",
                  "{{feature}}")),
        panel_type="status-history",
        description="Each row a feature, each cell a scrape: the feature's drift score "
                    "divided by its calibrated threshold (1 = at the threshold).",
        steps=[{"color": "green", "value": None}, {"color": "yellow", "value": 0.5},
               {"color": "orange", "value": 1}, {"color": "red", "value": 2}]), w=24, h=8)
    lay.add(_timeseries(
        "Effect size per feature",
        _targets((f'lrwatch_drift_statistic{{{fsel}, method=~"wasserstein|jensen_shannon"}}',
                  "{{feature}} {{method}}"),
                 (f'lrwatch_drift_statistic{{{fsel}, method="psi"}}', "{{feature}} psi")),
        description="Wasserstein distance in reference standard deviations (numeric), "
                    "Jensen-Shannon distance and PSI: how large the shift is, not how sure."),
        w=12)
    lay.add(_timeseries(
        "Missing, out-of-range and unseen values",
        _targets((f"lrwatch_missing_ratio{{{fsel}}}", "{{feature}} missing"),
                 (f"lrwatch_out_of_range_ratio{{{fsel}}}", "{{feature}} out of range"),
                 (f"lrwatch_unseen_category_ratio{{{fsel}}}", "{{feature}} unseen category")),
        unit="percentunit", description="Data-quality ratios of the last window."), w=12)
    _joint_drift_panel(lay)


def _serving_predictions_and_accuracy(lay: _Layout) -> None:
    """The "Predictions and accuracy" row."""
    lay.row("Predictions and accuracy")
    lay.add(_timeseries(
        "Prediction distribution vs reference",
        _targets(('lrwatch_drift_statistic{' + SEL + ', feature="_prediction", '
                  'method=~"psi|jensen_shannon"}', "{{instance}} {{method}}"),
                 ('lrwatch_drift_statistic{' + SEL + ', feature="_prediction", method="score"} '
                  '/ lrwatch_drift_threshold{' + SEL + ', feature="_prediction", method="score"}',
                  "{{instance}} score / threshold"),
                 ('lrwatch_unseen_category_ratio{' + SEL + ', feature="_prediction"} or '
                  'lrwatch_out_of_range_ratio{' + SEL + ', feature="_prediction"}',
                  "{{instance}} unseen classes / out of range")),
        description="How the model's outputs (the _prediction pseudo-feature) are distributed "
                    "compared with the reference: PSI, Jensen-Shannon distance, the "
                    "calibrated score over its threshold, and the share of classes never seen "
                    "in the reference (class outputs) or of values outside its range (numeric "
                    "outputs)."), w=12)
    lay.add(_timeseries(
        "Realised accuracy and label coverage",
        _targets((f"lrwatch_model_accuracy{{{SEL}}}", "{{instance}} accuracy (last window)"),
                 (f"instance:lrwatch_model_accuracy:avg_over_time30m{{{SEL}}}", "{{instance}} accuracy (30m)"),
                 (f"lrwatch_label_coverage_ratio{{{SEL}}}", "{{instance}} coverage (last window)"),
                 (f"instance:lrwatch_label_coverage:ratio_rate1h{{{SEL}}}", "{{instance}} coverage (1h)"),
                 (f"lrwatch_label_coverage_horizon_ratio{{{SEL}}}", "{{instance}} coverage (horizon)")),
        unit="percentunit", min_=0, max_=1,
        description="Accuracy of the labels joined with their predictions, and labels per "
                    "prediction: per window (delayed labels land in later windows), over an "
                    "hour, and over the label horizon H (the predictions made 2H to H ago, "
                    "by prediction time; lrwatch_label_horizon_seconds)."), w=12)
    _prediction_distribution_panels(lay)
    _estimation_panels(lay)
    lay.add(_timeseries(
        "Label delay",
        _targets(("histogram_quantile(0.5, sum by (instance, le) "
                  f"(rate(lrwatch_label_delay_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                  "{{instance}} p50"),
                 ("histogram_quantile(0.9, sum by (instance, le) "
                  f"(rate(lrwatch_label_delay_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                  "{{instance}} p90")),
        unit="s", description="Time from a prediction to its label."), w=8)
    lay.add(_timeseries(
        "Pending labels",
        _targets((f"lrwatch_pending_labels{{{SEL}}}", "{{instance}} pending"),
                 (f"rate(lrwatch_labels_expired_total{{{SEL}}}[$__rate_interval])", "{{instance}} expired/s")),
        description="Predictions waiting for their label, and those evicted unlabelled."), w=8)
    lay.add(_timeseries(
        "Model error (regression)",
        _targets((f"lrwatch_model_error{{{SEL}}}", "{{instance}} MAE")),
        description="Mean absolute error of the labels joined in the last window (regression "
                    "models)."), w=8)


def _serving_ingest(lay: _Layout) -> None:
    """The "Ingest" row."""
    lay.row("Ingest")
    lay.add(_timeseries(
        "Ingest rate",
        _targets((f"rate(lrwatch_predictions_total{{{SEL}}}[$__rate_interval])", "{{instance}} predictions"),
                 (f"rate(lrwatch_labels_total{{{SEL}}}[$__rate_interval])", "{{instance}} labels"),
                 (f"rate(lrwatch_ingest_received_total{{{SEL}}}[$__rate_interval])", "{{instance}} received")),
        unit="reqps", description="Records per second (accepted + rejected = received)."), w=8)
    lay.add(_timeseries(
        "Ingest errors by reason",
        _targets((f"sum by (reason) (rate(lrwatch_ingest_errors_total{{{SEL}}}[$__rate_interval]))",
                  "{{reason}}"),
                 (f"instance:lrwatch_ingest_errors:ratio_rate5m{{{SEL}}}", "{{instance}} rejected ratio (5m)")),
        description="Rejected records per second by reason; the ratio is rejected per received.",
        draw_style="bars"), w=8)
    lay.add(_timeseries(
        "Windows and queue",
        _targets((f"lrwatch_window_fill_ratio{{{SEL}}}", "{{instance}} open window fill"),
                 (f"lrwatch_queue_records{{{SEL}}}", "{{instance}} queued records"),
                 (f"rate(lrwatch_windows_total{{{SEL}}}[$__rate_interval])", "{{instance}} windows/s")),
        description="How full the open window is, the worker's queue, and windows closed."),
        w=8)


def _serving_rules_alerts_and_lrwatch_health(lay: _Layout) -> None:
    """The "Rules, alerts and lrwatch health" row."""
    lay.row("Rules, alerts and lrwatch health")
    _firing_panels(lay)
    lay.add(_timeseries(
        "Alert delivery (lrwatch's own alerts)",
        _targets((f"sum by (instance, sink) (rate(lrwatch_alerts_sent_total{{{SEL}}}[$__rate_interval]))",
                  "{{instance}} {{sink}} sent"),
                 (f"sum by (instance, sink) (rate(lrwatch_alerts_failed_total{{{SEL}}}[$__rate_interval]))",
                  "{{instance}} {{sink}} failed"),
                 (f"lrwatch_alerts_queue_length{{{SEL}}}", "{{instance}} queued")),
        description="Alerts the daemon sends itself (Alertmanager, webhook, log)."), w=12)
    lay.add(_timeseries(
        "lrwatch internal errors",
        _targets((f"increase(lrwatch_internal_errors_total{{{SEL}}}[$__rate_interval])", "{{instance}}")),
        description="Failures lrwatch absorbed (fail open)."), w=12)


def serving_dashboard() -> dict[str, Any]:
    """"lrwatch / Serving": drift (per feature and joint), predictions, realised and
    estimated accuracy, labels, ingest, rules."""
    fsel = SEL + ', feature=~"$feature"'
    feature_var = _query_var(
        "feature", "Feature",
        'label_values(lrwatch_drift_detected{job=~"$job", instance=~"$instance"}, feature)',
        multi=True, include_all=True, all_value=".+")
    lay = _Layout()
    _serving_overview(lay)
    _serving_drift(lay, fsel)
    _serving_predictions_and_accuracy(lay)
    _serving_ingest(lay)
    _serving_rules_alerts_and_lrwatch_health(lay)

    annotations = [
        _annotation("Drift", f"max by (job, instance) (lrwatch_drift_window_detected{{{SEL}}}) == 1",
                    "orange", "Drift", "an input feature of {{instance}} drifted"),
        _alerts_annotation(),
    ]
    return _dashboard("lrwatch-serving", "lrwatch / Serving",
                      "Models served next to lrwatch daemon: drift per feature and joint, "
                      "prediction distribution, realised and estimated accuracy, labels, "
                      "ingest and firing rules.",
                      lay.panels, _variables("lrwatch_predictions_total", [feature_var]),
                      annotations, "lrwatch-training", "lrwatch / Training")


#: File name -> builder.
DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "lrwatch-training.json": training_dashboard,
    "lrwatch-serving.json": serving_dashboard,
}


def render(dashboard: dict[str, Any]) -> str:
    """The JSON text as committed (2-space indent, keys in build order, final newline)."""
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def write_dashboards(out: str | os.PathLike[str]) -> list[Path]:
    """Write every dashboard into ``out`` (created if needed); returns the paths."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in DASHBOARDS.items():
        p = d / name
        p.write_text(render(build()), encoding="utf-8")
        paths.append(p)
    return paths


def check_dashboards(out: str | os.PathLike[str]) -> list[str]:
    """Names of the dashboards in ``out`` that are missing or differ from the generated ones."""
    stale = []
    for name, build in DASHBOARDS.items():
        p = Path(out) / name
        if not p.is_file() or p.read_text(encoding="utf-8") != render(build()):
            stale.append(name)
    return stale
