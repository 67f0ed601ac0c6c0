"""Configs of topics that already exist: reads them (DescribeConfigs) and sets the ones topics/topics.yaml names
(IncrementalAlterConfigs SET, which aiokafka lacks: defined here, version 0). Produces, per topic, what differed
and whether it was changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import IncompatibleBrokerVersion
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Int8, Int16, Int32, Schema, String

_SET = 0  # IncrementalAlterConfigs operation: set the value (1 deletes, 2 appends, 3 subtracts)


class IncrementalAlterConfigsResponse_v0(Response):
    API_KEY = 44
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("responses", Array(
            ("error_code", Int16),
            ("error_message", String("utf-8")),
            ("resource_type", Int8),
            ("resource_name", String("utf-8")),
        )),
    )


class IncrementalAlterConfigsRequest_v0(RequestStruct):
    API_KEY = 44
    API_VERSION = 0
    RESPONSE_TYPE = IncrementalAlterConfigsResponse_v0
    SCHEMA = Schema(
        ("resources", Array(
            ("resource_type", Int8),
            ("resource_name", String("utf-8")),
            ("configs", Array(
                ("name", String("utf-8")),
                ("config_operation", Int8),
                ("value", String("utf-8")),
            )),
        )),
        ("validate_only", Boolean),
    )


# Version 1 is the flexible encoding (compact strings, tagged fields); every broker with the API has version 0.
_Struct: TypeAlias = IncrementalAlterConfigsRequest_v0


class IncrementalAlterConfigsRequest(Request[_Struct]):
    """IncrementalAlterConfigs (API 44), which aiokafka lacks: its version 0 only."""

    API_KEY = 44

    def __init__(self, resources: list[Any]) -> None:
        self._resources = resources

    def build(self, request_struct_class: type[_Struct]) -> _Struct:
        return request_struct_class(self._resources, False)


class ConfigsNotAltered(RuntimeError):
    """The broker cannot read or alter topic configs (an API it does not offer); the message says which."""


@dataclass(frozen=True)
class ConfigChange:
    """What one existing topic had, where it differed from what it should have."""

    topic: str
    had: dict[str, str | None]  # None: the broker reported no such config
    wanted: dict[str, str]

    def describe(self) -> str:
        """The difference in one line: `name had -> wanted` per config."""
        return ", ".join(f"{k} {self.had.get(k)} -> {v}" for k, v in self.wanted.items())


async def configs_of(admin: AIOKafkaAdminClient, wanted: Mapping[str, Mapping[str, str]]
                     ) -> dict[str, dict[str, str | None]]:
    """The current value of each named config of each topic (topic -> names). Raises ConfigsNotAltered on a
    broker without DescribeConfigs."""
    # Every config of the topic (names None), filtered here: the embedded broker drops the connection when a
    # DescribeConfigs request names configs.
    resources = [ConfigResource(ConfigResourceType.TOPIC, topic, None) for topic in wanted]
    try:
        responses = await admin.describe_configs(resources)
    except IncompatibleBrokerVersion as exc:
        raise ConfigsNotAltered(f"the broker cannot describe topic configs (no DescribeConfigs): {exc}") from None
    current: dict[str, dict[str, str | None]] = {topic: {} for topic in wanted}
    for response in responses:
        for error_code, error_message, _type, name, entries, *_ in response.resources:
            if error_code:
                raise RuntimeError(f"cannot describe the configs of topic {name}: error {error_code}: {error_message}")
            current[name] = {entry[0]: entry[1] for entry in entries if entry[0] in wanted.get(name, {})}
    return current


def differences(wanted: Mapping[str, Mapping[str, str]], current: Mapping[str, Mapping[str, str | None]]
                ) -> list[ConfigChange]:
    """The topics whose configs differ from the wanted ones, and how."""
    changes = []
    for topic, configs in wanted.items():
        had = current.get(topic, {})
        differing = {k: v for k, v in configs.items() if had.get(k) != v}
        if differing:
            changes.append(ConfigChange(topic, {k: had.get(k) for k in differing}, differing))
    return changes


async def set_configs(admin: AIOKafkaAdminClient, changes: list[ConfigChange]) -> None:
    """Set the wanted values (other configs of the topics are left as they are). Raises ConfigsNotAltered on a
    broker without IncrementalAlterConfigs (Apache Kafka before 2.3), RuntimeError when a topic refuses."""
    if not changes:
        return
    resources = [(int(ConfigResourceType.TOPIC), change.topic, [(k, _SET, v) for k, v in change.wanted.items()])
                 for change in changes]
    try:
        response = await admin._send_request(IncrementalAlterConfigsRequest(resources))
    except IncompatibleBrokerVersion:
        # AlterConfigs (33) is no fallback: it replaces every config of the topic, dropping the ones set elsewhere.
        raise ConfigsNotAltered(
            "the broker cannot alter topic configs (it offers no IncrementalAlterConfigs)") from None
    refused = [f"{name}: error {code}: {message}" for code, message, _type, name in response.responses if code]
    if refused:
        raise RuntimeError("cannot alter topic configs: " + "; ".join(refused))
