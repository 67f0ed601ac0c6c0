"""Shared by the commands: settings from the context, a broker check first, one line of error for every
expected failure (`run`, `control_call`), reading the files a command is given, and stopping on Ctrl-C."""

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from app.contract.registry import RegistryError
from app.control.plane import ControlError, ControlPlane
from app.domain.programs import ProgramRejected
from app.kafka.metadata import BrokerUnreachable, TopicUnavailable, check_broker
from app.settings import ConfigError, Settings, describe_validation_error

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; an expected failure becomes one line of error, not a traceback."""
    try:
        return asyncio.run(coro)
    except (ControlError, ProgramRejected, ConfigError, BrokerUnreachable, TopicUnavailable, RegistryError) as exc:
        raise click.ClickException(str(exc)) from exc
    except ValidationError as exc:
        raise click.ClickException(describe_validation_error(exc, "field")) from exc
    except KafkaError as exc:
        raise click.ClickException(f"Kafka: {exc}") from exc


def settings_of(ctx: click.Context) -> Settings:
    """The settings (--config file, environment, overrides), loaded once per command; a bad one is one line of error."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = Settings.load(obj.get("config"), **obj.get("overrides", {}))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        except UnicodeDecodeError as exc:
            raise click.ClickException(f"config file {obj.get('config')}: {not_utf8(exc)}") from exc
    settings: Settings = obj["settings"]
    return settings


def kafka_settings(ctx: click.Context) -> Settings:
    """The settings, once the broker has answered (else one line of error within connect_timeout_s)."""
    settings = settings_of(ctx)
    run(check_broker(settings))
    return settings


def read_text(path: Path) -> str:
    """A file's UTF-8 text; one that cannot be read, or is not UTF-8, is one line of error."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise click.ClickException(f"{path}: {not_utf8(exc)}") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from exc


def not_utf8(exc: UnicodeDecodeError) -> str:
    """Why text is not UTF-8: the first bad byte and its offset."""
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def json_file(path: Path | None) -> Any:
    """The JSON value of a file (None without one); invalid JSON is one line of error naming where."""
    if path is None:
        return None
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{path}: not JSON: {exc}") from exc


def control_call(ctx: click.Context, call: Callable[[ControlPlane], Awaitable[T]]) -> T:
    """What `call` returns, run against the control plane once the broker answers (its tables read)."""
    settings = kafka_settings(ctx)

    async def go() -> T:
        async with ControlPlane(settings) as control:
            return await call(control)

    return run(go())


def control_read(ctx: click.Context, read: Callable[[ControlPlane], T]) -> T:
    """What `read` finds in the control plane's tables, once they are read."""

    async def now(control: ControlPlane) -> T:
        return read(control)

    return control_call(ctx, now)


@contextlib.contextmanager
def interrupted_by(*signals: signal.Signals) -> Iterator[None]:
    """Turn these signals into KeyboardInterrupt meanwhile, so they stop what Ctrl-C stops."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_on_ctrl_c() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets, on the running loop: how a serving command hears it should stop."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    return stop
