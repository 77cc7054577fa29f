"""The Redis view's key schema (``projections.keys``): the layout users and redis-cli
see, and the parsing the writer, readers and verify rely on."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from events.names import NAME_PATTERN
from projections import keys

NAMES = st.from_regex(rf"\A{NAME_PATTERN}\Z")


def test_the_layout_is_the_documented_one() -> None:
    """Each key as the module's docstring (and operators with redis-cli) know it."""
    assert keys.services_key("acme") == "hub:acme:services"
    assert keys.service_key("acme", "orders") == "hub:acme:svc:orders"
    assert keys.instance_key("acme", "orders", "i-1") == "hub:acme:inst:orders:i-1"
    assert keys.index_key("acme") == "hub:acme:index"
    assert keys.counts_key("acme", "orders") == "hub:acme:counts:orders"
    assert keys.stats_key("acme") == "hub:acme:stats"
    assert keys.preservation_key("acme") == "hub:acme:preservation"
    assert keys.TENANTS_KEY == "hub:_meta:tenants"
    assert keys.INFRA_COMPONENTS_KEY == "hub:_infra:components"
    assert keys.component_key("pg") == "hub:_infra:component:pg"
    assert keys.INFRA_CONFIG_KEY == "hub:_infra:config"
    assert keys.checkpoint_key("redis-registry") == "hub:_meta:checkpoint:redis-registry"
    assert keys.view_key("redis-registry") == "hub:_meta:view:redis-registry"
    assert keys.instance_key("acme", "orders", "i-1", keys.SHADOW_PREFIX) == (
        "hubreplay:acme:inst:orders:i-1"
    )
    assert keys.index_member("orders", "i-1") == "orders i-1"


@given(NAMES, NAMES, NAMES)
def test_keys_parse_back_to_what_they_were_built_from(tenant, service, instance) -> None:
    """An instance key gives back its tenant, service and instance; a component key its
    name; no other key of the view passes for either; an index member splits back."""
    key = keys.instance_key(tenant, service, instance)
    assert keys.instance_of(key) == (tenant, service, instance)
    assert keys.tenant_of(key) == tenant
    assert keys.component_of(keys.component_key(service)) == service
    assert keys.split_member(keys.index_member(service, instance)) == (service, instance)
    others = [keys.services_key(tenant), keys.service_key(tenant, service),
              keys.index_key(tenant), keys.counts_key(tenant, service),
              keys.stats_key(tenant), keys.TENANTS_KEY, keys.INFRA_COMPONENTS_KEY,
              keys.INFRA_CONFIG_KEY]  # fmt: skip
    for other in others:
        assert keys.instance_of(other) is None and keys.component_of(other) is None, other
    assert keys.instance_of(keys.component_key(service)) is None


def test_each_key_says_its_type_and_whether_it_is_bookkeeping() -> None:
    """Verify reads each key by the type its name says, and leaves the checkpoint and the
    view's state out, under the live prefix and the rebuild's shadow prefix alike."""
    for prefix in (keys.PREFIX, keys.SHADOW_PREFIX):
        assert keys.value_type(keys.instance_key("t", "s", "i", prefix)) == "hash"
        assert keys.value_type(keys.counts_key("t", "s", prefix)) == "hash"
        assert keys.value_type(keys.stats_key("t", prefix)) == "hash"
        assert keys.value_type(keys.preservation_key("t", prefix)) == "hash"
        assert keys.value_type(keys.component_key("c", prefix)) == "hash"
        assert keys.value_type(keys.infra_config_key(prefix)) == "hash"
        assert keys.value_type(keys.index_key("t", prefix)) == "zset"
        assert keys.value_type(keys.services_key("t", prefix)) == "set"
        assert keys.value_type(keys.service_key("t", "s", prefix)) == "set"
        assert keys.value_type(keys.tenants_key(prefix)) == "set"
        assert keys.value_type(keys.components_key(prefix)) == "set"
        assert not keys.is_bookkeeping(keys.tenants_key(prefix), prefix)
    assert keys.is_bookkeeping(keys.checkpoint_key("p"))
    assert keys.is_bookkeeping(keys.view_key("p"))
    assert keys.moved_to(keys.index_key("t", keys.SHADOW_PREFIX), keys.SHADOW_PREFIX) == (
        keys.index_key("t")
    )


@given(NAMES, st.lists(st.tuples(NAMES, NAMES), max_size=20))
def test_a_services_member_range_holds_exactly_its_members(service, members) -> None:
    """ZRANGEBYLEX with ``service_members`` selects the service's members and no other
    service's (``orders`` vs ``orders-2``); ``before_service`` ends before them."""
    low, high = keys.service_members(service)
    before = keys.before_service(service)
    for s, i in [*members, (service, "i")]:
        m = keys.index_member(s, i)
        assert (low[1:] <= m < high[1:]) == (s == service), (s, i)
        if s == service:
            assert not m < before[1:]
