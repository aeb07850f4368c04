"""The YAML configuration (SPEC section 4) and the environment settings, validated at load.

Errors name the key path and its line, e.g.
``triggers.yaml line 14, campaigns[0].where[0].op: 'like' is not one of eq, ne, ...``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from include.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
DEFAULT_CONFIG_PATH = PACKAGE_DIR / "triggers.yaml"
DEFAULT_TEMPLATES_DIR = PACKAGE_DIR / "templates"
DEFAULT_DB_URL = f"sqlite:///{PROJECT_DIR / 'var' / 'triggers.db'}"

OPS = ("eq", "ne", "in", "gt", "ge", "lt", "le", "startswith", "contains", "exists")
WILDCARD = "*"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> float:
    """``"30m"`` -> 1800.0 seconds. Durations are ``<n>s|m|h|d``."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration; write <n>s, <n>m, <n>h or <n>d, e.g. 30m")


Duration = Annotated[float, BeforeValidator(parse_duration)]
MAX_SCHEDULE_SECONDS = 366 * 86400  # a longer cadence is a cron expression's job


def parse_schedule(value: Any, setting: str = "TRIGGERS_SCHEDULE") -> str | timedelta:
    """A DAG's schedule from a setting: a five-field cron expression (or ``@hourly``...) stays a
    string; a duration (``30s``, ``5m``, ``1h``, ``1d``) becomes a timedelta, the only way below
    one minute. Anything else raises ConfigError naming ``setting`` and the accepted forms."""
    from croniter import CroniterError, croniter

    text = value.strip() if isinstance(value, str) else ""
    forms = "a cron expression such as '* * * * *' or '@hourly', or a duration such as 30s, 5m, 1h"
    if text and text[-1:] in _UNIT_SECONDS and text[:1].isdigit():
        try:
            seconds = parse_duration(text)
        except ValueError:
            raise ConfigError(f"{setting} is {value!r}: not a duration; write {forms}") from None
        if not 1 <= seconds <= MAX_SCHEDULE_SECONDS:
            raise ConfigError(f"{setting} is {value!r}: a duration must be between 1s and 366d ({forms})")
        return timedelta(seconds=seconds)
    if text.startswith("@") or len(text.split()) == 5:
        try:
            croniter(text, datetime(2026, 1, 1, tzinfo=UTC)).get_next(datetime)  # one that never fires fails
        except (CroniterError, ValueError, KeyError, TypeError, IndexError, OverflowError) as error:
            raise ConfigError(
                f"{setting} is {value!r}: not a valid cron expression ({error}); write {forms}"
            ) from None
        return text
    raise ConfigError(f"{setting} is {value!r}: write {forms}")


def schedule_timetable(setting: str, default: str) -> Any:
    """The timetable of the schedule in environment variable ``setting`` (empty: ``default``).

    Both forms keep data intervals (CronDataIntervalTimetable, DeltaDataIntervalTimetable): a
    backfill run processes the events of its interval, and catchup=False skips missed intervals."""
    from airflow.sdk import CronDataIntervalTimetable, DeltaDataIntervalTimetable

    schedule = parse_schedule(os.environ.get(setting) or default, setting)
    if isinstance(schedule, timedelta):
        return DeltaDataIntervalTimetable(schedule)
    return CronDataIntervalTimetable(schedule, timezone="UTC")


_WINDOW = re.compile(r"^\s*([01]?\d|2[0-3]):([0-5]\d)\s*-\s*([01]?\d|2[0-3]):([0-5]\d)\s*$")


def send_window_minutes(value: Any) -> tuple[int, int]:
    """``"22:00-06:00"`` -> (1320, 360): minutes after local midnight when sending opens and closes.

    The end is excluded; a start after the end wraps midnight. Equal start and end would be an
    empty (or a full) day, which is ambiguous: refused, leave ``send_window`` out to send at any hour.
    """
    match = _WINDOW.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a send window; write HH:MM-HH:MM, e.g. 08:00-21:00")
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if start == end:
        raise ValueError(
            f"{value!r} opens and closes at the same time; leave send_window out to send at any hour"
        )
    return start, end


