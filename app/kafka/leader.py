"""The faust leader election, on a topic of the registry."""

from __future__ import annotations

from faust.assignor import LeaderAssignor
from mode.utils.objects import cached_property

from app.contract.topics import TopicSpec

# Consumes the registry's `leader_election` topic; produces the faust LeaderAssignor class a worker's app elects
# its leader with (faust's own names the topic after the app id, outside the topic prefix and the registry).


def leader_assignor_for(topic: TopicSpec) -> type[LeaderAssignor]:
    """A LeaderAssignor electing through `topic`: the member assigned its partition 0 is the leader."""
    if topic.partitions != 1:
        # faust declares the topic with one partition and asks only for partition 0: with more, a member that
        # gets only the others is a member without a say, and a topic created by faust would differ from it.
        raise ValueError(f"the leader election topic {topic.name} must have 1 partition, not {topic.partitions}")

    class RegistryLeaderAssignor(LeaderAssignor):
        @cached_property
        def _leader_topic_name(self) -> str:
            return topic.name

    return RegistryLeaderAssignor
