"""Ingest-slot planning (bridge.slots): fair shares, hand-over when a bridge joins, take-over
when one dies, and that a cluster always converges with every slot held exactly once."""

from __future__ import annotations

import random

import pytest

from bridge.cluster import SLOT, SingleNode, name_hash, slot_key, unsigned_hash
from bridge.slots import DEFAULT_SLOTS, SlotPlan, fair_share, plan_slots, share_filters, slot_client_id, slots_tag
from firstcare.errors import ConfigError
from firstcare.settings import Settings


def test_fair_share_is_the_ceiling_and_everything_when_alone() -> None:
    assert fair_share(8, 1) == 8
    assert fair_share(8, 3) == 3
    assert fair_share(8, 8) == 1
    assert fair_share(8, 10) == 1
    assert fair_share(8, 0) == 8  # the census always counts this bridge; a zero never divides


def test_a_lone_bridge_takes_every_free_slot() -> None:
    plan = plan_slots(8, 1, held=set(), leaving=set(), locked=set())
    assert plan == SlotPlan(claim=tuple(range(8)), want=8)


def test_a_bridge_above_its_share_gives_up_its_highest_slots() -> None:
    plan = plan_slots(8, 3, held={0, 1, 2, 3, 4, 5, 6, 7}, leaving=set(), locked=set(range(8)))
    assert plan == SlotPlan(release=(7, 6, 5, 4, 3))


def test_a_new_bridge_waits_for_slots_to_be_handed_over() -> None:
    plan = plan_slots(8, 2, held=set(), leaving=set(), locked=set(range(8)))
    assert plan.want == 0 and plan.release == ()


def test_slots_being_drained_are_neither_counted_nor_claimed() -> None:
    plan = plan_slots(8, 2, held={0, 1, 2, 3}, leaving={4}, locked={0, 1, 2, 3, 4, 5})
    assert plan.release == ()
    assert plan.want == 0  # at its share already: slot 4 is on its way to the other bridge


def test_a_survivor_takes_the_dead_bridges_slots_from_its_own_offset() -> None:
    # three bridges held 3/3/2; the one with {5, 6, 7} died: two left, share 4
    plan = plan_slots(8, 2, held={0, 1, 2}, leaving=set(), locked={0, 1, 2, 3, 4}, start=6)
    assert plan.want == 1
    assert plan.claim == (6, 7, 5)


def test_names_and_filters() -> None:
    assert slot_client_id("firstcare-bridge", 3) == "firstcare-bridge-3"
    assert share_filters("firstcare", ["fc/v1/#"]) == ("$share/firstcare/fc/v1/#",)


def test_the_single_node_cluster_holds_every_lock_it_asks_for() -> None:
    cluster = SingleNode()
    assert cluster.hold(slot_key(2)) and cluster.holding(slot_key(2))
    assert cluster.census(slot_key(0), SLOT) == (1, frozenset({unsigned_hash(slot_key(2).name)}), frozenset())
    cluster.release(slot_key(2))
    assert not cluster.holding(slot_key(2))


def simulate(total: int, bridges: list[str], held: dict[str, set[int]], rounds: int, rng: random.Random) -> None:
    """Bridges tick in random order; a release takes effect at once (drained), a claim is a
    try-lock that the first bridge wins."""
    for _ in range(rounds):
        for name in rng.sample(bridges, len(bridges)):
            locked = set().union(*held.values())
            start = name_hash(name) % total
            plan = plan_slots(total, len(bridges), held[name], set(), locked, start)
            held[name] -= set(plan.release)
            taken = 0
            for slot in plan.claim:
                if taken == plan.want:
                    break
                if slot not in set().union(*held.values()):
                    held[name].add(slot)
                    taken += 1


@pytest.mark.parametrize("total", [1, 3, 8, 13])
@pytest.mark.parametrize("seed", range(5))
def test_a_cluster_converges_to_every_slot_held_once_within_the_shares(total: int, seed: int) -> None:
    rng = random.Random(seed)
    bridges = ["a", "b", "c"]
    held: dict[str, set[int]] = {b: set() for b in bridges}
    simulate(total, bridges[:1], held, 2, rng)  # one bridge starts alone and takes everything
    assert held["a"] == set(range(total))
    simulate(total, bridges, held, 4, rng)  # two join
    assert sorted(s for h in held.values() for s in h) == list(range(total))
    assert all(len(h) <= fair_share(total, 3) for h in held.values())
    del held["b"]  # SIGKILL: its locks go with its connection
    simulate(total, ["a", "c"], held, 3, rng)
    assert sorted(s for h in held.values() for s in h) == list(range(total))
    assert all(len(h) <= fair_share(total, 2) for h in held.values())


def test_the_slots_tag_changes_with_anything_the_bridges_must_agree_on() -> None:
    base = slots_tag("firstcare-bridge", 8, "firstcare")
    assert base == slots_tag("firstcare-bridge", 8, "firstcare") and " " not in base
    assert len({base, slots_tag("bridge-a", 8, "firstcare"), slots_tag("firstcare-bridge", 6, "firstcare"),
                slots_tag("firstcare-bridge", 8, "other")}) == 4


PG = "postgresql://fc@db/firstcare"
MOSQUITTO = "mqtt://bridge:pw@broker:1883"


def settings(**values: object) -> Settings:
    return Settings.from_env({}, jwt_secret="s" * 40, **values)


def test_slots_are_on_by_default_only_with_postgresql_and_an_external_broker() -> None:
    assert settings(store_url=PG, mqtt_url=MOSQUITTO).ingest_slot_count == DEFAULT_SLOTS
    assert settings(store_url=PG).ingest_slot_count == 0  # the embedded broker
    assert settings(mqtt_url=MOSQUITTO).ingest_slot_count == 0  # SQLite: one bridge, today's session
    assert settings(mqtt_url=MOSQUITTO, ingest_slots=4).ingest_slot_count == 4  # asked for
    assert settings(store_url=PG, mqtt_url=MOSQUITTO, ingest_slots=0).ingest_slot_count == 0


def test_slots_that_cannot_work_are_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="FC_INGEST_SLOTS=.*shared subscriptions"):
        settings(store_url=PG, ingest_slots=4)  # amqtt has none
    with pytest.raises(ConfigError, match="FC_INGEST_SLOTS"):
        settings(store_url=PG, mqtt_url=MOSQUITTO, ingest_slots=-1)
    with pytest.raises(ConfigError, match="FC_INGEST_SHARE_GROUP"):
        settings(store_url=PG, mqtt_url=MOSQUITTO, ingest_share_group="a/b")
    with pytest.raises(ConfigError, match="FC_MQTT_CLIENT_ID"):
        settings(store_url=PG, mqtt_url=MOSQUITTO, mqtt_client_id="x" * 127)