def _send_window(value: Any) -> str:
    start, end = send_window_minutes(value)
    return f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d}"


def check_timezone(value: Any) -> str:
    """An IANA time zone name that this machine's zoneinfo knows, else ValueError naming the fix."""
    if isinstance(value, str) and value.strip():
        try:
            ZoneInfo(value.strip())
            return value.strip()
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file
            pass
    raise ValueError(
        f"{repr(value)[:80]} is not an IANA time zone name; write e.g. Europe/Paris or America/New_York"
    )


_SEED = re.compile(r"[^@\s<>,;\"'()\[\]]{1,64}@[^@\s<>,;\"'()\[\]]+\.[^@\s<>,;\"'()\[\]]+")


def _seed_address(value: Any) -> str:
    """A plain ``local@domain`` (the full check, with IDN domains, is where it is sent)."""
    if isinstance(value, str) and _SEED.fullmatch(value.strip()):
        return value.strip()
    raise ValueError(f"{repr(value)[:80]} is not one plain email address, e.g. seed@example.com")


SendWindow = Annotated[str, BeforeValidator(_send_window)]
SeedAddress = Annotated[str, BeforeValidator(_seed_address)]
TimeZoneName = Annotated[str, BeforeValidator(check_timezone)]
VALUE_SEPARATOR = "\x1f"  # joins a dimension's values in its column (staging blanks it inside a value)


def dimension_column(dimension: str) -> str:
    """The staging column that holds a dimension: ``" eVar01"`` -> ``dim_evar01``."""
    return "dim_" + re.sub(r"[^a-z0-9]+", "_", dimension.strip().lower()).strip("_")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TriggerDefinition(_Strict):
    name: str = Field(min_length=1, description="Analytics triggerId, or '*' for all")
    label: str | None = None


class Topic(_Strict):
    name: str = Field(min_length=1)
    triggers: list[TriggerDefinition] = Field(min_length=1)


class PipelineSettings(_Strict):
    consumer: str = Field(min_length=1)
    topics: list[Topic] = Field(min_length=1)
    fetch_size: int = Field(1000, ge=1, le=100_000)
    max_msg_size: int = Field(20_000, ge=1)
    retry_validity: Duration = 300.0
    on_gone: Literal["fail", "restart_from_oldest"] = "fail"
    start_from: Literal["oldest", "latest"] = "oldest"  # where a consumer with no position starts
    max_events_per_run: int | None = Field(None, ge=1, description="cap of one drain; none: until 204")
    retention: Duration = 3 * 86400.0
    delivery_retention: Duration = Field(90 * 86400.0, description="deliveries are the dedupe and cap memory")


class Identity(_Strict):
    dimension: str | None = None
    field: Literal["mcId"] | None = None
    column: Literal["shopper_id", "mc_id", "recipient_id", "email"]

    @model_validator(mode="after")
    def _one_source(self) -> Identity:
        if (self.dimension is None) == (self.field is None):
            raise ValueError("give exactly one of 'dimension' (e.g. eVar01) or 'field' (mcId)")
        return self


class Condition(_Strict):
    dimension: str = Field(min_length=1)
    op: Literal[OPS]  # type: ignore[valid-type]
    value: Any = None

    @model_validator(mode="after")
    def _value_fits_op(self) -> Condition:
        if self.op == "in" and not isinstance(self.value, list):
            raise ValueError("op 'in' needs a list value, e.g. value: [a, b]")
        if self.op != "exists" and self.value is None:
            raise ValueError(f"op {self.op!r} needs a value")
        if self.op in ("gt", "ge", "lt", "le"):
            try:
                float(self.value)
            except (TypeError, ValueError):
                raise ValueError(f"op {self.op!r} compares numbers; {self.value!r} is not a number") from None
        return self


class Unless(_Strict):
    trigger: str = Field(min_length=1)
    within: Duration
    match_on: str | None = None


class Campaign(_Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    trigger: str = Field(min_length=1)
    identity: Identity
    where: list[Condition] = []
    unless: Unless | None = None
    dedupe: Duration | None = None
    template: str = Field(min_length=1)
    sender: str = Field(min_length=3)
    enabled: bool = True  # false: its events and pending emails wait (SPEC section 9)
    max_age: Duration | None = Field(None, gt=0, description="older triggering events: suppressed expired")
    send_window: SendWindow | None = None  # in the recipient's time zone; else limits.send_window
    seeds: list[SeedAddress] = []  # each gets a proof copy of the campaign's first email of a run


class FrequencyCap(_Strict):
    max: int = Field(ge=1)
    per: Duration


class RateLimits(_Strict):
    per_second: float | None = Field(None, gt=0)
    per_domain_per_second: float | None = Field(None, gt=0)


class Limits(_Strict):
    per_recipient: FrequencyCap | None = None
    rate: RateLimits | None = None
    send_window: SendWindow | None = None  # every campaign without its own
    default_timezone: TimeZoneName | None = None  # for recipients without one; else UTC


_DOTTED_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _dotted_path(value: Any) -> str:
    if isinstance(value, str) and _DOTTED_PATH.fullmatch(value.strip()):
        return value.strip()
    raise ValueError(
        f"{repr(value)[:120]} is not a dotted class path, e.g. "
        "airflow.providers.slack.notifications.slack_webhook.SlackWebhookNotifier"
    )


class NotifierSpec(_Strict):
    """Any Airflow notifier (a BaseNotifier subclass): its class path and constructor arguments."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    class_path: Annotated[str, BeforeValidator(_dotted_path)] = Field(alias="class")
    kwargs: dict[str, Any] = {}


class Alerts(_Strict):
    """Who is told when a run fails, misses its deadline or finds the lag too high (the
    ``alerts:`` section; see include/operations/alerts.py)."""

    email: list[SeedAddress] = []  # recipients of the SMTP notifier (through smtp_conn_id)
    smtp_conn_id: str = Field("smtp_default", min_length=1)
    from_email: SeedAddress | None = None  # else the connection's from_email
    notifier: NotifierSpec | None = None  # any Airflow notifier, beside (or instead of) email
    on_failure: bool = True  # a run that ends failed
    run_deadline: Duration | None = Field(None, gt=0)  # a run not finished this long after it was queued
    max_lag: Duration | None = Field(None, gt=0)  # the report task finds the lag above it
    # a lag still above max_lag (or runs still failing) is told again this long after it was first
    # told; none: only when it starts
    repeat_every: Duration | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _someone_to_tell(self) -> Alerts:
        if not self.email and self.notifier is None:
            raise ValueError(
                "alerts need someone to tell: give email (a list of addresses) or notifier "
                "(class and kwargs of an Airflow notifier)"
            )
        return self


class TriggersConfig(_Strict):
    pipeline: PipelineSettings
    campaigns: list[Campaign] = []
    limits: Limits = Limits()
    alerts: Alerts | None = None  # none: no alert (the status view and metrics still show everything)

    @cached_property
    def trigger_labels(self) -> dict[str, str]:
        """triggerId -> label (the id itself when no label is given); may hold '*'."""
        return {t.name: t.label or t.name for topic in self.pipeline.topics for t in topic.triggers}

    @property
    def accepts_all_triggers(self) -> bool:
        return WILDCARD in self.trigger_labels

    def trigger_ids_for(self, reference: str) -> list[str]:
        """The triggerIds a campaign's ``trigger`` (a label or a triggerId) stands for."""
        return [tid for tid, label in self.trigger_labels.items() if reference in (tid, label)]

    @cached_property
    def dimensions(self) -> tuple[str, ...]:
        """Every dimension a rule reads, trimmed: these are extracted into columns at staging."""
        names = set()
        for campaign in self.campaigns:
            if campaign.identity.dimension:
                names.add(campaign.identity.dimension.strip())
            names.update(condition.dimension.strip() for condition in campaign.where)
            if campaign.unless and campaign.unless.match_on:
                names.add(campaign.unless.match_on.strip())
        return tuple(sorted(names))

    @model_validator(mode="after")
    def _references_resolve(self) -> TriggersConfig:
        known = set(self.trigger_labels) | set(self.trigger_labels.values())
        for campaign in self.campaigns:
            for reference in (campaign.trigger, campaign.unless.trigger if campaign.unless else None):
                if reference and reference not in known:
                    raise ValueError(
                        f"campaign {campaign.id!r}: trigger {reference!r} is neither a label nor a "
                        f"triggerId under pipeline.topics (known: {', '.join(sorted(known))})"
                    )
        ids = [c.id for c in self.campaigns]
        if len(ids) != len(set(ids)):
            raise ValueError(f"campaign ids must be unique: {ids}")
        columns: dict[str, str] = {}
        for name in self.dimensions:
            other = columns.setdefault(dimension_column(name), name)
            if other != name:
                raise ValueError(f"dimensions {other!r} and {name!r} would share one column")
        return self


def _line_of(document: yaml.Node | None, location: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location."""
    node, line = document, None
    for key in location:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _format_location(location: tuple[Any, ...]) -> str:
    text = ""
    for key in location:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text or "(top level)"


def parse_config(text: str, source: str = "<config>") -> TriggersConfig:
    try:
        data = yaml.safe_load(text)
        document = yaml.compose(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping with a 'pipeline' key")
    return _validated(TriggersConfig, data, document, source)


def parse_alerts(text: str, source: str = "<config>") -> Alerts | None:
    """Only the ``alerts:`` section (None when absent): read where a mistake elsewhere in the file
    must not stop the alerts (DAG parse time, the failure callbacks)."""
    try:
        data = yaml.safe_load(text)
        document = yaml.compose(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict) or data.get("alerts") is None:
        return None
    return _validated(Alerts, data["alerts"], document, source, within=("alerts",))


def _validated(model: Any, data: Any, document: Any, source: str, within: tuple[str, ...] = ()) -> Any:
    """``data`` validated as ``model``; every problem named by file, line and key (a ConfigError)."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location = within + tuple(
                k for k in item["loc"] if not str(k).startswith(("function-", "literal"))
            )
            line = _line_of(document, location)
            where = f"line {line}, " if line else ""
            message = item["msg"].removeprefix("Value error, ")
            given = item.get("input")
            if isinstance(given, str | int | float) and repr(given) not in message:
                message += f" (got {given!r})"
            problems.append(f"{source} {where}{_format_location(location)}: {message}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None


def read_config_text(path: Path) -> str:
    """The configuration file's text, or a ConfigError naming it and TRIGGERS_CONFIG."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot read the configuration {path}: {error.strerror}; set TRIGGERS_CONFIG"
        ) from None


def load_config(
    path: str | os.PathLike[str] | None = None, templates_dir: Path | None = None
) -> TriggersConfig:
    """Load and validate the configuration; check that each campaign's template set exists."""
    path = Path(path or os.environ.get("TRIGGERS_CONFIG") or DEFAULT_CONFIG_PATH)
    config = parse_config(read_config_text(path), source=path.name)
    templates_dir = templates_dir or Settings.from_env().templates_dir
    for index, campaign in enumerate(config.campaigns):
        missing = [
            f"{campaign.template}.{part}.j2"
            for part in ("subject", "txt", "html")
            if not (templates_dir / f"{campaign.template}.{part}.j2").is_file()
        ]
        if missing:
            raise ConfigError(
                f"{path.name}, campaigns[{index}].template: template set {campaign.template!r} is "
                f"missing {', '.join(missing)} in {templates_dir} (set TRIGGERS_TEMPLATES)"
            )
    return config


@dataclass(frozen=True)
class Settings:
    """Where things are: the environment with working defaults."""

    db_url: str = field(repr=False)  # may hold a password
    config_path: Path
    templates_dir: Path
    pipeline_conn_id: str = "adobe_pipeline"
    smtp_conn_id: str = "smtp_default"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            db_url=os.environ.get("TRIGGERS_DB_URL") or DEFAULT_DB_URL,
            config_path=Path(os.environ.get("TRIGGERS_CONFIG") or DEFAULT_CONFIG_PATH),
            templates_dir=Path(os.environ.get("TRIGGERS_TEMPLATES") or DEFAULT_TEMPLATES_DIR),
        )
